#!/usr/bin/env bash
# Download the peer wheels the GPU benchmarks compare against (sageattention, torchao; cache-dit
# for bench_cache, with transformers and tokenizers, which it imports: ~18 MB of wheels) into
# .whl/ (git-ignored), and the GPU tests' and benchmarks' own dependencies (pytest, numpy;
# matplotlib and tqdm for bench_e2e's plot and progress bar; with what they need) into
# .whl/test/, on a machine with internet, for a GPU machine without it:
#   bash bench/fetch_wheels.sh                 # PEERS="name==version ..." to choose other peers,
#                                              # TEST_WHEELS="..." other test dependencies,
#                                              # BENCH_WHEELS="..." other benchmark ones
# Copy the checkout with its .whl/ folder to the GPU machine; there `bash bench/gpu_check.sh`
# installs the peers with pip --target /tmp/site and puts that on PYTHONPATH, and installs
# pytest/numpy and matplotlib/tqdm from .whl/test/ the same way, only if they are not
# importable already. The wheels are for CPython 3.12 on manylinux x86_64; the peers without
# dependencies. Never commit the wheels.
set -eu
cd "$(dirname "$0")/.."
# cache-dit is not in setup.py's 'bench' extra: it pulls in transformers (~130 MB installed;
# its import took 10-20 s on a 2-core CPU); bench_cache.py notes its rows as not run without it
DEFAULT_PEERS="sageattention==1.0.6 torchao==0.18.0"
DEFAULT_PEERS+=" cache-dit==1.5.3 transformers==5.24.0 tokenizers==0.23.3"
PEERS=${PEERS:-$DEFAULT_PEERS}
TEST_WHEELS=${TEST_WHEELS:-"pytest numpy"}
BENCH_WHEELS=${BENCH_WHEELS:-"matplotlib tqdm"}
git check-ignore -q .whl/x.whl 2>/dev/null || echo /.whl/ >>.git/info/exclude
mkdir -p .whl .whl/test
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in $PEERS; do
    if ! python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d .whl "$spec"; then
        # pip matches manylinux_2_N exactly: try the other common N
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${PLATFORMS[@]}" --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
            --platform manylinux_2_35_x86_64 -d .whl "$spec"
    fi
done
# the test and benchmark dependencies with theirs (pytest needs iniconfig, packaging, pluggy,
# pygments; matplotlib needs numpy, pillow, fonttools, kiwisolver, contourpy, cycler, pyparsing,
# python-dateutil): gpu_check.sh installs them with pip --no-index --find-links .whl/test
# shellcheck disable=SC2086
if ! python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl/test $TEST_WHEELS $BENCH_WHEELS; then
    # shellcheck disable=SC2086
    python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 -d .whl/test \
        $TEST_WHEELS $BENCH_WHEELS
fi
ls -la .whl .whl/test
du -sh .whl  # the working tree that travels is limited to 64 MiB
