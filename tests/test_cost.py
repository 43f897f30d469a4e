"""Cost accounting: analytic FLOP/KV counts against PyTorch's own counter and the real KV cache,
per-row seconds and dollars, price tables, and the configuration rules around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ConfigError, GenerationConfig, ModelConfig, load_config, validate_config
from pipeline.cost.accounting import CostModel
from pipeline.cost.flops import decode_flops, kv_cache_bytes, prefill_flops, row_flops, vision_flops
from pipeline.cost.prices import load_accelerators, load_prices
from pipeline.io.schema import COST_COLUMNS
from pipeline.engines.hf import HFEngine
from pipeline.models import DecodeRequest, load_adapter, model_shapes

from .conftest import REPO

TOLERANCE = 0.05


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def adapters(tiny_llava: str):
    cfg = ModelConfig(path=tiny_llava)
    language = load_adapter(cfg, "language")
    # FlopCounterMode does not see CPU SDPA kernels (torch 2.13): with eager attention the QK^T
    # and AV products are plain bmm calls it counts, so the attention term is checked too.
    language.model.set_attn_implementation("eager")
    return load_adapter(cfg, "vision"), language


@pytest.fixture(scope="module")
def shapes(tiny_llava: str):
    return model_shapes(tiny_llava)


def _vision_terms(v) -> dict[str, int]:
    seq = v.patches + v.class_tokens
    return {
        "patch embedding": 2 * v.channels * v.patch_size**2 * v.width * v.patches,
        "attention projections": v.layers * 2 * seq * 4 * v.width**2,
        "attention scores": v.layers * 4 * seq * seq * v.width,
        "MLP": v.layers * 2 * seq * v.mlp_matrices * v.width * v.mlp_width,
        "projector": sum(2 * v.patches * a * b for a, b in zip(v.projector, v.projector[1:])),
    }


def _prefill_terms(lang, seq: int) -> dict[str, int]:
    q, kv = lang.heads * lang.head_dim, lang.kv_heads * lang.head_dim
    return {
        "attention projections": lang.layers * 2 * seq * (2 * lang.hidden * q + 2 * lang.hidden * kv),
        "attention scores": lang.layers * 4 * seq * seq * q,
        "MLP": lang.layers * 2 * seq * lang.mlp_matrices * lang.hidden * lang.mlp_width,
    }


def test_vision_flops_agree_with_flop_counter_and_every_term_matters(adapters, shapes) -> None:
    vision, _ = adapters
    image = Image.new("RGB", (400, 300), (200, 30, 30))
    counted = _counted(lambda: vision.encode([image]))
    analytic = vision_flops(shapes.vision, shapes.vision.patches)
    assert abs(analytic - counted) / counted <= TOLERANCE, (analytic, counted)
    terms = _vision_terms(shapes.vision)
    assert sum(terms.values()) == analytic  # the terms below are the whole count
    for name, term in terms.items():  # a count that forgot any one term would fail the check above
        assert abs(analytic - term - counted) / counted > TOLERANCE, f"dropping {name} would go unnoticed"


@pytest.mark.parametrize("keep", [576, 128, 64])
def test_prefill_flops_agree_with_flop_counter_pruned_and_unpruned(adapters, shapes, keep: int) -> None:
    vision, language = adapters
    features = vision.encode([Image.new("RGB", (336, 336), (20, 90, 200))]).features[0]
    kept = torch.arange(keep)
    gen = GenerationConfig(max_new_tokens=1)  # prefill + the LM-head row of the first token
    result = []
    prompt = ["What shape is shown?"]
    request = DecodeRequest("row", prompt[0], features[:keep], kept)
    counted = _counted(lambda: result.extend(HFEngine(language).generate([request], gen)))
    seq = result[0].prompt_tokens
    assert seq > keep  # text tokens around the visual ones
    analytic = prefill_flops(shapes.language, seq)
    assert abs(analytic - counted) / counted <= TOLERANCE, (keep, analytic, counted)
    terms = _prefill_terms(shapes.language, seq)
    assert sum(terms.values()) + shapes.language.lm_head_flops == analytic
    for name, term in terms.items():
        assert abs(analytic - term - counted) / counted > TOLERANCE, f"dropping {name} would go unnoticed at {keep}"


def test_decode_flops_and_kv_cache_match_a_real_generation(adapters, shapes) -> None:
    _, language = adapters
    model, lang = language.model, shapes.language
    seq, steps = 150, 6
    embeds = torch.randn(1, seq, lang.hidden, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, seq, dtype=torch.long)

    def generate(n: int):
        return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=0, return_dict_in_generate=True)

    only_prefill = _counted(lambda: generate(1))
    out = []
    full = _counted(lambda: out.append(generate(steps)))
    assert full - only_prefill == decode_flops(lang, seq, steps)
    assert only_prefill == prefill_flops(lang, seq)
    cache = out[0].past_key_values
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert cached == kv_cache_bytes(lang, seq, steps, bytes_per_element=4)
    assert lang.kv_heads < lang.heads  # the tiny model uses GQA, so the KV count is GQA-aware


def test_reference_llava_7b_counts_match_the_published_figures() -> None:
    """Independent figures (shared notes, from the paper's setting): ~0.4 TFLOP vision, ~8.4
    TFLOP prefill at 576 + 60 tokens, ~2.4 at 128 + 60, 0.5 MB of bf16 KV cache per token."""
    s = model_shapes(str(REPO / "configs/checkpoints/llava-1.5-7b-hf"))
    assert (s.language.layers, s.language.hidden, s.language.kv_heads, s.vision.layers) == (32, 4096, 32, 24)
    assert 0.38e12 < vision_flops(s.vision, 576) < 0.42e12
    assert 8.2e12 < prefill_flops(s.language, 636) < 8.7e12
    assert 2.3e12 < prefill_flops(s.language, 188) < 2.6e12
    assert kv_cache_bytes(s.language, 1, 1, 2) == 2 * 32 * 4096 * 2  # 0.52 MB per token


def _cost_model(shapes, prices: str, **stage_overrides) -> CostModel:
    cfg = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    cfg["cost"] = {"accelerator": "h100-sxm", "prices": prices}
    cfg["encode_stage"].update(num_gpus=0.25, num_cpus=1)
    cfg["decode_stage"].update(num_gpus=0.75, num_cpus=2, **stage_overrides)
    cfg["ray"].pop("num_cpus")
    return CostModel.for_job(validate_config(cfg), shapes, kv_bytes_per_element=2)


def _batch() -> dict:
    return {
        "id": np.array(["a", "b", "c"], dtype=object),
        "error": np.array(["", "corrupt image: x", ""], dtype=object),
        "visual_tokens_in": np.array([576, 0, 576]), "encoder_patches": np.array([576, 0, 576]),
        # One task per row (no task spec): its selection's kept indices, prompt and generated tokens.
        "kept_indices": [[list(range(128))], [], [list(range(576))]], "task_selection": [[0], [-1], [0]],
        "task_error": [[""], ["corrupt image: x"], [""]],
        "task_prompt_tokens": [[150], [0], [598]], "task_generated_tokens": [[5], [0], [5]],
        "text_ms": np.array([1.0, 0.0, 1.0]), "prepare_ms": np.array([6.0, 0.0, 6.0]), "encode_ms": np.array([40.0, 0.0, 40.0]),
        "prune_ms": np.array([10.0, 0.0, 0.0]), "decode_ms": np.array([100.0, 0.0, 300.0]),
    }


def test_row_costs_apportion_reserved_resources_and_price_from_the_table(shapes, tmp_path: Path) -> None:
    model = _cost_model(shapes, "configs/prices.yaml")
    out = model(_batch())
    assert all(out[c][1] is None for c in COST_COLUMNS)  # error rows: nulls, not zeros
    hourly = load_prices(REPO / "configs/prices.yaml")
    gpu_rate, core_rate = hourly.accelerators["h100-sxm"].usd_per_hour, hourly.cpu_core.usd_per_hour
    for i, (enc_s, dec_s) in ((0, (0.050, 0.100)), (2, (0.040, 0.300))):
        text_s, prep_s = 0.001, 0.006
        assert out["gpu_seconds"][i] == pytest.approx(0.25 * enc_s + 0.75 * dec_s)
        assert out["cpu_seconds"][i] == pytest.approx(0.25 * text_s + 0.25 * prep_s + 1 * enc_s + 2 * dec_s)
        # GPU stages' CPUs come with the GPU's price; only the CPU-only text and prepare stages pay per core.
        expected = (out["gpu_seconds"][i] * gpu_rate + 0.25 * (text_s + prep_s) * core_rate) / 3600
        assert out["cost_usd"][i] == pytest.approx(expected)
        f = row_flops(shapes, visual_tokens_in=576, visual_tokens_kept=len(_batch()["kept_indices"][i][0]),
                      encoder_patches=576, prompt_tokens=_batch()["task_prompt_tokens"][i][0], generated_tokens=5,
                      bytes_per_element=2)
        assert out["flops_total"][i] == f.total == out["flops_vision"][i] + out["flops_prefill"][i] + out["flops_decode"][i]
    # Row 0 was pruned 576 -> 128: the unpruned figures are the same row with 598 prompt tokens.
    assert out["flops_prefill_unpruned"][0] == prefill_flops(shapes.language, 598) == out["flops_prefill"][2]
    assert out["flops_total_unpruned"][0] == out["flops_total"][2]
    assert out["kv_cache_bytes_unpruned"][0] == out["kv_cache_bytes"][2] > out["kv_cache_bytes"][0]
    assert out["flops_prefill_unpruned"][2] == out["flops_prefill"][2]  # nothing pruned

    # Prices are data: doubling the table doubles the dollars, and nothing else moves.
    table = yaml.safe_load((REPO / "configs/prices.yaml").read_text())
    table["accelerators"]["h100-sxm"]["usd_per_hour"] *= 2
    table["cpu_core"]["usd_per_hour"] *= 2
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump(table))
    doubled = _cost_model(shapes, str(tmp_path / "prices.yaml"))(_batch())
    assert doubled["cost_usd"][0] == pytest.approx(2 * out["cost_usd"][0])
    assert doubled["gpu_seconds"][0] == out["gpu_seconds"][0]


def test_run_totals_sum_the_rows_and_report_the_reservation(shapes) -> None:
    model = _cost_model(shapes, "configs/prices.yaml")
    out = model(_batch())
    rows = [{k: (v[i] if not isinstance(v, np.ndarray) else v[i].item() if hasattr(v[i], "item") else v[i])
             for k, v in out.items()} for i in range(3)]
    run = model.run_totals(rows, wall_seconds=10.0, io_num_cpus=0.25)
    assert run["totals"]["flops_total"] == out["flops_total"][0] + out["flops_total"][2]
    assert run["mean_per_image"]["cost_usd"] == pytest.approx((out["cost_usd"][0] + out["cost_usd"][2]) / 2)
    assert run["stages"]["decode_stage"]["busy_seconds"] == pytest.approx(0.4)
    assert run["stages"]["decode_stage"]["images_per_second"] == pytest.approx(5.0)
    # The bound: the most busy time per actor of the largest pool (prepare: 12 ms over up to 2 actors).
    assert run["stages"]["prepare_stage"]["busy_seconds_per_actor"] == pytest.approx(0.006)
    assert run["bound_by"] == "decode_stage"
    assert run["reserved"]["gpus"] == 1.0 and run["reserved"]["gpu_seconds"] == 10.0
    assert 0 < run["reserved"]["utilisation"] < 1
    assert run["prices"]["accelerator"]["source"] and run["prices"]["accelerator"]["date"]
    json.dumps(run)  # manifest-ready


def test_price_and_accelerator_tables_name_source_and_date_for_every_figure() -> None:
    prices = load_prices(REPO / "configs/prices.yaml")
    accelerators = load_accelerators(REPO / "configs/accelerators.yaml")
    assert set(accelerators.accelerators) <= set(prices.accelerators)  # the planner can price each one
    for entry in [*prices.accelerators.values(), prices.cpu_core, *accelerators.accelerators.values()]:
        assert entry.source.strip() and entry.date.strip()


def test_gpu_stages_need_a_priced_accelerator(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "configs/llava-1.5-7b.yaml").read_text())
    cfg["cost"].pop("accelerator")
    with pytest.raises(ConfigError, match=r"cost\.accelerator: required when a stage reserves GPUs"):
        validate_config(cfg)

    from pipeline.job import cost_model

    path = tmp_path / "job.yaml"
    local = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    local["cost"] = {"accelerator": "tpu-v9"}
    path.write_text(yaml.safe_dump(local))
    job = load_config(path)
    from pipeline.models.sources import resolve_model_path

    job = job.model_copy(update={"model": job.model.model_copy(update={"path": resolve_model_path("tiny:llava")})})
    with pytest.raises(ConfigError, match=r"cost\.accelerator: 'tpu-v9' is not in the price table; known: a100-80gb"):
        cost_model(job)
    local["cost"] = {"prices": str(tmp_path / "missing.yaml")}
    path.write_text(yaml.safe_dump(local))
    with pytest.raises(ConfigError, match=r"cost\.prices: cannot read"):
        cost_model(load_config(path).model_copy(update={"model": job.model}))


def test_an_image_asked_several_tasks_counts_its_vision_once(shapes) -> None:
    """Three tasks on one image: vision FLOPs once, each task's prefill, decode and KV cache on
    top (its own prompt and kept tokens); a task with an error adds nothing."""
    model = _cost_model(shapes, "configs/prices.yaml")
    batch = {
        "id": np.array(["a"], dtype=object), "error": np.array([""], dtype=object),
        "visual_tokens_in": np.array([576]), "encoder_patches": np.array([576]),
        "kept_indices": [[list(range(128)), list(range(64))]], "task_selection": [[0, 1, 0]],
        "task_error": [["", "", "prompt too long: 9000 tokens > 4000"]],
        "task_prompt_tokens": [[150, 90, 0]], "task_generated_tokens": [[20, 3, 0]],
        "text_ms": np.array([1.0]), "prepare_ms": np.array([6.0]), "encode_ms": np.array([40.0]),
        "prune_ms": np.array([10.0]), "decode_ms": np.array([100.0]),
    }
    out = model(batch)
    one = row_flops(shapes, visual_tokens_in=576, visual_tokens_kept=128, encoder_patches=576, prompt_tokens=150,
                    generated_tokens=20, bytes_per_element=2)
    two = row_flops(shapes, visual_tokens_in=576, visual_tokens_kept=64, encoder_patches=576, prompt_tokens=90,
                    generated_tokens=3, bytes_per_element=2)
    assert out["flops_vision"][0] == one.vision == two.vision
    assert out["flops_total"][0] == one.vision + one.prefill + one.decode + two.prefill + two.decode
    assert out["flops_total"][0] < one.total + two.total  # what one row per question would have counted
    assert out["flops_total_unpruned"][0] == one.vision + one.prefill_unpruned + one.decode_unpruned \
        + two.prefill_unpruned + two.decode_unpruned
    assert out["kv_cache_bytes"][0] == one.kv_cache_bytes + two.kv_cache_bytes
    assert out["task_flops"][0] == [one.prefill + one.decode, two.prefill + two.decode, None]
    assert out["task_kv_cache_bytes"][0] == [one.kv_cache_bytes, two.kv_cache_bytes, None]
