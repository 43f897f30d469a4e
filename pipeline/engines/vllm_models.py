"""vLLM model classes that decode from the kept visual tokens alone, registered out of tree.

vLLM's stock LLaVA and Qwen2.5-VL classes cannot serve this pipeline as they are: their modules
import torchvision (which has no build beside the CPU torch wheel), and Qwen2.5-VL's public
embedding input (``image_embeds`` + ``image_grid_thw``) sizes and places a dense grid, so a pruned
subset would lose its 3-D positions. These classes hold only the LLM (vLLM's own Llama / Qwen2
implementation, weights mapped from the stock checkpoint; the vision tower and projector are never
loaded) and take each row's kept tokens as one image item:

    {"image_embeds": [1, K, D], "image_grid_thw": [1, 3] (optional), "kept_indices": [1, K] (optional),
     "deepstack_embeds": [1, L, K, D] (Qwen3-VL)}

The single image placeholder in the prompt's ids is expanded to K placeholders, whose embeddings
are the kept tokens. ``ResPruneLlavaForCausalLM`` (LLaVA-1.5, LLaVA-NeXT) gives them contiguous
positions, as the stock models do; ``ResPruneQwen2_5_VLForCausalLM`` gives them their full-grid
M-RoPE positions and shifts the text after them as the unpruned sequence would
(``pipeline.models.qwen2_5_vl.kept_mrope_positions``), as vLLM's own EVS does for video;
``ResPruneQwen3VLForCausalLM`` does the same on vLLM's Qwen3 LLM (whose rotary embedding
interleaves the M-RoPE sections as the checkpoint's rope config says) and adds each kept token's
DeepStack rows to the first L layers' hidden states at its position, as vLLM's stock Qwen3-VL
does for whole images. The stock class cannot take them: with no vision tower loaded it turns
DeepStack off, and the answers would still be fluent.

Registered through vLLM's plugin entry point (``vllm.general_plugins`` in pyproject.toml), so
every vLLM process (the engine core runs in its own) has them; an engine selects one with
``hf_overrides={"architectures": [name]}``: the checkpoint stays the stock one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.qwen2_moe import Qwen2MoeMLP
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM, Qwen3Model
from vllm.model_executor.models.qwen3_next import Qwen3NextAttention, Qwen3NextDecoderLayer, Qwen3NextModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    extract_layer_index,
    init_vllm_registered_model,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from pipeline.models.qwen2_5_vl import kept_mrope_positions

FIELDS = {"image_embeds": False, "image_grid_thw": True, "kept_indices": True, "deepstack_embeds": False}  # name -> on CPU


def _field_config(data: Mapping[str, torch.Tensor]) -> dict[str, MultiModalFieldConfig]:
    # One item per row: every field's leading dimension is the item.
    return {name: MultiModalFieldConfig.batched("image", keep_on_cpu=cpu) for name, cpu in FIELDS.items()}


def placeholder_id(config: object) -> int:
    return int(getattr(config, "image_token_id", None) or config.image_token_index)


class KeptTokensParser(MultiModalDataParser):
    def _parse_image_data(self, data: object) -> DictEmbeddingItems:
        if isinstance(data, dict):
            return DictEmbeddingItems(
                data, modality="image", required_fields={"image_embeds"},
                optional_fields={"image_grid_thw", "kept_indices", "deepstack_embeds"}, fields_factory=_field_config,
            )
        raise ValueError("this model takes the kept visual tokens only, as {'image_embeds': [1, K, D], ...}")


class KeptTokensProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1}

    def get_data_parser(self) -> MultiModalDataParser:
        return KeptTokensParser(expected_hidden_size=self._get_expected_hidden_size())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # A row's kept tokens are at most its whole sequence: sizes vLLM's cache for embeddings.
        return {"image": seq_len}


class KeptTokensDummyInputs(BaseDummyInputsBuilder[KeptTokensProcessingInfo]):
    """Profiling runs text only: the engine is built with no image budget of its own
    (``limit_mm_per_prompt={"image": 0}``), the kept tokens arriving as embeddings."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: object = None) -> dict:
        return {}


