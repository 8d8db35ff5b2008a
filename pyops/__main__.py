"""``python -m pyops info`` | ``python -m pyops demo``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyops")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("info", help="versions, GPU, backend per op")
    d = sub.add_parser("demo", help="quantize a small DiT's weights, print the error per layer")
    d.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd in (None, "info"):
        from . import info
        info()
        return 0
    if args.cmd == "demo":
        from .demo import main as demo_main
        return demo_main(seed=args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
