"""Cost: analytic FLOP/KV counts (``flops``), price and accelerator tables (``prices``), per-row
accounting in the job (``accounting``), the cost-per-image planner (``planner``)."""

from .flops import LanguageShape, ModelShapes, RowFlops, VisionShape, row_flops

__all__ = ["LanguageShape", "ModelShapes", "RowFlops", "VisionShape", "row_flops"]
