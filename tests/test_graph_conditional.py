"""pyops.ops.graph_conditional (pyops::_graph_set_conditional, the CUDA graph IF-node setter):
the fake is registered exactly when the extension defines the op, the fake fits the binding's
schema (opcheck on a stub op with that schema, CPU), the wrapper refuses bad input before any
launch, the handle conversion to the schema's int64, and pyops.graphs calls through the op
module. The captured IF-node behaviour itself is tested on a GPU in tests/test_cache.py
(test_graph_conditional_region_equals_eager, test_graphed_cached_forward_equals_eager_*)."""
import re

import pytest
import torch

from pyops import graphs as G
from pyops.ops import graph_conditional as GC

from _util import HAS_CUDA, ROOT


def _binding_schema() -> str:
    """The schema the C++ binding defines (csrc/bindings/graph_conditional.cpp)."""
    src = (ROOT / "csrc" / "bindings" / "graph_conditional.cpp").read_text()
    m = re.search(r'm\.def\(\s*"(_graph_set_conditional\([^"]*)"', src)
    assert m, "csrc/bindings/graph_conditional.cpp no longer defines _graph_set_conditional"
    return m.group(1)


def _fake_kernel(qualname: str):
    from torch._library.simple_registry import singleton
    return singleton.find(qualname).fake_impl.kernel


def test_fake_registered_when_the_extension_defines_the_op():
    ok, why = GC.status()
    if not ok:
        assert _fake_kernel(GC.QUALNAME) is None  # registered only when the binding exists
        pytest.skip(f"extension without the setter: {why}")
    assert _fake_kernel(GC.QUALNAME) is not None
    if HAS_CUDA:  # the fake answers for the real op under FakeTensorMode
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode()
        flag = mode.from_tensor(torch.zeros(4, dtype=torch.int32, device="cuda"))
        with mode:
            assert torch.ops.pyops._graph_set_conditional(flag, 1, 12345, True) is None


_STUB_LIB = None


def _stub_op():
    """A stand-in op with the binding's schema in a private namespace (a CPU kernel that does
    nothing), carrying the module's fake."""
    global _STUB_LIB
    name = "pyops_test_graph_conditional"
    if _STUB_LIB is None:
        _STUB_LIB = torch.library.Library(name, "DEF")
        _STUB_LIB.define(_binding_schema())
        _STUB_LIB.impl("_graph_set_conditional", lambda flag, index, handle, invert: None,
                       "CPU")
        torch.library.register_fake(f"{name}::_graph_set_conditional")(GC._fake)
    return getattr(torch.ops, name)._graph_set_conditional.default


def test_fake_fits_the_binding_schema_opcheck():
    op = _stub_op()
    flag = torch.tensor([0, 3, 0], dtype=torch.int32)
    for args in ((flag, 0, 1, True), (flag, 2, -(2 ** 63), False)):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_fake_traces_under_compile_fullgraph():
    op = _stub_op()

    def f(flag):
        op(flag, 1, 7, True)
        return flag + 1
    flag = torch.tensor([0, 3], dtype=torch.int32)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(flag)
    assert torch.equal(out, flag + 1)


def test_signed_handle_is_twos_complement():
    assert GC.signed_handle(0) == 0
    assert GC.signed_handle(2 ** 63 - 1) == 2 ** 63 - 1
    assert GC.signed_handle(2 ** 63) == -(2 ** 63)
    assert GC.signed_handle(2 ** 64 - 1) == -1
    for bad in (-1, 2 ** 64):
        with pytest.raises(ValueError, match="unsigned 64-bit"):
            GC.signed_handle(bad)


def test_wrapper_refuses_bad_input_before_launch():
    dev = "cuda" if HAS_CUDA else "cpu"
    flag = torch.zeros(4, dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match="run_when"):
        GC.graph_set_conditional(flag, 0, 1, run_when="maybe")
    with pytest.raises(ValueError, match="int32"):
        GC.graph_set_conditional(flag.long(), 0, 1)
    with pytest.raises(ValueError, match="contiguous"):
        GC.graph_set_conditional(torch.zeros(8, dtype=torch.int32, device=dev)[::2], 0, 1)
    with pytest.raises(ValueError, match="CUDA tensor"):
        GC.graph_set_conditional(flag.cpu(), 0, 1)
    if not HAS_CUDA:
        return
    for index in (-1, 4):
        with pytest.raises(ValueError, match=f"index {index} out of range for 4"):
            GC.graph_set_conditional(flag, index, 1)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        GC.graph_set_conditional(flag, 0, -5)


def test_graphs_supported_reports_the_setter_status():
    ok, why = GC.status()
    sup, sup_why = G.supported()
    if not ok:
        assert (sup, sup_why) == (False, why)
    else:
        assert sup or "cuda-python" in sup_why


@pytest.mark.gpu
def test_setter_outside_capture_is_refused_by_the_binding():
    ok, why = GC.status()
    if not ok:
        pytest.fail(f"setter unavailable on a GPU machine: {why}")
    flag = torch.zeros(2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="captured"):
        GC.graph_set_conditional(flag, 0, 1)
