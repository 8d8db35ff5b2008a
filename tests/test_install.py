"""Editable install used from the folder that contains the clone.

A clone is a folder named ``pyops`` without ``__init__.py``; from its parent, Python's path search
finds it as a namespace package. With setuptools' default editable import hook (asked after the
path search), ``python -m pyops info`` there failed with ``ImportError: cannot import name 'info'
from 'pyops' (unknown location)``. setup.py installs editable as a path entry instead.
"""
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_clone(dst: Path) -> None:
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                  "_build_info.json", "out", ".pytest_cache")
    shutil.copytree(ROOT, dst, ignore=skip, symlinks=True)


@pytest.mark.skipif(sys.platform != "linux", reason="symlink-based editable install: Linux")
def test_editable_install_imports_from_the_clone_parent(tmp_path):
    clone = tmp_path / "pyops"
    _copy_clone(clone)
    env_dir = tmp_path / "venv"
    # system site packages: reuse this interpreter's torch; the venv's own entries come first
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    env = dict(os.environ, PYOPS_SKIP_CUDA_BUILD="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-e", str(clone)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    code = ("import pyops, pyops.triton_kernels as tk, os;"
            "print(os.path.realpath(pyops.__file__)); print(os.path.realpath(tk.__file__));"
            "print(callable(pyops.info))")
    shutil.rmtree(clone / "build", ignore_errors=True)  # `rm -rf build` must not break it
    for cwd in (tmp_path, tmp_path.parent, clone / "tests"):
        r = subprocess.run([py, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"from {cwd}:\n{r.stderr}"
        init, tk_init, ok = r.stdout.split()
        assert init == str((clone / "pyops" / "__init__.py").resolve()), (cwd, init)
        assert tk_init == str((clone / "triton_kernels" / "__init__.py").resolve()), (cwd, tk_init)
        assert ok == "True"
    r = subprocess.run([py, "-m", "pyops", "info"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "backends on" in r.stdout


def test_plain_install_keeps_the_build_reason(tmp_path):
    """`pip install .` (not editable) ships _build_info.json, so `python -m pyops info` can say
    why the CUDA extension was not built."""
    clone = tmp_path / "src"
    _copy_clone(clone)
    site = tmp_path / "site"
    env = dict(os.environ, PYOPS_SKIP_CUDA_BUILD="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(site), str(clone)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    info = site / "pyops" / "_build_info.json"
    assert info.is_file()
    assert "PYOPS_SKIP_CUDA_BUILD" in info.read_text()
    assert (site / "pyops" / "triton_kernels" / "__init__.py").is_file()
