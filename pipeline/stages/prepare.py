"""Stage 2 (CPU): decode each image and do the CPU's share of the family's image processor, so
the GPU encode actors receive compact uint8 pixels at the model's input size and do GPU work only."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.config import InputConfig, ModelConfig, PrepareStageConfig
from pipeline.io.fetch import IMAGE_ERROR
from pipeline.io.images import decode_image, draft_target
from pipeline.io.storage import Location
from pipeline.models import load_adapter, payload_bytes

from .common import Batch, Stopwatch, as_lists, errors_of, limit_torch_threads, map_splitting_failures, ok_rows
from .faults import crash


class PrepareStage:
    """Drops ``image``; adds ``prepared_image`` (the family's ``Prepared`` as ``payload_bytes``,
    b"" on error rows; for the encode stage) and ``prepare_ms``. Image errors are
    ``pipeline.io.images``' (``decode_image``, unchanged) or, for an image read by reference or
    from a tar shard, the reader's (``image_error``, dropped here); a processor that raises on one
    image gives that row ``prepare failed: ...``."""

    def __init__(
        self, model: ModelConfig, inputs: InputConfig, stage: PrepareStageConfig, source: Location | None = None,
    ) -> None:
        limit_torch_threads(stage.num_cpus)
        self.adapter = load_adapter(model, "image", source)
        self.max_pixels = inputs.max_image_pixels
        self.min_side = inputs.min_image_side
        margin = inputs.jpeg_draft_margin
        self.draft = draft_target(self.adapter.input_size, margin) if margin is not None else None

    def __call__(self, batch: Batch) -> Batch:
        crash("prepare", [str(i) for i in batch["id"]])
        n = len(batch["id"])
        errors = errors_of(batch)
        watch = Stopwatch()
        # A reader that could not give a row its image said why (pipeline.io.fetch, the tar reader).
        for i, reason in enumerate(batch.pop(IMAGE_ERROR, [""] * n)):
            if reason and not errors[i]:
                errors[i] = str(reason)
        images: dict[int, Image.Image] = {}
        for i in ok_rows(errors):
            decoded = decode_image(batch["image"][i], self.max_pixels, self.min_side, self.draft)
            if isinstance(decoded, str):
                errors[i] = decoded
            else:
                images[i] = decoded
        rows = list(images)
        prepared = map_splitting_failures(self._prepare, [images[i] for i in rows], "prepare")
        out = np.empty(n, dtype=object)
        out[:] = [b""] * n
        for i, result in zip(rows, prepared, strict=True):
            if isinstance(result, str):
                errors[i] = result
            else:
                out[i] = result
        batch.pop("image")
        batch["prepared_image"] = out
        batch["error"] = np.array(errors, dtype=object)
        batch["prepare_ms"] = watch.per_row_ms(errors)
        return as_lists(batch)

    def _prepare(self, images: list[Image.Image]) -> list[bytes]:
        return [payload_bytes(self.adapter.prepare_image(image)) for image in images]
