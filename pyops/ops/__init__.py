"""Op definitions (torch.library, namespace ``pyops``): schema, fake, backend dispatch."""
from . import quantize_fp8, quantize_nvfp4  # noqa: F401  (registers the ops)
from . import sample_step  # noqa: F401,E402  (registers pyops::sample_step)
from . import norm_modulate_quant  # noqa: F401,E402  (registers pyops::norm_modulate_quant)
from . import gelu_quant  # noqa: F401,E402  (registers pyops::gelu_quant)
from . import fp8_linear  # noqa: F401,E402  (registers pyops::fp8_linear)
from . import nvfp4_linear  # noqa: F401,E402  (registers pyops::nvfp4_linear)
from . import block_similarity, cache_apply, graph_conditional  # noqa: F401,E402  (registers pyops::block_similarity, pyops::cache_apply, the fake of pyops::_graph_set_conditional)
from . import attention  # noqa: F401,E402  (registers pyops::attention)
