"""Pruning quality for any corpus: scoring against labels (``scoring``) and label-free agreement with keep-all
(``agreement``). The evaluation grid that runs the job lives above it, in ``pipeline.evaluation``."""
