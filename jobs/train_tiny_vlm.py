"""Train ``tiny:llava-shapes``: a small LLaVA-1.5 (real transformers classes) that answers
questions about the shapes world, from scratch, on a 2-core CPU.

    python jobs/train_tiny_vlm.py [--out pipeline/models/checkpoints/tiny-llava-shapes] [--minutes 45]

Recipe (seeded; every choice is here):
- Data: scenes drawn on the fly from ``pipeline.io.sample_corpus`` with training seeds
  (``TRAIN_SEED`` + step), never the evaluation seeds. Images go through the checkpoint's own
  processor (pad to square, resize to 336), so training sees exactly what inference sees.
- Each image is one conversation of ``QUESTIONS_PER_IMAGE`` question turns (every type, shuffled);
  the first turn is exactly what inference asks (image, question, "ASSISTANT:"), later turns are
  appended. Every answer is supervised, so one LLM pass over the 576 visual tokens (most of a
  step's cost) teaches many answers.
- Loss: next-token cross-entropy on each answer word and EOS (LLaVA's instruction loss), plus a
  dense auxiliary loss on the visual tokens (``AuxHead``, training-only, dropped before saving):
  each patch's colour and shape scored against the LLM's own word embeddings (an alignment
  stage, as LLaVA's projector pre-training), whether it holds an object's centre and which side
  of the middle it is on, from the scene's label map.
- The LLM sees every visual token in training (no pruning, no token dropout): pruning stays
  training-free, as with real LLaVA checkpoints.
- AdamW, linear warm-up then cosine decay over ``--steps``; ``--minutes`` bounds the wall time
  (reported) so the script cannot run away.
- At the end: accuracy on ``--eval-rows`` held-out rows (seed ``HELD_OUT_SEED``) with every visual
  token kept, through the checkpoint reloaded with ``from_pretrained``; one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io.sample_corpus import COLOURS, QUESTION_TYPES, SHAPES, Scene, ask, draw_scene  # noqa: E402
from pipeline.models.tiny import CHECKPOINTS, new_tiny_llava, save_checkpoint  # noqa: E402
from pipeline.quality.scoring import is_correct  # noqa: E402

TRAIN_SEED = 10_000_000  # scenes for step s use seed TRAIN_SEED + s
HELD_OUT_SEED = 77  # held-out corpora use other seeds (tests: 4242)
QUESTIONS_PER_IMAGE = 12
GRID = 24  # 336 / 14


def aux_targets(scene: Scene) -> torch.Tensor:
    """[GRID*GRID, 5] long per patch: colour class, shape class (0 = background), whether it holds
    an object's centre, whether it lies left of the middle (object patches only; -1 elsewhere) and
    which object covers it (1-based, 0 for none), in the geometry of the processor's pad-to-square
    (image centred on the padded square)."""
    w, h = scene.size
    side = max(w, h)
    labels = Image.new("L", (side, side), 0)
    labels.paste(scene.label_map(), ((side - w) // 2, (side - h) // 2))
    grid = np.asarray(labels.resize((GRID, GRID), Image.NEAREST)).reshape(-1)
    colour_ids = {c: i + 1 for i, c in enumerate(COLOURS)}
    shape_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    out = torch.zeros(GRID * GRID, 5, dtype=torch.long)
    out[:, 3] = -1
    left = torch.arange(GRID).repeat(GRID) < GRID / 2
    for k, obj in enumerate(scene.objects, start=1):
        mask = torch.from_numpy(grid == k)
        out[mask, 0] = colour_ids[obj.colour]
        out[mask, 1] = shape_ids[obj.shape]
        out[mask, 3] = left[mask].long()
        out[mask, 4] = k
        px = int((obj.cx + (side - w) / 2) / side * GRID)
        py = int((obj.cy + (side - h) / 2) / side * GRID)
        out[min(py, GRID - 1) * GRID + min(px, GRID - 1), 2] = 1
    return out


class Batcher:
    """Scenes -> pixel values, per-question token ids (prompt, answer + EOS) and aux targets."""

    def __init__(self, processor, questions_per_image: int) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.q = questions_per_image
        self.image_token_id = self.tok.convert_tokens_to_ids("<image>")

    def prompt_ids(self, prompt: str) -> list[int]:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tok(self.processor.apply_chat_template(conversation, add_generation_prompt=True)).input_ids

    def answer_ids(self, answer: str) -> list[int]:
        return self.tok(answer, add_special_tokens=False).input_ids + [self.tok.eos_token_id]

    def turn_ids(self, prompt: str) -> list[int]:
        """A later turn of the same conversation (no image)."""
        conversation = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        return self.tok(self.processor.apply_chat_template(conversation, add_generation_prompt=True)).input_ids

    def make(self, seed: int, images: int) -> dict:
        """One conversation per image: ``self.q`` question turns, the first exactly as inference
        asks it (image, question, "ASSISTANT:"), the later ones appended as further turns. Every
        answer is supervised, so one LLM pass over the 576 visual tokens teaches ``self.q`` answers."""
        rng = random.Random(seed)
        scenes = [draw_scene(rng) for _ in range(images)]
        pixels = self.processor.image_processor(images=[s.render() for s in scenes], return_tensors="pt")["pixel_values"]
        convs = []
        for scene in scenes:
            types = [t for _ in range(-(-self.q // len(QUESTION_TYPES))) for t in rng.sample(QUESTION_TYPES, k=len(QUESTION_TYPES))]
            turns = []
            for k, t in enumerate(types[: self.q]):
                prompt, answer, qtype = ask(rng, scene, t)
                ids = self.prompt_ids(prompt) if k == 0 else self.turn_ids(prompt)
                turns.append((ids, self.answer_ids(answer), qtype))
            convs.append(turns)
        return {"pixels": pixels, "convs": convs, "aux": torch.stack([aux_targets(s) for s in scenes])}


def _features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The projector's output for every patch, [B, 576, D]: what the LLM receives."""
    cfg = model.config
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    hidden = out.hidden_states[cfg.vision_feature_layer][:, 1:]  # "default": CLS dropped
    return model.model.multi_modal_projector(hidden)


