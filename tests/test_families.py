"""Every family through the same Ray job: LLaVA-1.5 (tiny:llava-shapes), LLaVA-NeXT, Qwen2.5-VL
and Qwen3-VL on their tiny checkpoints, images of several sizes in one batch, each config's budget
(a count, or a ratio of each image's tokens) as the cap of an adaptive one (pruning.energy), per-row
counts and costs. The four runs share one Ray instance (the job in this process, as
tests/test_golden.py runs it); the command line and `ray job submit` are tests/test_job.py's."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.cost.flops import kv_cache_bytes, prefill_flops, state_bytes, vision_flops
from pipeline.job import run_job
from pipeline.io.storage import locate
from pipeline.io.manifest import read_manifest
from pipeline.models import ADAPTERS, load_adapter, model_shapes, token_counts
from pipeline.models.sources import resolve_model_path
from pipeline.pruning import budget, energy_keep, relevance, resprune_trace
from pipeline.tiny.shapes_world import SCHEMA, make_rows

from .conftest import REPO

CONFIGS = {"llava": "configs/local.yaml", "llava_next": "configs/local-llava-next.yaml",
           "qwen2_5_vl": "configs/local-qwen2_5_vl.yaml", "qwen3_vl": "configs/local-qwen3_vl.yaml",
           "qwen3_5": "configs/local-qwen3_5.yaml"}
ROWS = 10
ENERGY, MIN_KEEP = 0.999, 16


@pytest.fixture(scope="module")
def local_ray() -> object:
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_runs_through_the_job_with_true_counts_and_costs(tmp_path: Path, family: str, local_ray: None) -> None:
    raw = yaml.safe_load((REPO / CONFIGS[family]).read_text())
    raw["input"].pop("create_sample_rows")
    raw["generation"]["max_new_tokens"] = 4
    raw["pruning"] |= {"energy": ENERGY, "min_keep": MIN_KEEP}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    rows = make_rows(ROWS, seed=21)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "in" / "a.parquet")
    sizes = {r["id"]: Image.open(io.BytesIO(r["image"])).size for r in rows}
    images = {r["id"]: Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows}
    assert len(set(list(sizes.values())[:8])) > 1  # the first batch (batch_size 8) mixes image sizes

    summary = run_job(load_config(config, {"input.path": str(tmp_path / "in"), "output.path": str(tmp_path / "out")}))
    summary = summary.as_dict()
    assert summary["output_rows"] == summary["ok_rows"] == ROWS, summary

    cfg = load_config(config)
    path = resolve_model_path(cfg.model.path)
    shapes = model_shapes(path)
    manifest = read_manifest(locate(str(tmp_path / "out")))
    bytes_per_element = manifest["model"]["kv_bytes_per_element"]
    vision = load_adapter(cfg.model, "vision")
    alpha = cfg.pruning.alpha_for(vision.default_alpha)
    out = pads.dataset(tmp_path / "out").to_table().to_pylist()
    tokens_in, kept_counts, text_tokens = set(), [], defaultdict(set)
    for r in out:
        w, h = sizes[r["id"]]
        n, patches = token_counts(path, cfg.model, w, h)
        cap = budget(n, keep=cfg.pruning.keep, prune_ratio=cfg.pruning.prune_ratio)
        # What the encoder produced is what the config alone predicts for that image size, and the
        # budget rule applied to it is the row's cap.
        assert (r["visual_tokens_in"], r["encoder_patches"]) == (n, patches), (r["id"], w, h)
        assert r["keep"] == cap < n
        # Where the row stopped is the energy rule on the image's own trace, recomputed here from
        # the image alone (not the job's batch): the greedy to the cap, cut at the rule's count.
        enc = vision.encode([images[r["id"]]])
        rel = relevance(enc.features[0], vision.embed_words([r["nouns"]])[0])
        seed = enc.seed_scores[0] if enc.seed_scores else None
        order, explained = resprune_trace(enc.features[0], cap, relevance_scores=rel, alpha=alpha, seed=seed)
        k = int(energy_keep(explained, ENERGY, MIN_KEEP))
        assert r["visual_tokens_kept"] == len(r["kept_indices"]) == k, (r["id"], r["visual_tokens_kept"], k)
        assert r["kept_indices"] == sorted(order[:k].tolist())
        assert r["energy_explained"] == pytest.approx(float(explained[k - 1]), abs=1e-5)
        assert r["energy_explained"] >= ENERGY or k in (MIN_KEEP, cap)
        # The cost columns follow the kept count: the prompt is the text plus the kept tokens.
        assert r["flops_vision"] == vision_flops(shapes.vision, patches)
        assert r["flops_prefill"] == prefill_flops(shapes.language, r["prompt_tokens"])
        assert r["kv_cache_bytes"] == kv_cache_bytes(shapes.language, r["prompt_tokens"], r["generated_tokens"],
                                                     bytes_per_element)
        assert r["flops_prefill_unpruned"] > r["flops_prefill"] and r["kv_cache_bytes_unpruned"] > r["kv_cache_bytes"]
        assert r["prompt_tokens"] > k and r["generated_tokens"] >= 1
        text_tokens[r["prompt"]].add(r["prompt_tokens"] - k)
        tokens_in.add(n)
        kept_counts.append(k)
    assert all(len(t) == 1 for t in text_tokens.values())  # same prompt, same text tokens, whatever was kept
    assert len(set(kept_counts)) > 2  # the budget adapts per image
    assert len(tokens_in) > 1 or family == "llava"  # token counts follow the image size (not on LLaVA-1.5)
    assert manifest["model"]["family"] == family
    # The hybrid's fixed per-sequence state is reported beside the KV columns; a dense decoder has none.
    state = state_bytes(shapes.language, bytes_per_element)
    assert summary["recurrent_state_bytes_per_sequence"] == manifest["cost"]["recurrent_state_bytes_per_sequence"] == state
    assert (state > 0) == (family == "qwen3_5")
    assert manifest["config"]["pruning"]["alpha"] == ADAPTERS[family].default_alpha  # alpha: null -> paper setting
    dist = manifest["visual_tokens"]["kept"]
    assert (dist["mean"], dist["p50"], dist["p90"]) == (
        pytest.approx(np.mean(kept_counts)), int(np.percentile(kept_counts, 50, method="inverted_cdf")),
        int(np.percentile(kept_counts, 90, method="inverted_cdf")))
    assert summary["visual_tokens_kept"] == dist


@pytest.mark.parametrize(("recipe", "size"), [("llava_next", (640, 360)), ("qwen2_5_vl", (448, 252)),
                                              ("qwen2_5_vl", (300, 500)), ("qwen3_vl", (448, 252)),
                                              ("qwen3_vl", (300, 500)), ("qwen3_5", (448, 252))])
def test_vision_flops_follow_the_encoder_patches_as_the_flop_counter_counts(recipe: str, size: tuple[int, int]) -> None:
    """Views x CLIP for LLaVA-NeXT; window and full attention over one dynamic-size sequence for
    Qwen2.5-VL (windows cut at the image edge make the count an upper bound there); full attention
    and the main merger plus one per DeepStack level for Qwen3-VL."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import ModelConfig
    from pipeline.models import load_adapter

    vision = load_adapter(ModelConfig(path=f"tiny:{recipe}", device="cpu"), "vision")
    if recipe.startswith("qwen"):  # the counter does not see CPU SDPA kernels; eager attention is plain matmuls
        vision.core.visual.set_attn_implementation("eager")
    image = Image.new("RGB", size, (200, 30, 30))
    with FlopCounterMode(display=False) as counter:
        enc = vision.encode([image])
    analytic = vision_flops(model_shapes(resolve_model_path(f"tiny:{recipe}")).vision, enc.encoder_patches[0])
    counted = counter.get_total_flops()
    assert abs(analytic - counted) / counted <= 0.05, (analytic, counted)
