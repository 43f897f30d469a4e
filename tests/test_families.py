"""Every family through the same Ray job: LLaVA-NeXT and Qwen2.5-VL on their tiny checkpoints,
images of several sizes in one batch, budgets as ratios, per-row counts and costs."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.cost.flops import vision_flops
from pipeline.io.manifest import read_manifest
from pipeline.io.sample_corpus import SCHEMA, make_rows
from pipeline.models import ADAPTERS, model_shapes, token_counts
from pipeline.models.sources import resolve_model_path
from pipeline.pruning import budget

from .conftest import REPO
from .test_job import _env, _run_cli

CONFIGS = {"llava_next": "configs/local-llava-next.yaml", "qwen2_5_vl": "configs/local-qwen2_5_vl.yaml"}
ROWS = 10


@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_runs_through_the_job_with_true_counts_and_costs(tmp_path: Path, family: str) -> None:
    raw = yaml.safe_load((REPO / CONFIGS[family]).read_text())
    raw["input"].pop("create_sample_rows")
    raw["generation"]["max_new_tokens"] = 4
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    rows = make_rows(ROWS, seed=21)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "in" / "a.parquet")
    sizes = {r["id"]: Image.open(io.BytesIO(r["image"])).size for r in rows}
    assert len(set(list(sizes.values())[:8])) > 1  # the first batch (batch_size 8) mixes image sizes

    _, summary = _run_cli(["--config", str(config), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                          _env())
    assert summary["output_rows"] == summary["ok_rows"] == ROWS, summary

    cfg = load_config(config)
    path = resolve_model_path(cfg.model.path)
    shapes = model_shapes(path)
    out = pads.dataset(tmp_path / "out").to_table().to_pylist()
    tokens_in = set()
    for r in out:
        w, h = sizes[r["id"]]
        n, patches = token_counts(path, cfg.model, w, h)
        kept = budget(n, prune_ratio=cfg.pruning.prune_ratio)
        # What the encoder produced is what the config alone predicts for that image size, and the
        # budget rule applied to it is what the LLM received.
        assert (r["visual_tokens_in"], r["encoder_patches"]) == (n, patches), (r["id"], w, h)
        assert r["keep"] == r["visual_tokens_kept"] == len(r["kept_indices"]) == kept < n
        assert r["kept_indices"] == sorted(set(r["kept_indices"])) and r["kept_indices"][-1] < n
        assert r["flops_vision"] == vision_flops(shapes.vision, patches)
        assert r["flops_prefill_unpruned"] > r["flops_prefill"] and r["kv_cache_bytes_unpruned"] > r["kv_cache_bytes"]
        assert r["prompt_tokens"] > kept and r["generated_tokens"] >= 1
        tokens_in.add(n)
    assert len(tokens_in) > 1  # token counts follow the image size
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["model"]["family"] == family
    assert manifest["config"]["pruning"]["alpha"] == ADAPTERS[family].default_alpha  # alpha: null -> paper setting


@pytest.mark.parametrize(("recipe", "size"), [("llava_next", (640, 360)), ("qwen2_5_vl", (448, 252)),
                                              ("qwen2_5_vl", (300, 500))])
def test_vision_flops_follow_the_encoder_patches_as_the_flop_counter_counts(recipe: str, size: tuple[int, int]) -> None:
    """Views x CLIP for LLaVA-NeXT; window and full attention over one dynamic-size sequence for
    Qwen2.5-VL (windows cut at the image edge make the count an upper bound there)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import ModelConfig
    from pipeline.models import load_adapter

    vision = load_adapter(ModelConfig(path=f"tiny:{recipe}", device="cpu"), "vision")
    if recipe == "qwen2_5_vl":  # the counter does not see CPU SDPA kernels; eager attention is plain matmuls
        vision.core.visual.set_attn_implementation("eager")
    image = Image.new("RGB", size, (200, 30, 30))
    with FlopCounterMode(display=False) as counter:
        enc = vision.encode([image])
    analytic = vision_flops(model_shapes(resolve_model_path(f"tiny:{recipe}")).vision, enc.encoder_patches[0])
    counted = counter.get_total_flops()
    assert abs(analytic - counted) / counted <= 0.05, (analytic, counted)
