"""The extension's type stub (`lmtools/_sampler.pyi`) matches the built module: the same public
names, the same parameters with the same defaults, properties where the module has attributes."""

import ast
import inspect
from pathlib import Path

import pytest

import lmtools
from lmtools import _sampler

STUB = ast.parse((Path(lmtools.__file__).parent / "_sampler.pyi").read_text())


def public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def stub_params(fn: ast.FunctionDef) -> list[tuple[str, object]]:
    """(name, default or inspect.Parameter.empty) for each parameter but self."""
    args = fn.args.posonlyargs + fn.args.args
    defaults = [inspect.Parameter.empty] * (len(args) - len(fn.args.defaults)) + [
        ast.literal_eval(d) for d in fn.args.defaults
    ]
    params = list(zip(args, defaults))
    params += [
        (a, ast.literal_eval(d) if d else inspect.Parameter.empty)
        for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults)
    ]
    return [(a.arg, d) for a, d in params if a.arg != "self"]


def runtime_params(obj) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(obj).parameters.values() if p.name != "self"]


def is_property(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)


def test_the_module_has_exactly_the_stubs_public_names():
    stubbed = {node.name for node in STUB.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    annotated = {node.target.id for node in STUB.body if isinstance(node, ast.AnnAssign)}
    assert public(stubbed | annotated) == public(dir(_sampler))  # constants (TOKEN_DTYPES, NPY_MAGIC) too
    assert all(hasattr(_sampler, name) for name in annotated)


@pytest.mark.parametrize("fn", [n for n in STUB.body if isinstance(n, ast.FunctionDef)], ids=lambda n: n.name)
def test_functions_match(fn):
    assert stub_params(fn) == runtime_params(getattr(_sampler, fn.name))


@pytest.mark.parametrize("cls", [n for n in STUB.body if isinstance(n, ast.ClassDef)], ids=lambda n: n.name)
def test_classes_match(cls):
    real = getattr(_sampler, cls.name)
    members = {fn.name: fn for fn in cls.body if isinstance(fn, ast.FunctionDef)}
    assert public(members) == public(dir(real)), cls.name
    for name, fn in members.items():
        static = inspect.getattr_static(real, name)
        if is_property(fn):
            assert inspect.isgetsetdescriptor(static) or isinstance(static, property), name
        elif name == "__init__":
            assert stub_params(fn) == runtime_params(real)
        elif name == "__len__":
            assert callable(getattr(real, name))
        else:
            assert not inspect.isgetsetdescriptor(static), f"{cls.name}.{name} is an attribute, not a method"
            assert stub_params(fn) == runtime_params(getattr(real, name)), name


def test_python_reads_the_token_dtypes_and_npy_magic_from_the_extension():
    import numpy as np

    from lmtools import layout

    assert layout.TOKEN_DTYPES is _sampler.TOKEN_DTYPES and layout.NPY_MAGIC is _sampler.NPY_MAGIC
    assert _sampler.TOKEN_DTYPES == ("uint16", "uint32", "int32", "int64")
    assert _sampler.NPY_MAGIC == np.lib.format.MAGIC_PREFIX
