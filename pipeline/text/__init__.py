"""Text guidance: prompt cleaning and noun extraction."""

from .cleaning import clean_prompt
from .nouns import FALLBACK_NAME, NounExtractor

__all__ = ["FALLBACK_NAME", "NounExtractor", "clean_prompt"]
