"""Evaluation: metrics, the physics baseline, the comparisons and the report."""
