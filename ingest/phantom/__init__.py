"""The multi-site MRF/mpMRI phantom: the platform's embedded default data (see DESIGN.md, Sites)."""
