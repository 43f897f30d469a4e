"""Visual-token pruning: ResPrune and baselines behind one registry, and the budget rules.

    from pipeline.pruning import resprune_select, relevance, gate, get_method, budget, energy_keep
"""

from .common import budget
from .energy import WEIGHTINGS, energy_keep, per_image_stats
from .registry import ENERGY_TRACED, METHODS, TEXT_GUIDED, PruneMethod, TracedMethod, get_method
from .resprune import gate, relevance, resprune_select, resprune_trace

__all__ = [
    "ENERGY_TRACED", "METHODS", "TEXT_GUIDED", "WEIGHTINGS", "PruneMethod", "TracedMethod", "budget", "energy_keep",
    "gate", "get_method", "per_image_stats", "relevance", "resprune_select", "resprune_trace",
]
