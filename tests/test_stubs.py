"""The checked-in type stubs say exactly what the classes take (IDEs and type checkers read them)."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

import adamkit.torch as akt

ROOT = Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("make_stubs", ROOT / "tools" / "make_stubs.py")
make_stubs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_stubs)


@pytest.mark.parametrize("module", ["adamkit.torch", "adamkit.numpy"])
def test_stub_matches_the_runtime_signatures(module):
    path = ROOT / "src" / "adamkit" / f"{module.split('.')[1]}.pyi"
    assert path.read_text() == make_stubs.render(module), f"run: python tools/make_stubs.py ({path} is stale)"


@pytest.mark.parametrize("name", list(akt.OPTIMIZERS))
def test_torch_classes_take_torch_optims_keywords_with_its_defaults(name):
    ours = inspect.signature(akt.OPTIMIZERS[name]).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    for key, p in theirs.items():
        assert key in ours and ours[key].default == p.default and ours[key].kind == p.kind, key
    assert set(ours) - set(theirs) <= {"fused", "check_finite", "stochastic_rounding", "state_precision"}