class KeptTokensProcessor(BaseMultiModalProcessor[KeptTokensProcessingInfo]):
    """No HF processor runs: the prompt comes as token ids, the image as its kept embeddings."""

    def _get_mm_fields_config(self, hf_inputs: Mapping[str, object], hf_processor_mm_kwargs: Mapping[str, object]):
        return _field_config(hf_inputs)

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        token = placeholder_id(self.info.get_hf_config())

        def kept_tokens(i: int) -> list[int]:
            return [token] * int(mm_items.get_items("image", DictEmbeddingItems).get(i)["image_embeds"].shape[0])

        return [PromptReplacement(modality="image", target=[token], replacement=kept_tokens)]


class _KeptTokensLM(nn.Module, SupportsMultiModal):
    """The LLM of a VLM checkpoint, fed kept visual tokens as embeddings."""

    # Checkpoint names (transformers 5.x) -> this module's; the vision side is mapped to be skipped.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
        "model.vision_tower.": "vision_tower.",
        "model.multi_modal_projector.": "multi_modal_projector.",
        "model.image_newline": "image_newline",
    })
    skipped = ("vision_tower.", "multi_modal_projector.", "image_newline", "visual.")

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None  # requests come as token ids with the placeholder in them

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.configure_mm_token_handling(
            vocab_size=config.get_text_config().vocab_size, mm_token_ids=[placeholder_id(config)]
        )
        with self._mark_language_model(vllm_config):
            self.language_model = self._build_language_model(vllm_config, maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def _build_language_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return init_vllm_registered_model(vllm_config=vllm_config, hf_config=self.config.text_config, prefix=prefix)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        embeds = kwargs.get("image_embeds")
        if embeds is None:
            return []
        return list(embeds)  # per item [K_i, D], in prompt order

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: object = None,
        inputs_embeds: torch.Tensor | None = None, **kwargs: object,
    ) -> torch.Tensor:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=list(self.skipped))
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)


@MULTIMODAL_REGISTRY.register_processor(
    KeptTokensProcessor, info=KeptTokensProcessingInfo, dummy_inputs=KeptTokensDummyInputs
)
class ResPruneLlavaForCausalLM(_KeptTokensLM):
    """LLaVA-1.5 and LLaVA-NeXT: the kept tokens at contiguous positions, as in the stock model."""


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0, "deepstack": 1})
class DeepStackQwen3Model(Qwen3Model):
    """vLLM's Qwen3 decoder with DeepStack, as vLLM's stock Qwen3-VL LLM (whose module imports
    torchvision, so it cannot be imported here): ``deepstack`` [L, T, D] is added to the hidden
    states after layers 0 .. L-1 (zeros at text tokens). One pipeline stage only."""

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
        deepstack: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual)
            if deepstack is not None and index < deepstack.shape[0]:
                hidden = hidden + deepstack[index]
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DeepStackQwen3ForCausalLM(Qwen3ForCausalLM):
    """``Qwen3ForCausalLM`` (LM head, logits, weight loading) around ``DeepStackQwen3Model``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config, self.vllm_config, self.quant_config = config, vllm_config, vllm_config.quant_config
        self.model = DeepStackQwen3Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors


class _KeptMRoPELM(_KeptTokensLM, SupportsMRoPE):
    """The LLM fed kept tokens at their full-grid 3-D positions (Qwen2-VL's rule for images, which Qwen2.5-VL
    and Qwen3-VL share; equality with each model's own ``get_rope_index`` is tested)."""

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        images = []
        for feature in mm_features:
            data = feature.data
            if data is None or "image_grid_thw" not in data or "kept_indices" not in data:
                raise ValueError("kept tokens need image_grid_thw and kept_indices to be placed")
            images.append((feature.mm_position.offset, data["image_grid_thw"].data.tolist(), data["kept_indices"].data))
        return kept_mrope_positions(len(input_tokens), images, self.config.vision_config.spatial_merge_size)


@MULTIMODAL_REGISTRY.register_processor(
    KeptTokensProcessor, info=KeptTokensProcessingInfo, dummy_inputs=KeptTokensDummyInputs
)
class ResPruneQwen2_5_VLForCausalLM(_KeptMRoPELM):
    """Qwen2.5-VL: the kept tokens at their full-grid 3-D positions."""

    # Qwen2.5-VL checkpoints come in two layouts: transformers 5.x (model.language_model.*,
    # model.visual.*) and the original one (model.*, visual.*), which the hub's still uses.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.language_model.": "language_model.model.",
        "model.visual.": "visual.",
        "lm_head.": "language_model.lm_head.",
        "model.": "language_model.model.",
    })

    def _build_language_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        # As the stock class does: the Qwen2 decoder reads its M-RoPE sections from the full config.
        return init_vllm_registered_model(vllm_config=vllm_config, prefix=prefix, architectures=["Qwen2ForCausalLM"])


@MULTIMODAL_REGISTRY.register_processor(
    KeptTokensProcessor, info=KeptTokensProcessingInfo, dummy_inputs=KeptTokensDummyInputs
)
class ResPruneQwen3VLForCausalLM(_KeptMRoPELM):
    """Qwen3-VL: the kept tokens at their full-grid 3-D positions (interleaved M-RoPE), and each
    kept token's DeepStack rows added after LLM layers 0 .. L-1 at its position.

    As in vLLM's stock class: ``embed_multimodal`` gives per row [K, D * (1 + L)] (main tokens,
    then the levels), ``embed_input_ids`` scatters the main part into the placeholders and the
    levels into a persistent per-token buffer (fixed storage, as CUDA graphs need), which
    ``forward`` hands the LLM and then clears."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.language_model.": "language_model.model.",
        "model.visual.": "visual.",
        "lm_head.": "language_model.lm_head.",
    })

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.levels = len(self.config.vision_config.deepstack_visual_indexes)
        self.hidden = self.config.text_config.hidden_size
        tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.deepstack = torch.zeros(self.levels, tokens, self.hidden, dtype=vllm_config.model_config.dtype)
        self.pending = 0  # tokens of the buffer holding DeepStack rows not yet consumed

    def _build_language_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        text = vllm_config.with_hf_config(self.config.text_config, architectures=["Qwen3ForCausalLM"])
        return DeepStackQwen3ForCausalLM(vllm_config=text, prefix=prefix)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        embeds, levels = kwargs.get("image_embeds"), kwargs.get("deepstack_embeds")
        if embeds is None:
            return []
        if levels is None:
            raise ValueError("Qwen3-VL kept tokens need their DeepStack rows (deepstack_embeds [1, L, K, D])")
        # per item [K, D] and [L, K, D] -> [K, D * (1 + L)]
        return [torch.cat([e, d.permute(1, 0, 2).flatten(1).to(e.dtype)], dim=-1) for e, d in zip(embeds, levels)]

    def embed_input_ids(
        self, input_ids: torch.Tensor, multimodal_embeddings: list[torch.Tensor] | None = None, *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self._embed_text_input_ids(input_ids, self.language_model.embed_input_ids, is_multimodal=is_multimodal)
        if not multimodal_embeddings:
            return embeds
        rows = torch.cat(list(multimodal_embeddings))
        main, levels = rows.split([self.hidden, self.levels * self.hidden], dim=-1)
        mask = is_multimodal.to(embeds.device)
        embeds[mask] = main.to(embeds.dtype)
        n = len(input_ids)
        self._fit_buffer(embeds, n)[:, mask] = levels.view(-1, self.levels, self.hidden).permute(1, 0, 2).to(embeds.dtype)
        self.pending = n
        return embeds

    def _fit_buffer(self, like: torch.Tensor, n: int) -> torch.Tensor:
        """The DeepStack buffer's first ``n`` tokens [L, n, D]; the buffer is only ever replaced
        when it is too small or elsewhere (never in a captured step: it is sized to the scheduler's
        token budget)."""
        if self.deepstack.device != like.device or n > self.deepstack.shape[1]:
            self.deepstack = torch.zeros(self.levels, max(n, self.deepstack.shape[1]), self.hidden,
                                         dtype=like.dtype, device=like.device)
        return self.deepstack[:, :n]

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: object = None,
        inputs_embeds: torch.Tensor | None = None, **kwargs: object,
    ) -> torch.Tensor:
        if intermediate_tensors is not None:
            raise ValueError("pipeline parallelism is not supported: a decode actor holds the whole LLM")
        deepstack = self._fit_buffer(inputs_embeds, inputs_embeds.shape[0]) if inputs_embeds is not None else None
        hidden = self.language_model.model(input_ids, positions, inputs_embeds=inputs_embeds, deepstack=deepstack)
        if self.pending:  # consumed: the next step (decode) adds nothing unless new rows are set
            self.deepstack[:, : self.pending].zero_()
            self.pending = 0
        return hidden


class Qwen3_5DecoderLayer(Qwen3NextDecoderLayer):
    """vLLM's Qwen3.5 decoder layer (dense MLP; one pipeline stage, no tensor-parallel tricks),
    rebuilt here because vLLM's ``qwen3_5`` module imports its Qwen3-VL module, which imports
    torchvision: Gated DeltaNet (``linear_attention``) or gated full attention, then the MLP."""

    def __init__(self, vllm_config: VllmConfig, layer_type: str, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config, model_config = vllm_config.model_config.hf_text_config, vllm_config.model_config
        self.layer_type, self.layer_idx = layer_type, extract_layer_index(prefix)
        self.use_attn_reduce_scatter_for_moe = False
        if layer_type == "linear_attention":
            self.linear_attn = QwenGatedDeltaNetAttention(
                config=config, vllm_config=vllm_config, prefix=f"{prefix}.linear_attn", gqa_interleaved_layout=False)
        elif layer_type == "full_attention":
            self.self_attn = Qwen3NextAttention(
                config, model_config=model_config, cache_config=vllm_config.cache_config,
                quant_config=vllm_config.quant_config, prefix=f"{prefix}.self_attn", mrope_positions_factor=1)
        else:
            raise ValueError(f"unknown Qwen3.5 layer type {layer_type!r}")
        self.mlp = Qwen2MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                               hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                               prefix=f"{prefix}.mlp")
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layer_scale = False


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class Qwen3_5Model(Qwen3NextModel):
    """vLLM's Qwen3.5 decoder stack (``Qwen3NextModel`` with Qwen3.5's layers), the checkpoint's
    separate DeltaNet in-projections fused as vLLM's own class fuses them."""

    hf_to_vllm_mapper = Qwen3NextModel.hf_to_vllm_mapper | WeightsMapper(orig_to_new_stacked={
        ".in_proj_qkv": (".in_proj_qkvz", (0, 1, 2)), ".in_proj_z": (".in_proj_qkvz", 3),
        ".in_proj_b": (".in_proj_ba", 0), ".in_proj_a": (".in_proj_ba", 1),
    })

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_text_config
        self.config, self.quant_config, self.vocab_size = config, vllm_config.quant_config, config.vocab_size
        self.num_redundant_experts = 0
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: Qwen3_5DecoderLayer(vllm_config, config.layer_types[extract_layer_index(prefix)], prefix),
            prefix=f"{prefix}.layers",
        )
        self.is_fused_shared_expert_enabled = False
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.aux_hidden_state_layers: tuple[int, ...] = ()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class Qwen3_5LM(nn.Module):
    """``Qwen3_5Model`` with its LM head (as vLLM's ``Qwen3_5ForCausalLM``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_text_config
        self.config = config
        self.model = Qwen3_5Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)


@MULTIMODAL_REGISTRY.register_processor(
    KeptTokensProcessor, info=KeptTokensProcessingInfo, dummy_inputs=KeptTokensDummyInputs
)
class ResPruneQwen3_5ForCausalLM(_KeptMRoPELM, IsHybrid, HasInnerState):
    """Qwen3.5: the kept tokens at their full-grid 3-D positions (interleaved M-RoPE, as Qwen3-VL;
    no DeepStack) in the hybrid decoder. vLLM keeps each sequence's DeltaNet state in its
    "mamba" cache, sized by the classmethods below (vLLM asks the registered class)."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.language_model.": "language_model.model.",
        "model.visual.": "visual.",
        "lm_head.": "language_model.lm_head.",
        "mtp.": "mtp.",  # the checkpoint's multi-token-prediction head: not used
    })
    skipped = (*_KeptMRoPELM.skipped, "mtp.")

    def _build_language_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return Qwen3_5LM(vllm_config=vllm_config.with_hf_config(self.config.text_config), prefix=prefix)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
        cache = vllm_config.cache_config
        return MambaStateDtypeCalculator.gated_delta_net_state_dtype(
            vllm_config.model_config.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int], tuple[int, int]]:
        tc = vllm_config.model_config.hf_text_config
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            vllm_config.parallel_config.tensor_parallel_size, tc.linear_num_key_heads, tc.linear_num_value_heads,
            tc.linear_key_head_dim, tc.linear_value_head_dim, tc.linear_conv_kernel_dim, 0)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()


ARCHITECTURES = {
    cls.__name__: cls for cls in (ResPruneLlavaForCausalLM, ResPruneQwen2_5_VLForCausalLM, ResPruneQwen3VLForCausalLM,
                                  ResPruneQwen3_5ForCausalLM)
}


def register() -> None:
    """vLLM general plugin (entry point ``vllm.general_plugins``): runs in every vLLM process."""
    from vllm import ModelRegistry

    for name, cls in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, cls)
