"""Build checks for the CUDA backend, no GPU needed.

* every ``csrc/*.cu`` compiles with nvcc for sm_90a and sm_100a (compile only);
* every ``csrc/bindings/*.cpp`` compiles against the installed torch headers (compile only);
* the CMake build of the torch-free ``libpyops`` and its C example succeeds, and the example
  runs (it exits 0 with a message on a machine without a GPU).

All compiles start together in a thread pool when the first test asks for them, so the module
takes about as long as its slowest few compiles. Deselect with ``-m "not build"``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.build

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
CPP_FILES = sorted((CSRC / "bindings").glob("*.cpp"))
ARCHS = ("90a", "100a")
TIMEOUT = 600


def _nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def _cuda_include(nvcc: str | None) -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        homes.insert(0, str(Path(nvcc).resolve().parent.parent))
    for h in homes:
        if h and (Path(h) / "include" / "cuda_runtime_api.h").exists():
            return Path(h) / "include"
    return None


def _run(cmd: list[str], cwd: Path | None = None) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {TIMEOUT}s: {' '.join(cmd)}\n{e.stdout or ''}"
    return p.returncode, f"$ {' '.join(cmd)}\n{p.stdout}"


def _nvcc_cmd(nvcc: str, src: Path, arch: str, out: Path) -> list[str]:
    # -std=c++20: what torch.utils.cpp_extension (setup.py) passes for torch >= 2.10 builds.
    return [nvcc, "-c", "-O2", "-std=c++20", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Xcompiler", "-fPIC", f"-I{CSRC}", str(src), "-o", str(out)]


def _cpp_cmd(src: Path, out: Path, cuda_inc: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "g++"
    inc = [f"-I{CSRC}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    inc += [f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}"]
    defs = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DTORCH_EXTENSION_NAME=_C"]
    torch_inc = Path(cpp_extension.include_paths()[0])
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # CPU-only torch wheels ship c10/cuda headers without this generated one; its only
        # content (C10_CUDA_BUILD_SHARED_LIBS) matters for Windows DLL exports.
        defs.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [cxx, "-std=c++20", "-fPIC", "-O1", "-c", *defs, *inc, str(src), "-o", str(out)]


def _cmake_job(tmp: Path, nvcc: str) -> tuple[int, str]:
    cmake = shutil.which("cmake")
    build = tmp / "cmake"
    log = []
    # One arch here: test_nvcc_compiles already covers every arch of every .cu file.
    for cmd in ([cmake, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 "-DPYOPS_CUDA_ARCHS=90a"],
                [cmake, "--build", str(build), f"-j{os.cpu_count() or 2}"],
                [str(build / "pyops_quantize_example")]):
        rc, out = _run(cmd)
        log.append(out)
        if rc != 0:
            return rc, "\n".join(log)
    return 0, "\n".join(log)


@pytest.fixture(scope="module")
def tools():
    nvcc = _nvcc()
    return {"nvcc": nvcc, "cuda_inc": _cuda_include(nvcc)}


@pytest.fixture(scope="module")
def jobs(tools):
    """Start every compile at once; tests pick up their own result."""
    nvcc, cuda_inc = tools["nvcc"], tools["cuda_inc"]
    tmp = Path(tempfile.mkdtemp(prefix="pyops_build_"))
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    fut = {}
    # Longest jobs first: CMake builds every .cu for two archs.
    if nvcc and shutil.which("cmake"):
        fut["cmake"] = pool.submit(_cmake_job, tmp, nvcc)
    if nvcc:
        for src in CU_FILES:
            for arch in ARCHS:
                out = tmp / f"{src.stem}.sm_{arch}.o"
                fut[("cu", src.name, arch)] = pool.submit(_run, _nvcc_cmd(nvcc, src, arch, out))
    if cuda_inc:
        for src in CPP_FILES:
            fut[("cpp", src.name)] = pool.submit(_run, _cpp_cmd(src, tmp / f"{src.stem}.o",
                                                               cuda_inc))
    yield {"nvcc": nvcc, "cuda_inc": cuda_inc, "fut": fut}
    pool.shutdown(wait=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _check(jobs, key):
    rc, log = jobs["fut"][key].result()
    assert rc == 0, f"build step {key} failed (rc={rc}):\n{log[-8000:]}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", [p.name for p in CU_FILES])
def test_nvcc_compiles(jobs, src, arch):
    if not jobs["nvcc"]:
        pytest.skip("nvcc not found (set NVCC or put it on PATH)")
    _check(jobs, ("cu", src, arch))


@pytest.mark.parametrize("src", [p.name for p in CPP_FILES])
def test_binding_compiles(jobs, src):
    if not jobs["cuda_inc"]:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found")
    _check(jobs, ("cpp", src))


def test_cmake_library_and_example(jobs):
    if not jobs["nvcc"]:
        pytest.skip("nvcc not found")
    if not shutil.which("cmake"):
        pytest.skip("cmake not found")
    _check(jobs, "cmake")


def test_c_header_is_plain_c(tools):
    """pyops.h must compile as C99 (it is the ABI other engines link against)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or not tools["cuda_inc"]:
        pytest.skip("no C compiler or CUDA headers")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "h.c"
        src.write_text('#include "pyops.h"\nint main(void) { return PYOPS_FP8_ROW - 1; }\n')
        rc, log = _run([cc, "-std=c99", "-Wall", "-Werror", "-pedantic", f"-I{CSRC}",
                        "-isystem", str(tools["cuda_inc"]), "-c", str(src), "-o", str(Path(d) / "h.o")])
    assert rc == 0, log


def test_kernels_are_torch_free():
    """csrc/*.cu and csrc/*.cuh|h never include torch / ATen / c10 headers."""
    bad = []
    for p in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith("#include") and any(t in s for t in ("torch", "ATen", "c10/")):
                bad.append(f"{p.name}:{i}: {s}")
    assert not bad, "torch headers in torch-free sources:\n" + "\n".join(bad)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
