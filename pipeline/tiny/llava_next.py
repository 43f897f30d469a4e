"""``tiny:llava_next``: a real LLaVA-NeXT with small shapes, built offline like ``tiny:llava``.

``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor`` with the llava-v1.6 geometry
(CLIP at 336 px / 14 px patches, so a view is 576 patches; llava-v1.6's grid pinpoints, so an
image is a base view plus 2 to 4 tiles and up to 2928 visual tokens) and tiny widths: CLIP
64 x 3 layers, Llama 256 x 2 layers. The tokenizer, chat template, seed and weight scaling are
``tiny:llava``'s (see ``llava.py``): random weights whose answers depend on the image.
"""

from __future__ import annotations

from typing import Any

from .common import SEED, randomize_weights, tiny_tokenizer
from .llava import CHAT_TEMPLATE, recipe_config

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's


def new_tiny_llava_next() -> tuple[Any, Any]:
    """A freshly initialised, seeded ``(LlavaNextForConditionalGeneration, LlavaNextProcessor)``."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    try:
        import torchvision  # noqa: F401  (the default processor needs it)
        from transformers import LlavaNextImageProcessor
    except ImportError:
        from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor

    tokenizer = tiny_tokenizer()
    llava = recipe_config("llava", tokenizer)  # tiny:llava's vision and text configs
    config = LlavaNextConfig(
        vision_config=llava.vision_config, text_config=llava.text_config, image_token_index=llava.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
        image_seq_length=576,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config).eval()
    randomize_weights(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor
