"""Price and accelerator tables: data in YAML (``configs/prices.yaml``, ``configs/accelerators.yaml``),
each figure with its source and date. No price or hardware figure is written in code."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPO_ROOT = Path(__file__).resolve().parents[2]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    usd_per_hour: float = Field(gt=0, description="List price for one unit (one GPU, or one CPU core) for one hour.")
    source: str = Field(min_length=1, description="Where the figure comes from (page, offer).")
    date: str = Field(min_length=1, description="When the source stated it (ISO date).")
    note: str = ""


class PriceTable(_Strict):
    currency: str = "USD"
    accelerators: dict[str, Price] = Field(description="Per-GPU hourly price, by accelerator type.")
    cpu_core: Price = Field(description="Hourly price of one CPU core (vCPU) for CPU-only stages.")


class Accelerator(_Strict):
    bf16_flops: float = Field(gt=0, description="Dense bf16 matrix-product ceiling, FLOP/s.")
    memory_bandwidth: float = Field(gt=0, description="Memory bandwidth ceiling, bytes/s.")
    memory_bytes: float = Field(gt=0, description="Accelerator memory, bytes.")
    source: str = Field(min_length=1)
    date: str = Field(min_length=1)


class Utilisation(_Strict):
    """What an estimate assumes a real run achieves of the ceilings (stated next to every estimate)."""

    vision_mfu: float = Field(gt=0, le=1, description="Fraction of bf16_flops the vision encoder reaches.")
    prefill_mfu: float = Field(gt=0, le=1, description="Fraction of bf16_flops the LLM prefill reaches (compute-bound).")
    decode_bandwidth: float = Field(gt=0, le=1, description="Fraction of memory_bandwidth a decode step reaches (memory-bound).")
    decode_batch: int = Field(ge=1, description="Rows decoded together: each step reads the weights once for the batch.")
    generated_tokens: int = Field(ge=1, description="Tokens generated per image.")
    text_tokens: int = Field(ge=0, description="Prompt tokens besides the visual ones (template + question).")
    source: str = ""


class AcceleratorTable(_Strict):
    accelerators: dict[str, Accelerator]
    assumptions: Utilisation


M = TypeVar("M", bound=BaseModel)


def resolve_table_path(path: str | Path) -> Path:
    """A relative path is looked up in the working directory, then in the repository root (where
    ``configs/`` ships), so the defaults work from any directory and under ``ray job submit``."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def _load(path: str | Path, model: type[M], field: str) -> M:
    from pipeline.config import ConfigError

    resolved = resolve_table_path(path)
    try:
        raw = yaml.safe_load(resolved.read_text())
        return model.model_validate(raw)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{field}: cannot read {path}: {e}") from e
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{field}: invalid {path}: {problems}") from None


def load_prices(path: str | Path) -> PriceTable:
    return _load(path, PriceTable, "cost.prices")


def load_accelerators(path: str | Path) -> AcceleratorTable:
    return _load(path, AcceleratorTable, "accelerators")
