"""Strip answer-formatting instructions from prompts before they guide pruning.

The LLaVA evaluation prompts append instructions such as "Answer the question using a single
word or phrase." that say nothing about the image; their nouns ("question", "word", "phrase",
"letter") would pull relevance toward arbitrary tokens. Only text relevance uses the cleaned
prompt: the LLM still receives the user's full prompt.
"""

from __future__ import annotations

import re

# One pattern per family of instruction, each matching a whole sentence (up to its full stop).
_INSTRUCTIONS = [
    # LLaVA short-answer suffix (VQAv2, GQA, VizWiz, TextVQA, POPE), and variants.
    r"answer (?:the question |this question )?(?:using|with|in) (?:a |one )?single (?:word|term) or (?:a )?phrase",
    r"answer (?:the question |this question )?(?:using|with|in) (?:a |one )?(?:single )?(?:word|phrase)",
    # Multiple choice (ScienceQA, MMBench, SEED): "Answer with the option's letter ... directly."
    r"answer with the option'?s? letter from the given choices directly",
    r"(?:please )?(?:answer|respond|reply) with (?:only )?the (?:option'?s?|correct option'?s?|choice'?s?) letter[^.?!\n]*",
    r"(?:please )?select the correct answer from the options above",
    # Yes/no phrasing (MME, POPE variants).
    r"(?:please )?(?:answer|respond|reply)(?: this question| the question)?(?: with)? (?:only )?"
    r"['\"]?yes['\"]? or ['\"]?no['\"]?",
    # VizWiz unanswerable instruction.
    r"when the provided information is insufficient, respond with ['\"]?unanswerable['\"]?",
    # Generic brevity instructions.
    r"(?:please )?answer (?:briefly|concisely|in (?:a few|one or two) words)",
    r"(?:please )?(?:keep|make) (?:your|the) answer (?:short|brief|concise)",
]
_PATTERN = re.compile(
    r"\s*(?:" + "|".join(f"(?:{p})" for p in _INSTRUCTIONS) + r")\s*[.!]?",
    flags=re.IGNORECASE,
)
# Field labels of multiple-choice prompts (ScienceQA, MMBench): keep the content, drop the label.
_LABELS = re.compile(r"^\s*(?:question|context|hint|options?)\s*:\s*", flags=re.IGNORECASE | re.MULTILINE)
_SPACES = re.compile(r"[ \t]+")


def clean_prompt(prompt: str) -> str:
    """Remove answer-formatting instructions; keep the question and any options or context."""
    text = _LABELS.sub("", _PATTERN.sub(" ", prompt))
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)
