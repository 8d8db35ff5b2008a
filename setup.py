"""pyops build.

Always installs the Python package (PyTorch reference + Triton backends). Additionally builds the
CUDA extension ``pyops._C`` when torch with CUDA and nvcc are present; when that cannot happen
(CPU-only torch, no nvcc, a compile error) the install still succeeds and records why in
``pyops/_build_info.json`` (shown by ``python -m pyops info``).

Install without build isolation so the installed torch is used:
    pip install --no-build-isolation -e .

Environment:
    PYOPS_CUDA_ARCHS   target list, e.g. "90a;100a;120a" (default: the GPU present, else
                       "90a;100a;120a")
    PYOPS_SKIP_CUDA_BUILD=1   never build the extension
    MAX_JOBS           parallel compile jobs (torch's ninja builder)
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "pyops", "_build_info.json")


def say(msg: str) -> None:
    print(f"[pyops setup] {msg}", file=sys.stderr, flush=True)


def cuda_archs() -> list[str]:
    env = os.environ.get("PYOPS_CUDA_ARCHS")
    if env:
        return [a.strip().replace("sm_", "") for a in env.replace(",", ";").split(";") if a.strip()]
    try:
        import torch
        if torch.cuda.is_available():
            archs = []
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                # Hopper/Blackwell kernels use arch-specific ('a') features.
                a = f"{major}{minor}" + ("a" if major >= 9 else "")
                if a not in archs:
                    archs.append(a)
            return archs
    except Exception:
        pass
    return ["90a", "100a", "120a"]


def gencode_flags(archs: list[str]) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def why_no_cuda() -> str | None:
    if os.environ.get("PYOPS_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "PYOPS_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except ImportError:
        return ("torch is not importable in the build environment (install torch first and use "
                "`pip install --no-build-isolation`)")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None or not shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    return None


def write_build_info(info: dict, build_lib: str | None = None) -> None:
    text = json.dumps(info, indent=1)
    for path in {BUILD_INFO} | ({os.path.join(build_lib, "pyops", "_build_info.json")}
                                if build_lib else set()):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        except OSError:
            pass


kwargs: dict = {}
reason = why_no_cuda()
if reason is None:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = cuda_archs()
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/bindings/*.cpp"))
    ext = CUDAExtension(
        "pyops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                     *gencode_flags(archs)],
        },
    )

    class OptionalBuild(BuildExtension):
        """Build ``pyops._C``; on failure, keep installing the pure-Python package."""

        def run(self):
            try:
                super().run()
                write_build_info({"built": True, "archs": archs}, self.build_lib)
                say(f"built pyops._C for sm_{', sm_'.join(archs)}")
            except Exception as e:  # noqa: BLE001 - any failure must not fail the install
                msg = f"CUDA extension build failed: {type(e).__name__}: {e}"
                write_build_info({"built": False, "reason": msg, "archs": archs},
                                 self.build_lib)
                say(msg + " -- installing without it (Triton and reference backends only)")

    kwargs = {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuild}}
    say(f"building the CUDA extension for sm_{', sm_'.join(archs)}")
else:
    write_build_info({"built": False, "reason": reason})
    say(f"not building the CUDA extension: {reason}. Triton and reference backends only.")

def editable_cmdclass() -> dict:
    """Editable installs (``pip install -e .``) as one ``.pth`` path entry that holds only a link
    to ``pyops/``.

    setuptools' default for this layout (``pyops.triton_kernels`` maps to another folder) is an
    import hook that Python asks *after* its path search. Run from the folder that contains the
    clone (itself named ``pyops``, with no ``__init__.py``), the path search finds the clone as a
    namespace package first and ``import pyops`` yields an empty module. A regular package on
    ``sys.path`` always beats a namespace package, so a path entry holding ``pyops -> <clone>/pyops``
    is found from anywhere; ``pyops/__init__.py`` maps ``pyops.triton_kernels`` to the source
    folder (as in a plain checkout). Files added later are seen without reinstalling. Falls back to
    setuptools' own strategy where the link is missing (no symlinks) or ``editable_mode`` is set.
    """
    try:
        from setuptools.command.editable_wheel import editable_wheel
    except ImportError:  # setuptools < 64: no PEP 660 editable wheels
        return {}
    if not hasattr(editable_wheel, "_select_strategy"):
        return {}

    class PathEntry:
        def __init__(self, name: str, folder: str):
            self.name, self.folder = name, folder

        def __call__(self, wheel, files, mapping):
            wheel.writestr(f"__editable__.{self.name}.pth", (self.folder + "\n").encode())

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    class EditableWheel(editable_wheel):
        def _select_strategy(self, name, tag, build_lib):
            if self.mode not in (None, "", "lenient"):
                return super()._select_strategy(name, tag, build_lib)
            # .editable/pyops -> ../pyops is tracked by git, so `rm -rf build` or `git clean -xdf`
            # cannot break the install; a checkout without symlinks keeps setuptools' hook
            folder = os.path.join(ROOT, ".editable")
            link = os.path.join(folder, "pyops")
            if os.path.isfile(os.path.join(link, "__init__.py")) and \
                    os.path.samefile(link, os.path.join(ROOT, "pyops")):
                return PathEntry(name, folder)
            say(f"editable install: {link} is not a link to pyops/; using setuptools' import hook")
            return super()._select_strategy(name, tag, build_lib)

    return {"editable_wheel": EditableWheel}


kwargs.setdefault("cmdclass", {}).update(editable_cmdclass())


setup(
    name="pyops",
    version="0.1.0",
    description="FP8/NVFP4 quantized attention and GEMMs, GPU-side caching and few-step "
                "sampling kernels for diffusion transformers",
    packages=(["pyops"] + [f"pyops.{p}" for p in find_packages("pyops")]
              + ["pyops.triton_kernels"]
              + [f"pyops.triton_kernels.{p}" for p in find_packages("triton_kernels")]),
    package_dir={"pyops": "pyops", "pyops.triton_kernels": "triton_kernels"},
    # why the CUDA extension was (not) built, for `python -m pyops info` in non-editable installs
    package_data={"pyops": ["_build_info.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        # triton: the Triton kernels run in its interpreter on CPU-only machines;
        # scikit-learn (bundled digits data), diffusers (scheduler/model parity), tqdm: sampler tests;
        # matplotlib: the bench_e2e test checks its PNG
        "test": ["pytest>=7", "triton>=3.2; platform_system == 'Linux'", "scikit-learn",
                 "diffusers", "tqdm", "matplotlib"],
        # bench/run.sh (the README's main job): diffusers (the Flux / Wan models of bench_e2e,
        # bench_cache, bench_sampler), accelerate (diffusers loads a Wan checkpoint, whose
        # modules kept in fp32 need it, only through it: bench_e2e --model), matplotlib
        # (bench_e2e's and the CPU demo's PNG), tqdm (progress bars), scikit-learn (the bundled
        # digits the CPU demo's model, pyops.models.digits, is trained on)
        "bench": ["diffusers", "accelerate", "matplotlib", "tqdm", "scikit-learn"],
    },
    **kwargs,
)
