"""Prompt cleaning and noun extraction on real evaluation prompts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import spacy

from pipeline.text import FALLBACK_NAME, NounExtractor, clean_prompt

# Prompt formats of the LLaVA-1.5 evaluation suite (model_vqa_loader / eval scripts).
CLEANING_CASES = [
    ("What is the man holding?\nAnswer the question using a single word or phrase.", "What is the man holding?"),
    ("Is there a dog in the image?\nANSWER THE QUESTION USING A SINGLE WORD OR PHRASE.", "Is there a dog in the image?"),
    ("Is there a car in the image? Please answer yes or no.", "Is there a car in the image?"),
    ("Is this photo taken indoors? Answer yes or no.", "Is this photo taken indoors?"),
    ("Does the sign say stop? Please answer this question with yes or no.", "Does the sign say stop?"),
    (
        "Question: Which animal is shown?\nA. cat\nB. horse\nAnswer with the option's letter from the given choices directly.",
        "Which animal is shown?\nA. cat\nB. horse",
    ),
    (
        "Context: A farm scene.\nWhich is a mammal?\nA. hen\nB. cow\nAnswer with the option letter from the given choices directly.",
        "A farm scene.\nWhich is a mammal?\nA. hen\nB. cow",
    ),
    (
        "What brand is this bottle?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase.",
        "What brand is this bottle?",
    ),
    ("What color is the bus? Answer with a single word.", "What color is the bus?"),
    ("Describe the image in detail.", "Describe the image in detail."),
]


@pytest.mark.parametrize(("prompt", "expected"), CLEANING_CASES)
def test_clean_prompt(prompt: str, expected: str) -> None:
    assert clean_prompt(prompt) == expected


def test_fallback_extractor_is_announced_once_and_named(caplog: pytest.LogCaptureFixture) -> None:
    import pipeline.text.nouns as nouns

    nouns._announced_fallback = False
    with caplog.at_level(logging.WARNING, logger="pipeline.text.nouns"):
        a = NounExtractor("not_an_installed_spacy_model")
        NounExtractor("not_an_installed_spacy_model")
    assert a.name == FALLBACK_NAME
    assert sum("not installed" in r.getMessage() for r in caplog.records) == 1
    got = a(["What color is the bus on the left?", "Is there a dog in the image?", "Which animal is shown?\nA. cat\nB. horse", ""])
    assert got == [["color", "bus"], ["dog"], ["animal", "cat", "horse"], []]


def test_spacy_pipeline_path_uses_pos_tags(tmp_path: Path) -> None:
    """A saved spaCy pipeline that assigns POS (as en_core_web_sm's tagger does) drives extraction."""
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    ruler.add([[{"LOWER": {"IN": ["ball", "cube", "paris", "picture", "image"]}}]], {"POS": "NOUN"})
    ruler.add([[{"LOWER": {"IN": ["red", "blue", "bigger"]}}]], {"POS": "ADJ"})
    nlp.to_disk(tmp_path / "tagger")
    ex = NounExtractor(str(tmp_path / "tagger"))
    assert ex.name == f"spacy:{tmp_path / 'tagger'}"
    assert ex(["Is the red ball bigger than the blue cube?", "A ball in Paris, another ball.", "Describe the image."]) == [
        ["ball", "cube"],
        ["ball", "paris"],
        [],  # nouns naming the image itself give no guidance
    ]


def test_en_core_web_sm_when_installed() -> None:
    ex = NounExtractor("en_core_web_sm")
    if ex.name == FALLBACK_NAME:
        pytest.skip("en_core_web_sm is not installable on this machine (GitHub releases only)")
    assert ex(["Is there a red car next to the tree?"]) == [["car", "tree"]]
