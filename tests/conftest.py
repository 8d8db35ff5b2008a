"""Test setup: CPU machines run the references and the Triton kernels in the interpreter.

GPU tests carry ``@pytest.mark.gpu`` and are skipped (never failed) without CUDA.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must happen before any @triton.jit kernel is defined (at import of pyops.triton_kernels.*).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "build: compiles the CUDA sources (nvcc, cmake); deselect with -m 'not build'")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
