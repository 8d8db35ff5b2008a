"""FP8 and NVFP4 quantization in one run, one combined table (one copy-bandwidth ceiling).

    python bench/bench_quantize.py [--out bench/out] [--full | --quick] [--device cuda]
                                   [--only fp8|nvfp4]

Default run: FP8 per-token and NVFP4 with a computed global scale at the Flux 1024² and Wan 480p
activation sizes (bench_quantize_fp8.py and bench_quantize_nvfp4.py say which providers);
``--full``: every configuration and shape of both; ``--quick`` (the default on a CPU): tiny
shapes. Writes <out>/quantize.json and <out>/quantize.md (rewritten after every row).
"""
# Run length on an H200, estimated (not measured): the two scripts' default runs share one
# start-up and copy measurement: ~6 s + ~20 s (FP8) + ~20 s (NVFP4) = ~45 s; the default soft
# budget (45 s) skips the remaining torch.compile peers, marked so, if compiles run longer.
#   --full, ~6 min.
# estimate-h200-s: 45
# bench-covers: bench_quantize_fp8.py bench_quantize_nvfp4.py
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quantize_fp8 as fp8  # noqa: E402
import bench_quantize_nvfp4 as nvfp4  # noqa: E402
import utils as U  # noqa: E402

NAME = "quantize"


def main(argv=None) -> int:
    p = fp8.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--only", choices=("fp8", "nvfp4"), default=None)
    args = p.parse_args(argv)
    device = U.resolve_run(args, fp8.DEFAULT_BUDGET_S)
    env = U.env_record(device)
    env["run"] = args.mode
    env.update(U.measure_ceiling(device, args.quick))
    budget = U.Budget(args.budget_s)
    combined = U.Table("FP8 and NVFP4 quantization (bf16 input)", fp8.COLUMNS)
    done: list[U.Table] = []

    def save(current: U.Table) -> None:
        t = U.Table(combined.title, combined.columns)
        for d in done + [current]:
            t.extend(d)
        U.write_results(args.out, NAME, [t], env)

    mods = [m for m in (fp8, nvfp4) if args.only in (None, m.NAME.split("_")[-1])]
    for m in mods:
        done.append(m.run(args, device, env["copy_gbps"], budget, progress=save))
    for d in done:
        combined.extend(d)
    U.write_results(args.out, NAME, [combined], env)
    print(U.env_markdown(env) + "\n\n" + combined.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
