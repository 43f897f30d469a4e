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

from .flops import ModelShapes, RowFlops, row_flops, state_bytes, vision_flops
from .prices import Price, PriceTable, load_prices

FLOP_CONVENTION = (
    "2 FLOPs per multiply-add, matrix products only, full L x L attention scores (as "
    "torch.utils.flop_counter.FlopCounterMode counts); LM head once per generated token"
)


@dataclass(frozen=True)
class TaskTokens:
    """One answered task of an image: what its sequence held and generated."""

    visual_tokens_kept: int
    prompt_tokens: int  # text + kept visual tokens prefilled
    generated_tokens: int


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
        """A numpy-format batch after the decode stage -> the same batch with the cost columns
        per image, and per task ``task_flops`` (its prefill and decode) and ``task_kv_cache_bytes``."""
        n = len(batch["id"])
        out: dict[str, list] = {c: [None] * n for c in COST_COLUMNS}
        task_flops: list[list] = []
        task_kv: list[list] = []
        for i in range(n):
            errors = batch["task_error"][i]
            task_flops.append([None] * len(errors))
            task_kv.append([None] * len(errors))
            if batch["error"][i]:
                continue  # error rows carry nulls, not zeros pretending to be costs
            kept = batch["kept_indices"][i]
            answered = {
                j: TaskTokens(visual_tokens_kept=len(kept[int(batch["task_selection"][i][j])]),
                              prompt_tokens=int(batch["task_prompt_tokens"][i][j]),
                              generated_tokens=int(batch["task_generated_tokens"][i][j]))
                for j, e in enumerate(errors) if not e
            }
            image, per_task = self.row(
                visual_tokens_in=int(batch["visual_tokens_in"][i]), encoder_patches=int(batch["encoder_patches"][i]),
                tasks=list(answered.values()), stage_ms={c: float(batch[c][i]) for s in self.stages for c in s.time_columns},
            )
            for name, value in image.items():
                out[name][i] = value
            for j, f in zip(answered, per_task, strict=True):
                task_flops[i][j], task_kv[i][j] = f.prefill + f.decode, f.kv_cache_bytes
        for name, values in out.items():
            batch[name] = np.array(values, dtype=object)
        batch["task_flops"] = task_flops
        batch["task_kv_cache_bytes"] = task_kv
        return batch

    def row(
        self, *, visual_tokens_in: int, encoder_patches: int, tasks: list[TaskTokens], stage_ms: dict[str, float],
    ) -> tuple[dict[str, float | int], list[RowFlops]]:
        """One image's cost columns, and each task's counts. The image is encoded once, so its
        vision FLOPs count once however many tasks it answered; each task adds its own prefill,
        decode and KV cache (its sequence holds the image's kept tokens and its own prompt)."""
        per_task = [
            row_flops(
                self.shapes, visual_tokens_in=visual_tokens_in, visual_tokens_kept=t.visual_tokens_kept,
                encoder_patches=encoder_patches, prompt_tokens=t.prompt_tokens, generated_tokens=t.generated_tokens,
                bytes_per_element=self.kv_bytes_per_element,
            )
            for t in tasks
        ]
        vision = vision_flops(self.shapes.vision, encoder_patches)
        prefill = sum(f.prefill for f in per_task)
        prefill_unpruned = sum(f.prefill_unpruned for f in per_task)
        decode = sum(f.decode for f in per_task)
        decode_unpruned = sum(f.decode_unpruned for f in per_task)
        gpu_s = cpu_s = cpu_only_s = 0.0
        for s in self.stages:
            seconds = sum(stage_ms[c] for c in s.time_columns) / 1e3
            gpu_s += seconds * s.num_gpus
            cpu_s += seconds * s.num_cpus
            if s.num_gpus == 0:
                cpu_only_s += seconds * s.num_cpus
        return {
            "flops_vision": vision,
            "flops_prefill": prefill,
            "flops_prefill_unpruned": prefill_unpruned,
            "flops_decode": decode,
            "flops_total": vision + prefill + decode,
            "flops_total_unpruned": vision + prefill_unpruned + decode_unpruned,
            "kv_cache_bytes": sum(f.kv_cache_bytes for f in per_task),
            "kv_cache_bytes_unpruned": sum(f.kv_cache_bytes_unpruned for f in per_task),
            "gpu_seconds": gpu_s,
            "cpu_seconds": cpu_s,
            "cost_usd": self.usd(gpu_s, cpu_only_s),
        }, per_task

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
            # A hybrid decoder's linear-attention layers hold this much per sequence (each task's
            # answer is one) whatever its length: pruning does not shrink it. 0 for a dense decoder.
            "recurrent_state_bytes_per_sequence": state_bytes(self.shapes.language, self.kv_bytes_per_element),
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
