"""Benchmark: ResPrune selection time against one batched V @ V^T GEMM (its cost unblocked).

    python -m pipeline.bench.select [--repeats 5] [--device cpu|cuda] [--sizes B:N:D:keep,...]

Sizes: LLaVA-1.5 (8 images of 576 tokens, keep 128), LLaVA-NeXT (2880, keep 320) and a large
Qwen2.5-VL image (4096 tokens, D = 3584, keep a third). Selection (relevance, gate and picks)
and the GEMM are timed in one run on the same inputs, alternately, medians of each, so the
ratio is meaningful on a noisy machine; the target is ratio <= 1.5. The adaptive budget
(pipeline/pruning/energy.py) is timed beside them: the greedy to the same cap with its energy
trace, then each row's cut at energy 0.999 (``adaptive/select``: what adaptive costs over a fixed
budget of the cap). It also reports how many
picks agree with an independent float64 reference (scipy column-pivoted QR) on a low-rank +
noise token set: 96 of 128, the rest being near-ties below what a float32 Gram resolves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.pruning import energy_keep, gate, relevance, resprune_select, resprune_trace

SIZES = [(8, 576, 4096, 128), (1, 2880, 4096, 320), (1, 4096, 3584, 1365)]  # (B, N, D, keep)


def _median_seconds(fns: list[Callable[[], object]], repeats: int, device: str) -> list[float]:
    """Median time of each function, run alternately so that load from elsewhere hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def _sizes(text: str) -> list[tuple[int, int, int, int]]:
    """``B:N:D:keep,...`` (e.g. ``2:144:256:32`` for a quick run)."""
    try:
        sizes = [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 4 or min(s) < 1 or s[3] > s[1] for s in sizes):
        raise argparse.ArgumentTypeError(f"expected B:N:D:keep[,B:N:D:keep...] with keep <= N, got {text!r}")
    return sizes  # type: ignore[return-value]


def time_sizes(repeats: int, device: str, sizes: list[tuple[int, int, int, int]] = SIZES) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b, n, d, keep in sizes:
        v = torch.randn((b, n, d), generator=gen).to(device)
        text = [torch.randn((4, d), generator=gen).to(device) for _ in range(b)]
        gemm, select, adaptive = _median_seconds(
            [lambda v=v: torch.bmm(v, v.transpose(1, 2)), lambda v=v, k=keep, t=text: resprune_select(v, k, text=t),
             lambda v=v, k=keep, t=text: energy_keep(resprune_trace(v, k, text=t)[1], 0.999, 1)],
            repeats,
            device,
        )
        rows.append({"B": b, "N": n, "D": d, "keep": keep, "gemm_s": gemm, "select_s": select, "ratio": select / gemm,
                     "adaptive_s": adaptive, "adaptive_ratio": adaptive / select})
    return rows


def reference_agreement(n: int = 576, d: int = 1024, rank: int = 96, keep: int = 128, noise: float = 1e-3) -> int:
    """Number of leading picks equal to a float64 CPQR reference on a near-low-rank token set."""
    import numpy as np
    import scipy.linalg

    gen = torch.Generator().manual_seed(1)
    v = torch.randn((n, rank), generator=gen) @ torch.randn((rank, d), generator=gen)
    v += noise * torch.randn((n, d), generator=gen)
    text = torch.randn((3, d), generator=gen)
    ours = resprune_select(v, keep, text=text).tolist()
    w = gate(relevance(v, text), 0.75).double().numpy()
    x = v.double().numpy()
    seed = ours[0]
    resid = x - np.outer(x @ x[seed] / (x[seed] @ x[seed]), x[seed])
    others = [i for i in range(n) if i != seed]
    _, _, piv = scipy.linalg.qr((np.sqrt(w)[:, None] * resid)[others].T, pivoting=True, mode="economic")
    ref = [seed] + [others[p] for p in piv[: keep - 1]]
    agree = 0
    while agree < keep and ours[agree] == ref[agree]:
        agree += 1
    return agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=_sizes, default=SIZES,
                        help="B:N:D:keep,... (default: " + ",".join(":".join(map(str, s)) for s in SIZES) + ")")
    args = parser.parse_args()
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'B':>3} {'N':>5} {'D':>5} {'keep':>5} {'V@V^T ms':>10} {'select ms':>10} {'ratio':>6} "
          f"{'adaptive ms':>12} {'adaptive/select':>16}")
    rows = time_sizes(args.repeats, args.device, args.sizes)
    for r in rows:
        print(
            f"{r['B']:>3} {r['N']:>5} {r['D']:>5} {r['keep']:>5} "
            f"{1e3 * r['gemm_s']:>10.1f} {1e3 * r['select_s']:>10.1f} {r['ratio']:>6.2f} "
            f"{1e3 * r['adaptive_s']:>12.1f} {r['adaptive_ratio']:>16.2f}"
        )
    agree = reference_agreement()
    print(f"picks equal to the float64 reference on rank-96 + 1e-3 noise tokens: {agree}/128")
    result = {f"ratio_B{r['B']}_N{r['N']}_K{r['keep']}": round(r["ratio"], 3) for r in rows}
    result |= {f"adaptive_over_select_B{r['B']}_N{r['N']}_K{r['keep']}": round(r["adaptive_ratio"], 3) for r in rows}
    print("RESULT " + json.dumps({**result, "device": args.device, "reference_agreement": agree}))


if __name__ == "__main__":
    main()
