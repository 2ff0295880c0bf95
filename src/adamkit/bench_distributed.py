"""``adamkit bench --distributed``: the optimizer step on FSDP2 shards, 2 CPU processes, in one run.

Each rank holds its Shard(0) half of every parameter of the transformer-like model as a DTensor (``fully_shard``)
and steps it with adamkit and with every path torch.optim offers on DTensors, round-robin with a memory-floor loop
over the rank's local shards (the same streams as the step, no math). A step needs no communication, so each rank
times its own; the table shows the slower rank (the one a training step waits for). Each rank runs one thread: two
processes on two cores.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np

WORLD = 2


def _sharded_params(shapes: list[tuple[int, ...]], seed: int) -> tuple[Any, list]:
    """A module holding ``shapes`` as parameters, sharded by ``fully_shard``, with DTensor gradients."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    gen = torch.Generator().manual_seed(seed)
    module = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes])
    fully_shard(module)
    params = list(module.parameters())
    for p in params:
        local = torch.randn(p._local_tensor.shape, generator=gen) * 1e-3
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                    stride=p.stride())
    return module, params


def _torch_paths(name: str, cfg: dict, shapes: list) -> dict[str, Callable[[], Any]]:
    """torch.optim's paths that step DTensors here (each tried once; a path that raises is left out)."""
    import torch
    cls = getattr(torch.optim, name)
    paths = {"torch single": dict(foreach=False), "torch foreach": dict(foreach=True)}
    if "fused" in cls.__init__.__code__.co_varnames:
        paths["torch fused"] = dict(fused=True)
    out = {}
    for path, extra in paths.items():
        _, params = _sharded_params(shapes, 1)
        opt = cls(params, **cfg, **extra)
        try:
            opt.step()
        except Exception:  # noqa: BLE001 - a path torch does not offer for DTensors is simply not compared
            continue
        out[path] = opt.step  # the optimizer keeps the sharded parameters alive
    return out


def _measure(total: int, steps: int, only: list[str]) -> dict:
    """This rank's part of the run: every selected config timed on its shards; the slower rank's times."""
    import torch.distributed as dist

    import adamkit.torch as akt
    from . import bench

    shapes = bench.transformer_shapes(total)
    rows = []
    for label, name, cfg in [c for c in bench.CONFIGS if not only or c[0] in only or c[1] in only]:
        _, ours = _sharded_params(shapes, 0)
        local_shapes = [tuple(p._local_tensor.shape) for p in ours]
        calls: dict[str, Callable[[], Any]] = {"floor": bench.floor_step(local_shapes, bench._state_streams(name, cfg)),
                                               "adamkit": akt.OPTIMIZERS[name](ours, **cfg).step}
        calls.update(_torch_paths(name, cfg, shapes))
        dist.barrier()
        ms = bench.interleaved_medians(calls, steps)
        slowest = [None] * WORLD
        dist.all_gather_object(slowest, ms)
        ms = {k: max(r[k] for r in slowest) for k in ms}
        floor = ms.pop("floor")
        best = min((k for k in ms if k.startswith("torch")), key=ms.get)
        rows.append({"config": label, "floor_ms": floor, "ms": ms, "torch_best_path": best,
                     "speedup_vs_torch_best": ms[best] / ms["adamkit"], "pct_of_floor": 100 * floor / ms["adamkit"]})
    local = sum(int(np.prod(s)) for s in local_shapes)
    return {"world_size": WORLD, "params": sum(int(np.prod(s)) for s in shapes), "params_per_rank": local,
            "steps": steps, "rows": rows}


def _rank(rank: int, total: int, steps: int, only: list[str], out: str, store_dir: str) -> None:
    os.environ["NUMBA_NUM_THREADS"] = "1"  # before numba starts in this process: one thread per rank
    import torch

    from ._ranks import as_gloo_rank

    torch.set_num_threads(1)
    as_gloo_rank(rank, WORLD, store_dir, out, lambda: _measure(total, steps, only))


def run(total: int, steps: int, only: list[str] | None, log: Callable[[str], None]) -> dict:
    """Spawn the 2 ranks, wait for them, return rank 0's results."""
    import torch.multiprocessing as mp

    log(f"[FSDP2] {WORLD} processes, gloo, {total / 1e6:.1f} M params in Shard(0) halves, median of {steps} steps")
    with tempfile.TemporaryDirectory(prefix="adamkit-bench-") as directory:  # the ranks' store and results
        out = os.path.join(directory, "results.json")
        mp.spawn(_rank, args=(total, steps, only or [], out, directory), nprocs=WORLD, join=True)
        with open(out) as f:
            results = json.load(f)
    for r in results["rows"]:
        log(f"  {r['config']:17s} floor {r['floor_ms']:7.2f} ms | "
            + " | ".join(f"{k} {v:.2f}" for k, v in r["ms"].items()))
    return results


def table(results: dict) -> str:
    """The markdown table of a distributed run."""
    lines = ["| config | adamkit ms | shard floor ms | torch best ms (path) | × vs torch best | % of floor |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        best = r["torch_best_path"].replace("torch ", "")
        lines.append(f"| {r['config']} | {r['ms']['adamkit']:.2f} | {r['floor_ms']:.2f} | "
                     f"{r['ms'][r['torch_best_path']]:.2f} ({best}) | {r['speedup_vs_torch_best']:.2f}× | "
                     f"{r['pct_of_floor']:.0f} % |")
    return "\n".join(lines)
