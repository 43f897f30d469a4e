"""Visual-token pruning: ResPrune and baselines behind one registry.

    from pipeline.pruning import resprune_select, relevance, gate, get_method
"""

from .common import budget
from .registry import METHODS, TEXT_GUIDED, PruneMethod, get_method
from .resprune import gate, relevance, resprune_select

__all__ = ["METHODS", "TEXT_GUIDED", "PruneMethod", "budget", "gate", "get_method", "relevance", "resprune_select"]
