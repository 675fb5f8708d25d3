"""Hyperparameter search over QS-Net training: Ray Tune + Optuna (``qsnet tune``)."""
