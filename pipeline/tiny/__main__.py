"""``python -m pipeline.tiny [--recipe llava] [--out DIR]``: build a tiny checkpoint, print its directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import build, buildable, checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny offline checkpoint")
    parser.add_argument("--recipe", choices=buildable(), default="llava")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the cache)")
    args = parser.parse_args()
    print(checkpoint(args.recipe) if args.out is None else build(args.recipe, args.out))


if __name__ == "__main__":
    main()
