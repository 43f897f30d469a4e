"""The CPU side of a plan: how many CPU cores the preparation stage needs to keep a GPU fed.

The data is a table of CPU milliseconds per image in the preparation stage (``PrepareStage``:
decode, then the family processor's resize, one thread), per family and image size, measured by
``python -m pipeline.bench.feed --write-table configs/cpu_prepare.yaml`` and stamped with its
date and machine like ``configs/accelerators.yaml``. From it:

    cores per GPU      = prepare_ms x GPU images/s / 1000   (cores to keep one GPU busy)
    CPU images/s       = cores x 1000 / prepare_ms          (what ``cores`` prepare)

The cores a config gives each GPU (``prepare_cores_per_gpu``) count each preparation actor as
``min(num_cpus, 1)`` cores: an actor prepares one image at a time on one thread (PIL), so more
than one CPU reserved per actor buys no speed, and a fraction is the share of a core Ray
guarantees it. Plain functions, no Ray.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from pipeline.config import JobConfig

DEFAULT_TABLE = "configs/cpu_prepare.yaml"
SIZE = re.compile(r"(\d+)x(\d+)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Measured(_Strict):
    date: str = Field(min_length=1, description="When the table was measured (ISO date).")
    machine: str = Field(min_length=1, description="What it was measured on (CPU model, cores, load).")
    command: str = Field(min_length=1, description="The command that measured it.")
    jpeg_draft_margin: float | None = Field(
        description="input.jpeg_draft_margin the measurement ran with (null: every pixel decoded).")


class CpuTable(_Strict):
    measured: Measured
    prepare_ms: dict[str, dict[str, float]] = Field(
        description="family -> \"WxH\" -> CPU milliseconds per image in the preparation stage, one thread.")

    @field_validator("prepare_ms")
    @classmethod
    def _sizes_and_families(cls, table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        from pipeline.models import ADAPTERS  # the families are their adapters: no second list

        for family, sizes in table.items():
            if family not in ADAPTERS:
                raise ValueError(f"{family}: not a family (one of {', '.join(ADAPTERS)})")
            if not sizes:
                raise ValueError(f"{family}: no measured size")
            for size, ms in sizes.items():
                m = SIZE.fullmatch(size)
                if not m or not int(m[1]) or not int(m[2]):
                    raise ValueError(f"{family}.{size}: want WIDTHxHEIGHT, e.g. 1280x960")
                if not ms > 0 or not math.isfinite(ms):
                    raise ValueError(f"{family}.{size}: {ms} ms: want a positive number")
        return table

    def source(self) -> str:
        """Where the figures came from, for a plan's notes and the job's warning."""
        m = self.measured
        margin = "full decode" if m.jpeg_draft_margin is None else f"jpeg_draft_margin {m.jpeg_draft_margin:g}"
        return f"measured {m.date} on {m.machine}, {margin}"


def load_cpu_table(path: str | Path = DEFAULT_TABLE, field: str = "--cpu-table") -> CpuTable:
    """The table at ``path`` (relative: the working directory, then the repository root); a bad
    file is a ConfigError naming ``field`` and the offending entry."""
    from .prices import _load

    return _load(path, CpuTable, field)


def parse_size(size: str) -> tuple[int, int]:
    m = SIZE.fullmatch(size)
    if not m:
        raise ValueError(f"{size!r}: want WIDTHxHEIGHT")
    return int(m[1]), int(m[2])


def sizes(table: CpuTable, family: str) -> list[str]:
    """The family's measured sizes, smallest pixel count first."""
    return sorted(table.prepare_ms[family], key=lambda s: math.prod(parse_size(s)))


def reference_size(table: CpuTable, family: str) -> str:
    """The middle of the family's measured sizes by pixel count (the lower middle of an even
    count): 1280x960 of 640x480 / 1280x960 / 4032x3024, the size the cluster configs are sized at."""
    measured = sizes(table, family)
    return measured[(len(measured) - 1) // 2]


def prepare_ms(table: CpuTable, family: str, width: int, height: int) -> float:
    """CPU milliseconds to prepare one ``width`` x ``height`` image of ``family``: the measured
    figure when that size was measured; else linear in the pixel count between the two measured
    sizes nearest it (sizes of equal pixel count averaged), clamped at the ends (an image smaller
    than the smallest measured size costs what that one does, likewise the largest). KeyError
    for a family the table does not hold."""
    measured = table.prepare_ms[family]
    exact = measured.get(f"{width}x{height}")
    if exact is not None:
        return exact
    by_pixels: dict[int, list[float]] = {}
    for size, ms in measured.items():
        by_pixels.setdefault(math.prod(parse_size(size)), []).append(ms)
    points = sorted((p, sum(v) / len(v)) for p, v in by_pixels.items())
    pixels = width * height
    if pixels <= points[0][0]:
        return points[0][1]
    if pixels >= points[-1][0]:
        return points[-1][1]
    for (p0, ms0), (p1, ms1) in zip(points, points[1:]):
        if p0 <= pixels <= p1:
            return ms0 + (ms1 - ms0) * (pixels - p0) / (p1 - p0)
    raise AssertionError("unreachable: pixels lies between the ends")


def cores_per_gpu(prepare_ms: float, gpu_images_per_second: float) -> float:
    """CPU cores that prepare ``gpu_images_per_second`` images of ``prepare_ms`` each: what keeps
    one GPU fed."""
    return prepare_ms * gpu_images_per_second / 1000


def cpu_images_per_second(prepare_ms: float, cores: float) -> float:
    """Images per second that ``cores`` CPU cores prepare at ``prepare_ms`` each."""
    return cores * 1000 / prepare_ms


def gpus_at_full_size(cfg: JobConfig) -> float:
    """GPUs the config's GPU pools reserve at full size: max_pool_size (else pool_size) x num_gpus,
    summed over the stages that reserve GPUs (the encode and decode actors of a replica share one)."""
    return sum((s.max_pool_size or s.pool_size) * s.num_gpus for s in cfg.stages().values() if s.num_gpus > 0)


def prepare_cores(cfg: JobConfig) -> float:
    """Cores the preparation pool prepares with at full size: max_pool_size (else pool_size) x
    min(num_cpus, 1) (one thread per actor, see the module's docstring)."""
    stage = cfg.prepare_stage
    return (stage.max_pool_size or stage.pool_size) * min(stage.num_cpus, 1.0)


def prepare_cores_per_gpu(cfg: JobConfig) -> float | None:
    """``prepare_cores`` / ``gpus_at_full_size``: the preparation cores each GPU of the GPU pools
    gets when every pool is at full size. None for a config without GPU pools."""
    gpus = gpus_at_full_size(cfg)
    return prepare_cores(cfg) / gpus if gpus > 0 else None
