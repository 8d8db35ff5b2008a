"""``python -m pyops info`` | ``python -m pyops demo [--seed S] [--out DIR] [--steps N] ...``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyops")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("info", help="versions, GPU, backend per op")
    d = sub.add_parser("demo", help="samples of a small Flux trained on digits: uncached vs cached "
                                    "vs FP8 vs few steps (CPU); quality table and a PNG grid")
    d.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    d.add_argument("--out", default="bench/out", help="folder of demo.png (default bench/out)")
    d.add_argument("--steps", type=int, default=28, help="steps of the reference, cached and "
                                                         "FP8 rows (default 28)")
    d.add_argument("--few-steps", type=int, default=4, help="steps of the few-step row (default 4)")
    d.add_argument("-n", "--samples", type=int, default=200,
                   help="samples per row for the metrics (default 200; >= 20)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the model is 64 wide, too small for "
                        "threads to pay; more threads can be slower on a shared machine)")
    args = p.parse_args(argv)
    if args.cmd in (None, "info"):
        from . import info
        info()
        return 0
    if args.cmd == "demo":
        from .demo import ArgumentError, main as demo_main
        try:
            return demo_main(seed=args.seed, out=args.out, n=args.samples, steps=args.steps,
                             few_steps=args.few_steps, threads=args.threads)
        except ArgumentError as e:  # a bad argument; any other error keeps its traceback
            p.error(str(e))
    return 2


if __name__ == "__main__":
    sys.exit(main())
