"""Op definitions (torch.library, namespace ``pyops``): schema, fake, backend dispatch."""
from . import quantize_fp8, quantize_nvfp4  # noqa: F401  (registers the ops)