def lm_loss(model, feats: torch.Tensor, convs: list, image_token_id: int) -> tuple[torch.Tensor, dict[str, list[bool]]]:
    """Cross-entropy on every answer; row i is image i's conversation with its visual tokens
    spliced at <image>, right-padded. Returns (loss, per question type: answer right under
    teacher forcing)."""
    embed = model.get_input_embeddings()
    rows, labels, kinds = [], [], []
    for i, turns in enumerate(convs):
        ids = torch.tensor([t for p_ids, a_ids, _ in turns for t in p_ids + a_ids])
        lab = torch.tensor([t for p_ids, a_ids, _ in turns for t in [-100] * len(p_ids) + a_ids])
        p = int((ids == image_token_id).nonzero()[0])
        e = embed(ids)
        rows.append(torch.cat([e[:p], feats[i], e[p + 1 :]]))
        labels.append(torch.cat([lab[:p], torch.full((feats.shape[1],), -100), lab[p + 1 :]]))
        kinds += [(qtype, len(a_ids)) for _, a_ids, qtype in turns]
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for k, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        x[k, : len(r)], mask[k, : len(r)], y[k, : len(r)] = r, 1, lab
    hidden = model.model.language_model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    target = y[:, 1:]
    pos = target != -100
    logits = model.lm_head(hidden[:, :-1][pos])  # only answer positions need the LM head
    loss = F.cross_entropy(logits, target[pos])
    hits = (logits.argmax(-1) == target[pos]).split([n for _, n in kinds])
    right: dict[str, list[bool]] = {}
    for (qtype, _), h in zip(kinds, hits, strict=True):
        right.setdefault(qtype, []).append(bool(h.all()))
    return loss, right


