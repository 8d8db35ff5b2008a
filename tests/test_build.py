"""Build checks for the CUDA backend, no GPU needed.

* every ``csrc/*.cu`` compiles with nvcc for sm_90a and sm_100a (compile only);
* every ``csrc/bindings/*.cpp`` compiles against the installed torch headers (compile only);
* the CMake build of the torch-free ``libpyops`` and its C example succeeds, and the example
  runs (it exits 0 with a message on a machine without a GPU) naming the built archs;
* ``pyops_cuda_archs()`` (csrc/archs.cu) reports every arch the library is compiled for;
* one C ABI style: every C header under ``csrc/include`` is plain C99, every entry point is
  ``cudaError_t pyops_<op>(const pyops_<op>_params*, cudaStream_t)``, and the dtype mapping,
  ``check_cuda`` and each load/store/exact-arithmetic helper are defined once in ``csrc/``;
* the exact fp32 arithmetic survives ``-use_fast_math`` (no ftz / approximate / fused
  instruction in the PTX of any kernel).

All compiles start together in a thread pool when the first test asks for them, so the module
takes about as long as its slowest few compiles. Deselect with ``-m "not build"``.
"""
from __future__ import annotations

import os
import re
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
CINC = CSRC / "include"  # the public C ABI: pyops.h (umbrella) and pyops/<op>.h
C_HEADERS = sorted(CINC.rglob("*.h"))
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
            "-Xcompiler", "-fPIC", f"-I{CINC}", f"-I{CSRC}", str(src), "-o", str(out)]


def _ptx_fast_cmd(nvcc: str, src: Path, out: Path) -> list[str]:
    # -use_fast_math = -ftz=true -prec-div=false -prec-sqrt=false -fmad=true: what a user's
    # build flags could add; the kernels' results must not depend on them.
    return [nvcc, "-ptx", "-O2", "-std=c++20", "-use_fast_math",
            f"-gencode=arch=compute_{ARCHS[0]},code=sm_{ARCHS[0]}", f"-I{CINC}", f"-I{CSRC}",
            str(src), "-o", str(out)]


def _archs_job(tmp: Path, nvcc: str, cc: str | None, cuda_inc: Path | None) -> tuple[int, str]:
    """archs.cu compiled for both ARCHS (as setup.py / CMake compile every .cu) and linked with a
    plain-C main that prints pyops_cuda_archs(); host-only, runs without a GPU."""
    if not cc or not cuda_inc:
        return 0, "skip: no C compiler or CUDA headers"
    main = tmp / "archs_main.c"
    main.write_text('#include <stdio.h>\n#include "pyops.h"\n'
                    'int main(void) { printf("[%s]\\n", pyops_cuda_archs()); return 0; }\n')
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    log = []
    for cmd in ([nvcc, "-c", "-O2", "-std=c++20", *gencode, f"-I{CINC}",
                 str(CSRC / "archs.cu"), "-o", str(tmp / "archs.o")],
                [cc, "-std=c99", "-c", f"-I{CINC}", "-isystem", str(cuda_inc), str(main),
                 "-o", str(tmp / "archs_main.o")],
                [nvcc, str(tmp / "archs.o"), str(tmp / "archs_main.o"), "-o",
                 str(tmp / "archs_main")],
                [str(tmp / "archs_main")]):
        rc, out = _run(cmd)
        log.append(out)
        if rc != 0:
            return rc, "\n".join(log)
    return 0, "\n".join(log)


