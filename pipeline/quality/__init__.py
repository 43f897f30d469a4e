"""Pruning quality: the evaluation grid and its scores (``evaluation``)."""
