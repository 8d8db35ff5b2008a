"""Moved: the weights to ``pyops/weights.py``, ``linear`` to ``pyops/ops/linear.py`` (transitional
re-export; removed once the tests import the new modules)."""
from .ops.linear import linear  # noqa: F401
from .weights import *  # noqa: F401,F403
from .weights import _dtype_from_name, _dtype_name  # noqa: F401
