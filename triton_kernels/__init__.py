"""Triton kernels of pyops. Installed as ``pyops.triton_kernels`` (never top-level)."""
