"""Shared helpers: the parity grid and the error measure used across tests."""

from __future__ import annotations

import itertools
import os
import tempfile
from typing import Any

import pytest
import torch

STEPS = 60


def rel_error(a: Any, b: Any) -> float:
    """max|a − b| / max|b|: error relative to the tensor's scale.

    Element-wise relative error is meaningless where a moment crosses zero (cancellation in β·m + (1−β)·g);
    the scale of the tensor is the honest denominator.
    """
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    if a.is_complex() or b.is_complex():
        a, b = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(b.to(torch.complex128))
    a, b = a.to(torch.float64), b.to(torch.float64)
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def _product(**axes: list) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


# Every boolean option on and off, several lr / betas / eps / weight decays.
GRID: dict[str, list[dict]] = {
    "SGD": _product(lr=[0.05], momentum=[0.0, 0.9], dampening=[0.0, 0.2], weight_decay=[0.0, 0.05],
                    maximize=[False, True])
    + [dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=w, maximize=m) for w in (0.0, 0.1) for m in (False, True)],
    "Adagrad": _product(lr=[0.1, 0.01], lr_decay=[0.0, 0.05], weight_decay=[0.0, 0.1],
                        initial_accumulator_value=[0.0, 0.3], maximize=[False, True]),
    "RMSprop": _product(lr=[0.01], alpha=[0.9, 0.99], momentum=[0.0, 0.5], centered=[False, True],
                        weight_decay=[0.0, 0.1], maximize=[False, True]),
    "Adam": _product(lr=[1e-2], betas=[(0.9, 0.999), (0.5, 0.9)], amsgrad=[False, True], weight_decay=[0.0, 0.1],
                     decoupled_weight_decay=[False, True], maximize=[False, True])
    + [dict(lr=0.1, eps=1e-3), dict(lr=3e-4, eps=1e-12, betas=(0.0, 0.5))],
    "AdamW": _product(lr=[1e-2, 1e-3], weight_decay=[0.0, 0.01, 0.5], amsgrad=[False, True], maximize=[False, True]),
    "Adamax": _product(lr=[2e-2, 2e-3], betas=[(0.9, 0.999), (0.3, 0.8)], eps=[1e-8, 1e-3], weight_decay=[0.0, 0.1],
                       maximize=[False, True]),
    "NAdam": _product(lr=[2e-2, 2e-3], momentum_decay=[4e-3, 0.05], weight_decay=[0.0, 0.1],
                      decoupled_weight_decay=[False, True], maximize=[False, True]),
    "RAdam": _product(lr=[1e-2, 1e-3], betas=[(0.9, 0.999), (0.8, 0.9)], weight_decay=[0.0, 0.1],
                      decoupled_weight_decay=[False, True], maximize=[False, True]),
}

# a second param group with different hyperparameters
SECOND_GROUP = {"SGD": dict(lr=0.01), "Adagrad": dict(lr=0.05), "RMSprop": dict(lr=0.003, alpha=0.95),
                "Adam": dict(lr=3e-3, betas=(0.8, 0.99)), "AdamW": dict(lr=3e-3, weight_decay=0.2),
                "Adamax": dict(lr=5e-3), "NAdam": dict(lr=5e-3), "RAdam": dict(lr=5e-3, betas=(0.85, 0.95))}


def grid_cases() -> list[tuple[str, dict]]:
    return [(name, cfg) for name, cfgs in GRID.items() for cfg in cfgs]


def make_problem(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Initial params (matrix, vector, and a small tensor) and a fixed target for the quadratic-plus-noise loss."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (11,), (3, 2, 2)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    return params, targets


def gradient(p: torch.Tensor, target: torch.Tensor, t: int, i: int) -> torch.Tensor:
    """Deterministic gradient: a quadratic's pull plus step-dependent noise (so moments see sign changes)."""
    gen = torch.Generator().manual_seed(1000 * t + i)
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    return (p.detach() - target) * 0.5 + noise


def has_grad(t: int, i: int) -> bool:
    """Parameter 1 has no gradient every third step (its step count must not advance)."""
    return not (i == 1 and t % 3 == 1)


def stepped_once(cls: Any, numel: int, **options: Any) -> tuple[torch.nn.Parameter, Any]:
    """A parameter of ``numel`` random values and an optimizer ``cls(**options)`` that has taken one step on it."""
    p = torch.nn.Parameter(torch.randn(numel))
    opt = cls([p], **options)
    p.grad = torch.randn_like(p)
    opt.step()
    return p, opt


@pytest.fixture
def world_of_one():
    """A one-process gloo group and its device mesh (DTensors without child processes)."""
    import torch.distributed as dist
    from torch.distributed.tensor import init_device_mesh
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield init_device_mesh("cpu", (1,))
        finally:
            dist.destroy_process_group()


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="test_fuzz.py: about 21,000 generated cases with random seeds (default: a bounded, "
                          "fixed-seed run)")
