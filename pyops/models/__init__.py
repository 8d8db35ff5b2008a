"""Reference models shipped with pyops (the embedded defaults for demos, tests and benchmarks)."""
from .dit import DiT, DiTBlock, DiTConfig  # noqa: F401
