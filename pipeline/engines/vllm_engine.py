"""The production engine: vLLM (continuous batching, paged KV cache, CUDA graphs on GPUs), fed
only the kept visual tokens as embeddings; the vision tower is never loaded.

One ``vllm.LLM`` per decode actor for the actor's life (start-up takes tens of seconds), sized
from ``decode_stage.vllm``; each Ray batch goes to it as one ``generate`` call so vLLM schedules
the rows itself. Family specifics come from the adapter (``vllm_architecture``, ``vllm_request``);
the model classes are in ``vllm_models``. This module imports vLLM: only the vLLM environment
loads it (``pipeline.engines.environment``).
"""

from __future__ import annotations

import logging
import os
import signal

import psutil

from pipeline.config import DecodeStageConfig, GenerationConfig
from pipeline.models import Generation, VisionLanguageAdapter

from .base import DecodeEngine, DecodeRequest

log = logging.getLogger(__name__)


class VLLMEngine(DecodeEngine):
    name = "vllm"
    schedules_batches = True

    def __init__(self, adapter: VisionLanguageAdapter, stage: DecodeStageConfig) -> None:
        super().__init__(adapter)
        cfg = stage.vllm
        on_gpu = adapter.device.type == "cuda"
        if not on_gpu:
            # The CPU build sizes its KV cache from this variable, and binds its OpenMP threads to
            # cores unless told not to: a fractional-CPU actor shares its cores with other pools.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kv_cache_gib)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        from .vllm_models import register

        register()  # in this process too (the plugin entry point covers vLLM's own processes)
        eager = cfg.enforce_eager if cfg.enforce_eager is not None else not on_gpu
        self.max_model_len = cfg.max_model_len or adapter.context_length
        options = {"gpu_memory_utilization": cfg.gpu_memory_utilization} if on_gpu else {}
        options |= adapter.vllm_options()  # what the checkpoint asks that vLLM derives only for its own classes
        before = {p.pid for p in psutil.Process().children()}
        self.llm = LLM(
            model=adapter.path,
            tokenizer=adapter.path,
            dtype=str(adapter.dtype).removeprefix("torch."),
            hf_overrides={"architectures": [adapter.vllm_architecture]},
            enable_mm_embeds=True,  # kept tokens come as embeddings...
            limit_mm_per_prompt={"image": 0},  # ...so no vision tower and no image budget of its own
            max_model_len=self.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            enforce_eager=eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            # Constrained answers (a task's choice or JSON Schema): xgrammar, as the HF engine uses,
            # and JSON without free whitespace (an untrained model otherwise fills max_tokens with it).
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            seed=0,
            **options,
        )
        # The engine core runs in a process of its own (VLLM::EngineCore), found as the child this
        # constructor started rather than through vLLM's internals, which change between versions.
        # Only direct children: vLLM's executor answers for its GPU workers (a dead worker fails the
        # core), and short-lived helpers further down (compile workers) may end on purpose.
        self.processes = [p for p in psutil.Process().children() if p.pid not in before and not _is_helper(p)]
        self.process_names = {p.pid: _name(p) for p in self.processes}  # for the report once they are gone
        log.info("vLLM engine processes: %s", ", ".join(f"{pid} ({n})" for pid, n in self.process_names.items()))

    @property
    def context_length(self) -> int:
        return self.max_model_len

    def generate(self, requests: list[DecodeRequest], gen: GenerationConfig) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        def params(r: DecodeRequest) -> SamplingParams:
            rule = r.constraint
            # A choice as the grammar the HF engine compiles too (an optional space, then a label).
            structured = (None if rule is None else StructuredOutputsParams(grammar=rule.choice_grammar) if rule.choices
                          else StructuredOutputsParams(json=rule.json_schema))
            return SamplingParams(
                max_tokens=r.max_new_tokens or gen.max_new_tokens,
                temperature=gen.temperature if gen.do_sample else 0.0,
                top_p=gen.top_p if gen.do_sample else 1.0,
                seed=gen.seed if gen.do_sample else None,
                structured_outputs=structured,
            )

        prompts = [self.adapter.vllm_request(r) for r in requests]
        outputs = self.llm.generate(prompts, [params(r) for r in requests], use_tqdm=False)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            results.append(Generation(
                text=completion.text.strip(), prompt_tokens=len(out.prompt_token_ids),
                generated_tokens=len(ids), token_ids=ids,
            ))
        return results

    def failure(self) -> str | None:
        for p in self.processes:
            try:
                alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                return f"vLLM engine process {p.pid} ({self.process_names[p.pid]}) is gone{_exit_status(p)}"
        return None

    def fatal(self, error: Exception) -> str | None:
        # vLLM raises EngineDeadError (vllm.v1.engine.exceptions; matched by name, whose module
        # moved between versions) once its client has seen the engine core die.
        if any(c.__name__ == "EngineDeadError" for c in type(error).__mro__):
            return f"vLLM reports its engine dead: {type(error).__name__}: {str(error)[:300]}"
        return None


def _is_helper(process: psutil.Process) -> bool:
    """multiprocessing's resource tracker: not part of the engine, and not fatal when gone."""
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return False


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()).strip()[:60] or process.name()
    except psutil.Error:
        return "?"


def _exit_status(process: psutil.Process) -> str:
    """How a child of this process ended (it is reaped here: the actor exits next)."""
    try:
        code = process.wait(timeout=0)
    except (psutil.Error, ChildProcessError):
        return ""
    if code is None:
        return ""
    return f" (killed by {signal.Signals(-code).name})" if code < 0 else f" (exit status {code})"