class AuxHead(torch.nn.Module):
    """Training-only dense supervision of the visual tokens (dropped before saving).

    Colour and shape are scored by cosine against the LLM's own input embeddings of the words
    ("red", ..., "circle", ..., "background" for empty patches), as LLaVA's alignment stage puts
    visual tokens in the word-embedding space: the LLM can then find "the circle" by attention,
    and ResPrune's relevance (visual token vs noun embedding cosine) means what it should.
    Object centre and side of the middle are two linear logits.

    The shape is also asked of each *object*: its patches and a one-patch ring around them,
    pooled. Per patch, the shape is nearly unlearnable for a tower trained from scratch (an
    interior patch looks the same for every shape; a probe stays at chance), while the pooled
    outline tells it apart within a few hundred steps, so the tower learns outline features."""

    def __init__(self, width: int, tokenizer) -> None:
        super().__init__()
        word = lambda w: tokenizer(w, add_special_tokens=False).input_ids[-1]  # noqa: E731
        self.register_buffer("colour_ids", torch.tensor([word("background")] + [word(c) for c in COLOURS]))
        self.register_buffer("shape_ids", torch.tensor([word("background")] + [word(s) for s in SHAPES]))
        self.linear = torch.nn.Linear(width, 2)
        self.scale = 10.0

    def forward(self, embed: torch.nn.Embedding, feats: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        f = F.normalize(feats, dim=-1)
        colour = self.scale * f @ F.normalize(embed.weight[self.colour_ids], dim=-1).T
        shape = self.scale * f @ F.normalize(embed.weight[self.shape_ids], dim=-1).T
        loss = F.cross_entropy(colour.flatten(0, 1), aux[..., 0].flatten()) \
            + F.cross_entropy(shape.flatten(0, 1), aux[..., 1].flatten())
        centre, side = self.linear(feats).unbind(-1)
        loss = loss + F.binary_cross_entropy_with_logits(centre.flatten(), aux[..., 2].float().flatten(),
                                                         pos_weight=torch.tensor(20.0))
        on_object = aux[..., 3] >= 0
        loss = loss + F.binary_cross_entropy_with_logits(side[on_object], aux[..., 3][on_object].float())
        return loss + self.object_shape_loss(embed, feats, aux)

    def object_shape_loss(self, embed: torch.nn.Embedding, feats: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        objects = aux[..., 4]  # [B, N]
        n = int(objects.max())
        if n == 0:
            return feats.new_zeros(())
        one_hot = F.one_hot(objects, n + 1)[..., 1:].float()  # [B, N, n]
        grid = one_hot.transpose(1, 2).reshape(-1, 1, GRID, GRID)
        ring = F.max_pool2d(grid, 3, 1, 1).reshape(one_hot.shape[0], n, -1)  # [B, n, N]
        present = one_hot.sum(1) > 0  # [B, n]
        pooled = (ring @ feats) / ring.sum(-1, keepdim=True).clamp(min=1)  # [B, n, D]
        # Each object's shape: the label of its patches (all equal).
        label = (one_hot * aux[..., 1:2].float()).sum(1) / one_hot.sum(1).clamp(min=1)  # [B, n]
        words = F.normalize(embed.weight[self.shape_ids[1:]], dim=-1)
        logits = self.scale * F.normalize(pooled[present], dim=-1) @ words.T
        return F.cross_entropy(logits, label[present].round().long() - 1)


def evaluate(path: Path, rows: int, seed: int) -> dict:
    """Keep-all accuracy of the saved checkpoint, loaded back, on held-out scenes (greedy)."""
    from pipeline.config import GenerationConfig, InputConfig, ModelConfig
    from pipeline.io.sample_corpus import make_rows
    from pipeline.models.llava import LlavaAdapter
    from pipeline.stages.encode import decode_image

    adapter = LlavaAdapter(ModelConfig(path=str(path)), str(path), "language")
    vision = LlavaAdapter(ModelConfig(path=str(path)), str(path), "vision")
    data = make_rows(rows, seed=seed)
    right: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    gen = GenerationConfig(max_new_tokens=4)
    for start in range(0, rows, 16):
        chunk = data[start : start + 16]
        imgs = [decode_image(r["image"], InputConfig(path="-").max_image_pixels) for r in chunk]
        enc = vision.encode(imgs)
        kept = [torch.arange(f.shape[0]) for f in enc.features]
        answers = adapter.generate([r["prompt"] for r in chunk], enc.features, kept, gen)
        for r, a in zip(chunk, answers, strict=True):
            right[r["question_type"]].append(is_correct({"answer": a.text, "expected": r["expected"], "error": ""}))
    every = [x for v in right.values() for x in v]
    return {"accuracy": float(np.mean(every)), "rows": len(every),
            "per_type": {t: round(float(np.mean(v)), 4) for t, v in right.items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CHECKPOINTS / "tiny-llava-shapes")
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--images-per-step", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--aux-only-steps", type=int, default=150,
                    help="first steps train the vision tower and projector on the dense targets alone (cheap)")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock bound on training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=50)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, processor = new_tiny_llava("llava-shapes")
    model.train()
    head = AuxHead(model.config.text_config.hidden_size, processor.tokenizer)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))
    )
    batcher = Batcher(processor, QUESTIONS_PER_IMAGE)
    image_token_id = batcher.image_token_id
    start = time.perf_counter()
    ema_loss = None
    ema_acc: dict[str, float] = {}
    step = 0
    for step in range(a.steps):
        if time.perf_counter() - start > a.minutes * 60:
            print(f"stopping at step {step}: --minutes {a.minutes} reached", flush=True)
            break
        batch = batcher.make(TRAIN_SEED + step, a.images_per_step)
        feats = _features(model, batch["pixels"])
        loss = a.aux_weight * head(model.get_input_embeddings(), feats, batch["aux"])
        if step >= a.aux_only_steps:
            loss_lm, right = lm_loss(model, feats, batch["convs"], image_token_id)
            loss = loss + loss_lm
            ema_loss = loss_lm.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss_lm.item()
            for t, v in right.items():
                ema_acc[t] = float(np.mean(v)) if t not in ema_acc else 0.95 * ema_acc[t] + 0.05 * float(np.mean(v))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % a.log_every == 0:
            accs = " ".join(f"{t} {v:.2f}" for t, v in sorted(ema_acc.items()))
            print(f"step {step:5d}  {time.perf_counter() - start:7.1f}s  lm {ema_loss or 0:.3f}  total {loss.item():.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  train acc: {accs}", flush=True)
    train_s = time.perf_counter() - start
    model.eval()
    if a.out.exists():
        shutil.rmtree(a.out)
    save_checkpoint(model, processor, a.out)
    result = evaluate(a.out, a.eval_rows, HELD_OUT_SEED)
    result.update({"steps": step + 1, "train_seconds": round(train_s, 1), "out": str(a.out),
                   "bytes": sum(p.stat().st_size for p in a.out.iterdir())})
    print("RESULT " + json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
