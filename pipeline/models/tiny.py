"""Tiny, real LLaVA-1.5 checkpoints built offline, for tests and the local default.

Real transformers classes with small shapes: a CLIP vision tower at 336 px / 14 px patches
(576 patch tokens plus CLS, like LLaVA-1.5), the LLaVA projector, a small Llama, a BPE
tokenizer trained here with ``tokenizers``, the real image processor and the LLaVA-1.5 chat
template. Saved with ``save_pretrained`` and loaded back through ``from_pretrained(path)``,
the same code path as a hub checkpoint. Deterministic (seeded), built once per cache key.

    python -m pipeline.models.tiny [--out DIR]     # prints the directory
    model.path: "tiny:llava" in a config           # resolves to the cached directory
"""

from __future__ import annotations

import argparse
import os
import shutil
import string
import tempfile
from pathlib import Path

TINY_PREFIX = "tiny:"
_VERSION = "v2"  # bump when the recipe changes so caches rebuild
_SEED = 1234

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as in llava-hf checkpoints.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_WORDS = """
what which where how many is are there the a an in on of to and or with image picture photo
color colour shape shapes red green blue yellow white black orange purple circle square
triangle star cube ball box dog cat car bus tree person man woman left right top bottom
center middle background small large big answer question using single word phrase yes no
please option letter from given choices directly describe detail this that it its one two
three four five six seven eight nine ten user assistant count number visible shown
""".split()


def cache_root() -> Path:
    return Path(os.environ.get("RESPRUNE_CACHE", Path.home() / ".cache" / "resprune-pipeline"))


def resolve_model_path(path: str) -> str:
    """``tiny:<family>`` -> the cached tiny checkpoint (built if missing); anything else unchanged."""
    if not path.startswith(TINY_PREFIX):
        return path
    family = path[len(TINY_PREFIX) :]
    if family != "llava":
        raise ValueError(f"no tiny model recipe for {family!r}; known: llava")
    target = cache_root() / f"tiny-llava-{_VERSION}"
    if not (target / "config.json").exists():
        build_tiny_llava(target)
    return str(target)


def build_tiny_llava(out: Path) -> Path:
    """Build and save the tiny LLaVA checkpoint; atomic, so concurrent builders are safe."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    try:
        from transformers import CLIPImageProcessor as ImageProcessor
        import torchvision  # noqa: F401  (the default CLIP processor needs it)
    except ImportError:
        from transformers import CLIPImageProcessorPil as ImageProcessor

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=list(string.printable), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    image_processor = ImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
            num_hidden_layers=3, num_attention_heads=4, projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    torch.manual_seed(_SEED)
    model = LlavaForConditionalGeneration(config).eval()
    # Every weight drawn from one seed: the checkpoint is identical across machines. Norms stay
    # at 1. The projector is scaled so visual tokens dwarf text embeddings (norms ~17 vs ~0.8,
    # as in real LLaVA-1.5) and answers depend on the image; the LLM's std keeps them varied.
    std = {"vision_tower": 0.02, "multi_modal_projector": 0.1}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, next((v for k, v in std.items() if k in name), 0.05))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the tiny offline LLaVA checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the cache)")
    args = parser.parse_args()
    print(build_tiny_llava(args.out) if args.out else resolve_model_path("tiny:llava"))


if __name__ == "__main__":
    main()
