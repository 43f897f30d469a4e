"""Record the job's output on the demo corpus, one file per tiny config (on the reference engine,
HF): the behaviour a refactor must keep (answers, kept indices, token counts, FLOPs and KV bytes;
not times). `python -m tests.golden.record [name ...]` rewrites this machine class's JSON files
(``machine_class``); tests/test_golden.py runs every case (a config on an engine) and compares it
with its config's file, so the vLLM cases also show that vLLM answers as HF does.

Recordings are per machine class: the same code gives different floats on different CPUs (MKL,
oneDNN and ATen pick kernels by vendor and vector width), and greedy selection and decoding turn
a last-bit difference into another kept token or, now and then, another answer. Measured: the
recordings made on an Intel Xeon differ on an AMD EPYC (AVX-512) in the kept indices of nearly
every row (about 95 % of each row's tokens shared) and in 0 to 12 of 48 answers per config. A
new machine class is recorded from the code that landed (the behaviour to keep), never from a
change under test."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS_ROWS = 48  # the demo's corpus (write_corpus's defaults: seed 0, two shards)
RECORDED = ("local.yaml", "local-llava-next.yaml", "local-qwen2_5_vl.yaml", "local-qwen3_vl.yaml")  # on HF
# (config file, engine): the four tiny families on HF; on vLLM the default and Qwen3-VL (DeepStack
# rows and M-RoPE positions through vLLM's own model classes).
CASES = (*((c, "hf") for c in RECORDED), ("local.yaml", "vllm"), ("local-qwen3_vl.yaml", "vllm"))
COLUMNS = (
    "id", "answer", "error", "method", "keep", "visual_tokens_in", "visual_tokens_kept", "kept_indices",
    "encoder_patches", "nouns", "extractor", "prompt_tokens", "generated_tokens", "prompt_truncated",
    "flops_vision", "flops_prefill", "flops_prefill_unpruned", "flops_decode", "flops_total",
    "flops_total_unpruned", "kv_cache_bytes", "kv_cache_bytes_unpruned",
)


def case_name(config: str, engine: str) -> str:
    return f"{config.removesuffix('.yaml')}-{engine}"


def machine_class() -> str:
    """``<CPU vendor>-<torch's CPU capability>``, e.g. ``AuthenticAMD-AVX512``: what decides the
    kernels, and so the floats, of a CPU run."""
    import torch

    vendor = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("vendor_id")), "unknown")
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def recordings_dir(write: bool = False) -> Path | None:
    """This machine class's recordings: ``<vendor>-<capability>/``, else ``<vendor>/`` (the first
    recordings, made on an Intel Xeon whose capability was not noted). ``write``: the exact
    directory, created. None when there is none to compare with."""
    exact = HERE / machine_class()
    if write:
        exact.mkdir(exist_ok=True)
        return exact
    vendor = HERE / machine_class().rsplit("-", 1)[0]
    return next((d for d in (exact, vendor) if d.is_dir()), None)


def recording(config: str, folder: Path | None = None) -> Path:
    return (folder or recordings_dir() or HERE / machine_class()) / f"{config.removesuffix('.yaml')}.json"


def write_demo_corpus(path: Path) -> None:
    from pipeline.tiny.shapes_world import write_corpus

    write_corpus(path, rows=CORPUS_ROWS)


def run_case(repo: Path, config: str, engine: str, corpus: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Run the job in this process (Ray already up or started here) and key its rows by id."""
    import pyarrow.dataset as pads

    from pipeline.config import load_config
    from pipeline.job import run_job

    cfg = load_config(repo / "configs" / config, {"input.path": str(corpus), "output.path": str(out),
                                                   "decode_stage.engine": engine})
    run_job(cfg)
    rows = pads.dataset(str(out), format="parquet").to_table(columns=list(COLUMNS)).to_pylist()
    return {r["id"]: {k: r[k] for k in COLUMNS if k != "id"} for r in sorted(rows, key=lambda r: r["id"])}


def main() -> None:
    import tempfile

    import ray

    repo = HERE.parents[1]
    only = set(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        write_demo_corpus(corpus)
        ray.init(address="local", num_cpus=3, include_dashboard=False)
        for config in RECORDED:
            if only and config.removesuffix(".yaml") not in only:
                continue
            rows = run_case(repo, config, "hf", corpus, Path(tmp) / config)
            recording(config, recordings_dir(write=True)).write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
            print(config, len(rows), "rows", flush=True)


if __name__ == "__main__":
    main()
