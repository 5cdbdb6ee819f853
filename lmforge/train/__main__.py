"""`python -m lmforge.train CONFIG [section.key=value ...]`: pretraining without the CLI (torchrun-friendly)."""

from __future__ import annotations

import os
import sys

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.train.pretrain import PretrainConfig, pretrain


def main(argv: list[str]) -> int:
    if not argv or not all("=" in pair for pair in argv[1:]):
        print("usage: python -m lmforge.train CONFIG [section.key=value ...]", file=sys.stderr)
        return 2
    path, *pairs = argv
    try:
        overrides = dict(pair.split("=", 1) for pair in pairs)
        run_dir = pretrain(load_config(PretrainConfig, path, overrides))
        if os.environ.get("RANK", "0") == "0":
            print(run_dir)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
