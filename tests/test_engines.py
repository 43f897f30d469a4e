"""The engine contract without vLLM itself: where the engine runs, config errors, and the
Qwen2.5-VL position rule the vLLM model class uses, against transformers' own."""

from __future__ import annotations

import sys

import pytest
import torch

from pipeline.config import ConfigError, DecodeStageConfig, ModelConfig, VLLMConfig, validate_config
from pipeline.engines import engine_environment
from pipeline.job import run_identity
from pipeline.models import load_adapter
from pipeline.models.qwen2_5_vl import kept_mrope_positions


def test_the_hf_engine_runs_in_the_drivers_interpreter() -> None:
    env = engine_environment(DecodeStageConfig())
    assert (env.engine, env.package, env.python) == ("hf", "transformers", sys.executable)
    assert env.runtime_env() == {}


def test_a_missing_vllm_environment_is_a_config_error_naming_the_field(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"decode_stage\.vllm\.python: .* does not exist"):
        engine_environment(DecodeStageConfig(engine="vllm", vllm=VLLMConfig(python=str(tmp_path / "python"))))
    # The main environment has no vLLM (it pins an older transformers): named, with the way out.
    with pytest.raises(ConfigError, match=r"decode_stage\.vllm\.python: no vLLM in .*make vllm-env"):
        engine_environment(DecodeStageConfig(engine="vllm", vllm=VLLMConfig(python=sys.executable)))


def test_engine_is_a_validated_field_and_part_of_a_runs_identity() -> None:
    raw = {"input": {"path": "in"}, "output": {"path": "out"}, "model": {"path": "tiny:llava"}}
    with pytest.raises(ConfigError, match=r"decode_stage\.engine: Input should be 'hf' or 'vllm'"):
        validate_config({**raw, "decode_stage": {"engine": "tgi"}})
    with pytest.raises(ConfigError, match=r"decode_stage\.vllm\.max_num_seqs"):
        validate_config({**raw, "decode_stage": {"engine": "vllm", "vllm": {"max_num_seqs": 0}}})
    hf, vllm = validate_config(raw), validate_config({**raw, "decode_stage": {"engine": "vllm"}})
    assert run_identity(hf)["engine"] == "hf" and run_identity(vllm)["engine"] == "vllm"  # resume refuses a switch


def test_kept_token_positions_equal_transformers_positions_of_the_full_sequence() -> None:
    adapter = load_adapter(ModelConfig(path="tiny:qwen2_5_vl", device="cpu"), "language")
    layout = [1, 12, 20]  # t, h, w patches: 60 merged tokens on a 6 x 10 grid
    n = 60
    prompt = "What colour is the square?"
    ids = adapter.prompt_ids(prompt)
    start = ids.index(adapter.image_token_id)
    width = adapter.config.text_config.hidden_size
    for kept in (torch.arange(n), torch.tensor([0, 5, 17, 30, 59]), torch.tensor([1, 2, 3]), torch.tensor([59])):
        _, want = adapter.prompt_inputs(prompt, torch.zeros(len(kept), width), kept, layout)
        got, delta = kept_mrope_positions(len(ids) - 1 + len(kept), [(start, layout, kept)], adapter.merge)
        assert torch.equal(got, want), kept
        assert delta == int(want.max()) + 1 - want.shape[1]
    # Text after the image continues after the FULL grid (here max(1, 6, 10) = 10 positions on).
    got, _ = kept_mrope_positions(len(ids), [(start, layout, torch.tensor([0]))], adapter.merge)
    assert got[0, start + 1] == start + 10
