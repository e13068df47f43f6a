"""One schema source (vgmr_fast/schemas.py) for both namespaces: the vgmr:: operators the C++
kernels implement and the vgmr_triton:: ones of the Triton launchers are defined from it, and the
launchers' annotations agree with it (the schema torch would infer from them is the source's,
``int`` read as ``SymInt``, results unnamed)."""
from __future__ import annotations

import pytest
import torch

from vgmr_fast import schemas
from vgmr_fast.ops import backend

needs_cpp = pytest.mark.skipif(not backend.has_cpp(), reason=f"vgmr_fast._C not built: {backend.cpp_error()}")


def _parsed(qualname: str, schema: str):
    return torch._C.parse_schema(qualname + schema)


def _signature(schema, symint_as_int: bool = False, result_names: bool = True):
    """(arguments as (name, type, default), results) of a parsed schema, for comparison."""
    def typ(t):
        s = str(t)
        return s.replace("SymInt", "int") if symint_as_int else s

    args = [(a.name, typ(a.type), repr(a.default_value)) for a in schema.arguments]
    rets = [(r.name if result_names else "", typ(r.type)) for r in schema.returns]
    return args, rets


@needs_cpp
@pytest.mark.parametrize("name", [*schemas.SCHEMAS, *schemas.CPU_SCHEMAS, *schemas.DEBUG_SCHEMAS])
def test_vgmr_ops_are_the_source_schemas(name):
    source = {**schemas.SCHEMAS, **schemas.CPU_SCHEMAS, **schemas.DEBUG_SCHEMAS}[name]
    op = getattr(torch.ops.vgmr, name).default
    assert _signature(op._schema) == _signature(_parsed(f"vgmr::{name}", source))
    assert torch.Tag.pt2_compliant_tag in op.tags


def test_triton_ops_are_the_source_schemas():
    if not backend.load_triton():
        pytest.skip(f"vgmr_fast.triton did not import: {backend.triton_error()}")
    for name in schemas.TRITON_OPS:
        op = getattr(torch.ops.vgmr_triton, name).default
        want = _parsed(f"vgmr_triton::{name}", schemas.triton_schema(name))
        # (torch.library drops the result names of a Python-defined op)
        assert _signature(op._schema, result_names=False) == _signature(want, result_names=False), name


def test_triton_annotations_infer_the_source_schemas():
    # What torch.library.triton_op would infer from the launchers' annotations: the source's
    # schema modulo SymInt (and unnamed results), so the Python signatures cannot drift from it.
    if not backend.load_triton():
        pytest.skip(f"vgmr_fast.triton did not import: {backend.triton_error()}")
    import vgmr_fast.triton as VT

    if VT.unavailable_reason() and not VT.LAUNCHERS:
        pytest.skip(f"the Triton launchers did not load: {VT.unavailable_reason()}")
    launchers = VT.LAUNCHERS
    assert sorted(launchers) == sorted(schemas.TRITON_OPS)
    for name, fn in launchers.items():
        inferred = _parsed(f"vgmr_triton::{name}", torch.library.infer_schema(fn, mutates_args=()))
        source = _parsed(f"vgmr::{name}", schemas.SCHEMAS[name])
        assert _signature(inferred, symint_as_int=True, result_names=False) == _signature(
            source, result_names=False), name


def test_schema_module_is_a_leaf():
    # module level imports nothing but __future__: the op layer and the Triton package both import
    # it without loading each other (torch only inside define())
    import ast

    tree = ast.parse(open(schemas.__file__).read())
    imported = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [getattr(n, "module", None) for n in imported] == ["__future__"]
