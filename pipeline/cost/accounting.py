"""Per-row cost columns in the job, and the run-level totals for the summary and manifest.

A row's ``gpu_seconds`` / ``cpu_seconds`` are each stage's measured time for that row (batch
wall time / rows in the batch) times what that stage's actors reserve. ``cost_usd`` prices
GPU-seconds at the accelerator's hourly price and CPU-seconds of CPU-only stages at the CPU
core's price: a cloud GPU's price already includes its host's CPUs. Start-up, idle actors and
read/write tasks are not in any row; the manifest reports them as the run's reservation
against what the rows account for (``utilisation``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import ConfigError, JobConfig
from pipeline.io.schema import COST_COLUMNS, STAGE_TIME_COLUMNS

from .flops import ModelShapes, row_flops
from .prices import Price, PriceTable, load_prices

FLOP_CONVENTION = (
    "2 FLOPs per multiply-add, matrix products only, full L x L attention scores (as "
    "torch.utils.flop_counter.FlopCounterMode counts); LM head once per generated token"
)


@dataclass(frozen=True)
class StageBilling:
    name: str
    time_columns: tuple[str, ...]
    num_cpus: float
    num_gpus: float
    pool_size: int
    max_pool_size: int  # the most actors the pool may grow to (pool_size when fixed)


@dataclass(frozen=True)
class CostModel:
    """Everything the per-row cost step needs, built once in the driver and shipped to Ray tasks."""

    shapes: ModelShapes
    kv_bytes_per_element: int
    stages: tuple[StageBilling, ...]
    accelerator: str | None
    accelerator_price: Price | None
    cpu_core_price: Price

    @classmethod
    def for_job(cls, cfg: JobConfig, shapes: ModelShapes, kv_bytes_per_element: int) -> CostModel:
        prices = load_prices(cfg.cost.prices)
        return cls(
            shapes=shapes,
            kv_bytes_per_element=kv_bytes_per_element,
            stages=tuple(
                StageBilling(name, STAGE_TIME_COLUMNS[name], s.num_cpus, s.num_gpus, s.pool_size,
                             s.max_pool_size or s.pool_size)
                for name, s in cfg.stages().items()
            ),
            accelerator=cfg.cost.accelerator,
            accelerator_price=accelerator_price(prices, cfg.cost.accelerator),
            cpu_core_price=prices.cpu_core,
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A numpy-format batch after the decode stage -> the same batch with the cost columns."""
        n = len(batch["id"])
        out: dict[str, list] = {c: [None] * n for c in COST_COLUMNS}
        for i in range(n):
            if batch["error"][i]:
                continue  # error rows carry nulls, not zeros pretending to be costs
            for name, value in self.row(
                visual_tokens_in=int(batch["visual_tokens_in"][i]),
                visual_tokens_kept=int(batch["visual_tokens_kept"][i]),
                encoder_patches=int(batch["encoder_patches"][i]),
                prompt_tokens=int(batch["prompt_tokens"][i]),
                generated_tokens=int(batch["generated_tokens"][i]),
                stage_ms={c: float(batch[c][i]) for s in self.stages for c in s.time_columns},
            ).items():
                out[name][i] = value
        for name, values in out.items():
            batch[name] = np.array(values, dtype=object)
        return batch

    def row(
        self, *, visual_tokens_in: int, visual_tokens_kept: int, encoder_patches: int, prompt_tokens: int,
        generated_tokens: int, stage_ms: dict[str, float],
    ) -> dict[str, float | int]:
        f = row_flops(
            self.shapes, visual_tokens_in=visual_tokens_in, visual_tokens_kept=visual_tokens_kept,
            encoder_patches=encoder_patches, prompt_tokens=prompt_tokens, generated_tokens=generated_tokens,
            bytes_per_element=self.kv_bytes_per_element,
        )
        gpu_s = cpu_s = cpu_only_s = 0.0
        for s in self.stages:
            seconds = sum(stage_ms[c] for c in s.time_columns) / 1e3
            gpu_s += seconds * s.num_gpus
            cpu_s += seconds * s.num_cpus
            if s.num_gpus == 0:
                cpu_only_s += seconds * s.num_cpus
        return {
            "flops_vision": f.vision,
            "flops_prefill": f.prefill,
            "flops_prefill_unpruned": f.prefill_unpruned,
            "flops_decode": f.decode,
            "flops_total": f.total,
            "flops_total_unpruned": f.total_unpruned,
            "kv_cache_bytes": f.kv_cache_bytes,
            "kv_cache_bytes_unpruned": f.kv_cache_bytes_unpruned,
            "gpu_seconds": gpu_s,
            "cpu_seconds": cpu_s,
            "cost_usd": self.usd(gpu_s, cpu_only_s),
        }

    def usd(self, gpu_seconds: float, cpu_only_core_seconds: float) -> float:
        gpu_rate = self.accelerator_price.usd_per_hour if self.accelerator_price else 0.0
        return (gpu_seconds * gpu_rate + cpu_only_core_seconds * self.cpu_core_price.usd_per_hour) / 3600.0

    def run_totals(self, rows: list[dict[str, Any]], wall_seconds: float, io_num_cpus: float) -> dict[str, Any]:
        """Totals and means of every cost column over the answered rows, each stage's busy time
        and throughput, the stage that bounded the run, and the run's reservation (actors started
        up front x wall time). The bound is the stage with the most busy time per actor of its
        largest pool: the one whose actors had the least idle time to give."""
        ok = [r for r in rows if not r["error"]]
        totals = {c: sum(r[c] for r in ok) for c in COST_COLUMNS}
        stages = {}
        for s in self.stages:
            busy = sum(r[c] for r in ok for c in s.time_columns) / 1e3
            stages[s.name] = {
                "num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "pool_size": s.pool_size,
                "max_pool_size": s.max_pool_size, "busy_seconds": busy,
                "busy_seconds_per_actor": busy / s.max_pool_size,
                "images_per_second": len(ok) / busy if busy > 0 else None,
            }
        busiest = max(stages, key=lambda name: stages[name]["busy_seconds_per_actor"]) if ok else None
        gpus = sum(s.pool_size * s.num_gpus for s in self.stages)
        cpus = io_num_cpus + sum(s.pool_size * s.num_cpus for s in self.stages)
        cpu_only = io_num_cpus + sum(s.pool_size * s.num_cpus for s in self.stages if s.num_gpus == 0)
        reserved_usd = self.usd(gpus * wall_seconds, cpu_only * wall_seconds)
        return {
            "accelerator": self.accelerator,
            "prices": {
                "accelerator": self.accelerator_price.model_dump() if self.accelerator_price else None,
                "cpu_core": self.cpu_core_price.model_dump(),
            },
            "flop_convention": FLOP_CONVENTION,
            "kv_bytes_per_element": self.kv_bytes_per_element,
            "shapes": asdict(self.shapes),
            "totals": totals,
            "mean_per_image": {c: (v / len(ok) if ok else None) for c, v in totals.items()},
            "stages": stages,
            "bound_by": busiest,
            "reserved": {
                "gpus": gpus, "cpus": cpus, "wall_seconds": wall_seconds,
                "gpu_seconds": gpus * wall_seconds, "cpu_seconds": cpus * wall_seconds, "usd": reserved_usd,
                # Share of the reservation the rows account for; the rest is start-up, idle and I/O.
                "utilisation": totals["cost_usd"] / reserved_usd if reserved_usd > 0 else None,
            },
        }


def accelerator_price(prices: PriceTable, accelerator: str | None) -> Price | None:
    if accelerator is None:
        return None
    if accelerator not in prices.accelerators:
        raise ConfigError(
            f"cost.accelerator: {accelerator!r} is not in the price table; known: {', '.join(sorted(prices.accelerators))}"
        )
    return prices.accelerators[accelerator]