def _cpp_cmd(src: Path, out: Path, cuda_inc: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "g++"
    inc = [f"-I{CINC}", f"-I{CSRC}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
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


def _cc() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="module")
def tools():
    nvcc = _nvcc()
    return {"nvcc": nvcc, "cuda_inc": _cuda_include(nvcc), "cc": _cc()}


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
        fut["archs"] = pool.submit(_archs_job, tmp, nvcc, tools["cc"], cuda_inc)
        for src in CU_FILES:
            for arch in ARCHS:
                out = tmp / f"{src.stem}.sm_{arch}.o"
                fut[("cu", src.name, arch)] = pool.submit(_run, _nvcc_cmd(nvcc, src, arch, out))
        for src in CU_FILES:
            out = tmp / f"{src.stem}.fast.ptx"
            fut[("ptx", src.name)] = pool.submit(
                lambda cmd, out: (*_run(cmd), out), _ptx_fast_cmd(nvcc, src, out), out)
    if cuda_inc:
        for src in CPP_FILES:
            fut[("cpp", src.name)] = pool.submit(_run, _cpp_cmd(src, tmp / f"{src.stem}.o",
                                                               cuda_inc))
    yield {"nvcc": nvcc, "cuda_inc": cuda_inc, "fut": fut, "tmp": tmp}
    pool.shutdown(wait=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _check(jobs, key):
    rc, log = jobs["fut"][key].result()[:2]
    assert rc == 0, f"build step {key} failed (rc={rc}):\n{log[-8000:]}"
    return log


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
    log = _check(jobs, "cmake")
    # the example prints pyops_cuda_archs() (with or without a GPU); CMake built for 90a only
    assert re.search(r"built for (compute capabilities: )?90\b", log), log[-4000:]
    # every function the C headers declare is exported by libpyops
    lib = jobs["tmp"] / "cmake" / "libpyops.so"
    nm = shutil.which("nm")
    if nm and lib.exists():
        rc, out = _run([nm, "-D", "--defined-only", str(lib)])
        assert rc == 0, out
        exported = set(re.findall(r"\b(pyops_\w+)$", out, re.M))
        declared = set(re.findall(r"\b(pyops_\w+)\s*\(", _header_text()))
        assert declared and declared <= exported, f"not exported: {declared - exported}"


def test_cuda_archs_reports_every_arch(jobs):
    """pyops_cuda_archs() lives in its own source compiled like every kernel, so it reports the
    whole list the library was built for (it used to live in quantize_fp8.cu)."""
    if not jobs["nvcc"]:
        pytest.skip("nvcc not found")
    log = _check(jobs, "archs")
    if log.startswith("skip:"):
        pytest.skip(log)
    want = ";".join(a.rstrip("a") for a in ARCHS)  # "90a", "100a" -> "90;100"
    assert f"[{want}]" in log, log


@pytest.mark.parametrize("header", [str(p.relative_to(CINC)) for p in C_HEADERS])
def test_c_header_is_plain_c(tools, header):
    """Every C ABI header compiles on its own as C99 (it is the ABI other engines link against)."""
    cc = tools["cc"]
    if not cc or not tools["cuda_inc"]:
        pytest.skip("no C compiler or CUDA headers")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "h.c"
        use = ("int main(void) { return PYOPS_FP8_ROW - 1 + PYOPS_DTYPE_F32; }\n"
               if header == "pyops.h" else "int main(void) { return (int)PYOPS_DTYPE_F32; }\n")
        src.write_text(f'#include "{header}"\n#include "{header}"\n{use}')  # include guard too
        rc, log = _run([cc, "-std=c99", "-Wall", "-Werror", "-pedantic", f"-I{CINC}",
                        "-isystem", str(tools["cuda_inc"]), "-c", str(src), "-o",
                        str(Path(d) / "h.o")])
    assert rc == 0, log


def _torch_free_sources() -> list[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".c")
                  and "bindings" not in p.relative_to(CSRC).parts)


def test_kernels_are_torch_free():
    """csrc/ outside bindings/ (kernels, common.cuh, the C headers, the example) never includes
    torch / ATen / c10 headers."""
    bad = []
    for p in _torch_free_sources():
        for i, line in enumerate(p.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith("#include") and any(t in s for t in ("torch", "ATen", "c10/")):
                bad.append(f"{p.relative_to(CSRC)}:{i}: {s}")
    assert not bad, "torch headers in torch-free sources:\n" + "\n".join(bad)


# ---- one C ABI style -------------------------------------------------------------------------
def _strip_c(text: str) -> str:
    """Source without comments; string and char literals emptied (so braces in them vanish)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:\\.|[^"\\\n])*"', '""', text)
    return re.sub(r"'(?:\\.|[^'\\\n])'", "''", text)


_KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "catch", "else", "case", "new",
             "delete", "throw", "decltype", "alignof", "static_assert", "defined"}
_QUALIFIERS = r"(?:(?:static|inline|constexpr|__device__|__host__|__global__|__forceinline__|" \
              r'extern\s*""|const)\s+)*'
_DEF = re.compile(
    r"(?m)^[ \t]*(?:template\s*<[^;{}]*?>\s*)?" + _QUALIFIERS +
    r"(?P<type>(?:typename\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?(?:\s*::\s*\w+)?)[\s\*&]+"
    r"(?:__launch_bounds__\s*\([^)]*\)\s*)?(?P<name>[A-Za-z_]\w*)\s*\((?P<args>[^;{}]*)\)\s*"
    r"(?:const\s*)?(?:->\s*[\w:]+\s*)?\{")


def _definitions() -> dict[str, list[str]]:
    """Function name -> ["file:line", ...] for every function defined in csrc/."""
    defs: dict[str, list[str]] = {}
    for p in sorted(CSRC.rglob("*")):
        if p.suffix not in (".cu", ".cuh", ".h", ".cpp", ".c"):
            continue
        text = _strip_c(p.read_text())
        for m in _DEF.finditer(text):
            if m["name"] in _KEYWORDS or m["type"] in _KEYWORDS:
                continue
            line = text.count("\n", 0, m.start("name")) + 1
            defs.setdefault(m["name"], []).append(f"{p.relative_to(CSRC)}:{line}")
    return defs


# The helpers issue #10 found defined more than once (dtype_code three times, check_cuda twice,
# a load_f32/store_f32 pair per element-wise kernel) and the rest of the shared load/store and
# exact-arithmetic set of common.cuh: each must have exactly one definition in csrc/.
_SHARED = re.compile(r"^(dtype_code|check_cuda|check_flat|check_out|check_status|valid_dtype|"
                     r"elem_size|copy_elem|(load|store)_\w+|\w+_(load|store)|"
                     r"(add|sub|mul|div|sqrt|rsqrt|abs)_rn|max_nan|clamp_nan|"
                     r"e4m3\w*|e2m1\w*|fp8_(scale|codes)|chunk_\w+|word_elem)$")


def test_definitions_parser_sees_the_helpers():
    """The parser below must find the definitions it is meant to police (else the uniqueness test
    could pass on an empty list)."""
    defs = _definitions()
    for name in ("dtype_code", "check_cuda", "load_float", "store_float", "load_chunk", "div_rn",
                 "add_rn", "fp8_codes", "chunk_elem", "pyops_quantize_fp8", "pyops_cuda_archs"):
        assert name in defs, f"{name} not found among {sorted(defs)}"


def test_shared_helpers_are_defined_once():
    defs = _definitions()
    dup = {n: locs for n, locs in defs.items() if _SHARED.match(n) and len(locs) > 1}
    assert not dup, f"helpers defined more than once: {dup}"
    # no function name is defined in two different files (member functions of one file's
    # element-type structs, e.g. F16::to_float / BF16::to_float, are one file)
    multi = {n: locs for n, locs in defs.items()
             if len({loc.rsplit(":", 1)[0] for loc in locs}) > 1}
    assert not multi, f"function names defined in more than one file: {multi}"


def test_kernels_use_the_common_helpers():
    """Outside common.cuh no kernel converts between float types or does _rn/libdevice float
    arithmetic by itself: every load, store, cast and rounded operation is a common.cuh helper
    (so a rounding fix there reaches every kernel)."""
    raw = re.compile(r"\b(__f(add|sub|mul|div|ma|sqrt)_r[nzud]|__frcp_r[nzud]|fabsf?|fmaxf?|"
                     r"fminf?|__float2(half|bfloat16)\w*|__half2float|__bfloat162float|"
                     r"__nv_cvt_\w+)\b")
    bad = []
    for p in sorted(CSRC.glob("*.cu")):
        text = _strip_c(p.read_text())
        for m in raw.finditer(text):
            bad.append(f"{p.name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}")
        if re.search(r"\bfloat\b", text) and '#include "common.cuh"' not in p.read_text():
            bad.append(f"{p.name}: float math without common.cuh")
    assert not bad, "raw conversions / arithmetic outside common.cuh:\n" + "\n".join(bad)


def _header_text() -> str:
    return "\n".join(_strip_c(p.read_text()) for p in C_HEADERS)


def test_one_entry_point_style():
    """Every pyops_* function of the C ABI is `cudaError_t pyops_<op>(const pyops_<op>_params*,
    cudaStream_t)`, except pyops_cuda_archs() and size queries that take the op's params; one
    dtype enum (pyops_dtype_t in pyops/common.h)."""
    text = _header_text()
    decls = re.findall(r"(?m)^\s*([\w ]+?[\s\*]+)(pyops_\w+)\s*\(([^;{}]*)\)\s*;", text)
    assert len(decls) >= 7, decls
    structs = set(re.findall(r"\}\s*(pyops_\w+_params)\s*;", text))
    entries = {name for ret, name, _ in decls if ret.strip() == "cudaError_t"}
    bad = []
    for ret, name, args in decls:
        ret, args = " ".join(ret.split()), " ".join(args.split())
        if name == "pyops_cuda_archs":
            ok = ret == "const char*" and args == "void"
        elif ret == "cudaError_t":
            ok = (re.fullmatch(rf"const {name}_params ?\* ?\w*, cudaStream_t \w+", args)
                  is not None and f"{name}_params" in structs)
        else:  # a host-side size query of an entry point, from the same params
            m = re.fullmatch(r"(pyops_\w+)_workspace_size", name)
            ok = (ret == "int64_t" and m is not None and m[1] in entries
                  and re.fullmatch(rf"const {m[1]}_params ?\* ?\w*", args) is not None)
        if not ok:
            bad.append(f"{ret} {name}({args})")
    assert not bad, "C ABI functions not in the one entry-point style:\n" + "\n".join(bad)
    # one dtype enum, in pyops/common.h
    dtype_enums = [p.relative_to(CINC) for p in C_HEADERS
                   if re.search(r"enum[^;]*\{[^}]*(F32|FLOAT32|BF16|BFLOAT16)", _strip_c(p.read_text()))]
    assert dtype_enums == [Path("pyops/common.h")], dtype_enums


def test_exact_arithmetic_survives_fast_math(jobs):
    """Compiled with -use_fast_math, no kernel's PTX holds a flush-to-zero, approximate or fused
    float instruction (other than fma_rn's explicit FMA): the _rn helpers of common.cuh are inline
    PTX without .ftz, so a user's
    build flags cannot change a result. (Comparisons, setp.*.ftz, are the one thing -ftz still
    changes, and only for operands below 2^-126.)"""
    if not jobs["nvcc"]:
        pytest.skip("nvcc not found")
    inexact = re.compile(r"^\s*((add|sub|mul|div|fma|mad|abs|neg|min|max|sqrt|rsqrt|rcp|ex2|lg2|"
                         r"sin|cos|tanh|cvt)\.[\w.]*(ftz|approx)[\w.]*|fma\.rn\.f32|"
                         r"mad\.[\w.]*f32)\b", re.M)
    # fma_rn (common.cuh) is an explicit single-rounding FMA written as inline asm: its
    # fma.rn.f32 sits between nvcc's "begin inline asm" / "end inline asm" markers and is
    # allowed; anywhere else an fma.rn.f32 is the compiler contracting a*b+c.
    asm_block = re.compile(r"// begin inline asm\n\s*fma\.rn\.f32[^\n]*\n\s*// end inline asm")
    # attention.cu: the softmax's exp2 and the lse's log2 are approximate by specification, as
    # in the Triton kernel (whose exp2 is ex2.approx with .ftz and whose log2 is libdevice's, so
    # the two differ in the last bits: docs/attention.md); written as inline asm without .ftz,
    # so build flags cannot change them either.
    approx_asm = re.compile(r"// begin inline asm\n\s*(ex2|lg2)\.approx\.f32 [^\n]*\n\s*"
                            r"// end inline asm")
    bad = []
    for src in CU_FILES:
        rc, log, out = jobs["fut"][("ptx", src.name)].result()
        assert rc == 0, log[-4000:]
        text = asm_block.sub("", out.read_text())
        if src.name == "attention.cu":
            text = approx_asm.sub("", text)
        found = sorted({m.group(1) for m in inexact.finditer(text)})
        if found:
            bad.append(f"{src.name}: {found}")
    assert not bad, "\n".join(bad)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
