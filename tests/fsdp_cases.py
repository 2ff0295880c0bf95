"""FSDP2 (``fully_shard``) on 2 CPU processes with gloo: adamkit against torch.optim on DTensor shards.

``python tests/fsdp_cases.py OUT.json`` runs every case on 2 ranks and writes rank 0's results to OUT.json;
``test_distributed.py`` runs it in a child process with a time limit, so a crash or a hang is one failed test.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adamkit._ranks import as_gloo_rank

STEPS = 20
CLASSES = {"SGD": dict(lr=0.05, momentum=0.9), "Adagrad": dict(lr=0.05), "RMSprop": dict(lr=0.01, centered=True),
           "Adam": dict(lr=1e-2, amsgrad=True), "AdamW": dict(lr=1e-2), "Adamax": dict(lr=1e-2),
           "NAdam": dict(lr=1e-2), "RAdam": dict(lr=1e-2)}


def model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)).to(dtype)


def sharded(dtype: torch.dtype) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard
    m = model(dtype)
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(m)


def train(m: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, dtype: torch.dtype, start: int = 0) -> None:
    rank = dist.get_rank()
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * t + rank)
        x = torch.randn(8, 96, generator=g, dtype=dtype)
        loss = m(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def full(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in m.parameters()]


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


def parity(dtype: torch.dtype) -> dict[str, float]:
    """adamkit against torch.optim after STEPS training steps; in float32 also torch.optim against itself with one
    ulp of difference once (:func:`torch_one_ulp`), the scale of what rounding alone leads to."""
    import adamkit.torch as ak
    out = {}
    for name, kw in CLASSES.items():
        ours, theirs = sharded(dtype), sharded(dtype)
        opt = getattr(ak, name)(ours.parameters(), **kw)
        ref = getattr(torch.optim, name)(theirs.parameters(), **kw)
        train(ours, opt, STEPS, dtype), train(theirs, ref, STEPS, dtype)
        batches = [b for _, _, bs in opt._kernel_plan.groups for b in bs]
        out[name] = {"difference": rel(full(ours), full(theirs)),
                     "compiled_tensors": sum(len(b.params) for b in batches),
                     "reference_tensors": len(opt._kernel_plan.reference)}
        if dtype == torch.float32:
            out[name]["torch_one_ulp"] = rel(torch_one_ulp(name, kw, dtype), full(theirs))
    return out


def torch_one_ulp(name: str, kw: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """torch.optim's parameters after STEPS steps, with a quarter of each shard's elements moved up by one ulp after
    the first step: about as many elements as the compiled kernels' rounding differs in from torch's in one step
    (fused multiply-adds, and torch's float32 ``sqrt``, which is not correctly rounded)."""
    m = sharded(dtype)
    opt = getattr(torch.optim, name)(m.parameters(), **kw)
    train(m, opt, 1, dtype)
    g = torch.Generator().manual_seed(11 + dist.get_rank())
    with torch.no_grad():
        for p in m.parameters():
            shard = p._local_tensor
            up = torch.nextafter(shard, torch.full_like(shard, float("inf")))
            shard.copy_(torch.where(torch.rand(shard.shape, generator=g) < 0.25, up, shard))
    train(m, opt, STEPS - 1, dtype, start=1)
    return full(m)


def dcp_resume(precision: str | None) -> dict:
    """Train 4 steps, save with DCP, train 4 more; a fresh model and optimizer loaded from the save and trained the
    same 4 steps must end bit for bit where the first did."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import adamkit.torch as ak
    path = os.environ["FSDP_CASES_DIR"] + f"/ckpt-{precision}"
    m = sharded(torch.float32)
    opt = ak.AdamW(m.parameters(), lr=1e-2, state_precision=precision)
    train(m, opt, 4, torch.float32)
    model_sd, optim_sd = get_state_dict(m, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    save_full_states(optim_sd, path)
    train(m, opt, 4, torch.float32, start=4)
    m2 = sharded(torch.float32)
    opt2 = ak.AdamW(m2.parameters(), lr=1e-2, state_precision=precision)
    model_sd, optim_sd = get_state_dict(m2, opt2)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(m2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(m2, opt2, 4, torch.float32, start=4)
    same = all(torch.equal(a, b) for a, b in zip(full(m), full(m2)))
    return {"bit_for_bit": same, "difference": rel(full(m2), full(m))}


def full_states(optim_sd: dict) -> dict[str, torch.Tensor]:
    """Every array state of a DCP optimizer state dict as one full float64 tensor (a collective: all ranks call)."""
    out = {}
    for fqn, entry in optim_sd["state"].items():
        for k, v in entry.items():
            if k != "step":
                out[f"{fqn}/{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).double()
    return out


def save_full_states(optim_sd: dict, path: str) -> None:
    full_sd = full_states(optim_sd)
    if dist.get_rank() == 0:
        torch.save(full_sd, path + ".full.pt")


def reshard(path: str, save_to: str | None) -> dict:
    """Load the int8 DCP checkpoint at ``path`` on this world size; the states must equal the saved ones up to
    requantization in this world size's blocks. Then save the optimizer to ``save_to`` for the next reshard."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import adamkit.torch as ak
    m = sharded(torch.float32)
    opt = ak.AdamW(m.parameters(), lr=1e-2, state_precision="int8")
    train(m, opt, 1, torch.float32)  # states exist, as in a run being resumed
    model_sd, optim_sd = get_state_dict(m, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = full_states(get_state_dict(m, opt)[1])
    saved = torch.load(path + ".full.pt")
    error = max(float((loaded[k] - saved[k]).abs().max() / saved[k].abs().max().clamp_min(1e-30)) for k in saved)
    if save_to:
        model_sd, optim_sd = get_state_dict(m, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=save_to)
        save_full_states(optim_sd, save_to)
    return {"world_size": dist.get_world_size(), "relative_error": error, "keys": len(saved)}


def int8_training() -> dict:
    """int8 states on shards: bytes per parameter, and the final loss against fp32 states."""
    import adamkit.torch as ak
    losses, nbytes = {}, 0
    for precision in (None, "int8"):
        m = sharded(torch.float32)
        opt = ak.AdamW(m.parameters(), lr=1e-2, state_precision=precision)
        train(m, opt, STEPS, torch.float32)
        x = torch.randn(64, 96, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            losses[str(precision)] = float(m(x).square().mean())
        if precision:  # state bytes per parameter over the shards stored in 8 bits (>= 4096 local elements)
            big = [p for p in m.parameters() if p._local_tensor.numel() >= 4096]
            nbytes = sum(held_bytes(v) for p in big for k, v in opt.state[p].items() if k != "step")
            nbytes /= sum(p._local_tensor.numel() for p in big)
            reads = logger_reads(opt, big)
    return {"losses": losses, "bytes_per_param": nbytes, "reads": reads}


def logger_reads(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    """What code reading 8-bit DTensor states on 2 ranks gets: DTensors over QuantizedState shards whose
    all-gathered values, norms and EMA copies are the values ``state_dict()`` exports (collectives: all ranks)."""
    exported = opt.state_dict()["state"]
    ids = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    out = {"quantized": True, "values": True, "norm": 0.0, "ema": True}
    for p in params:
        for k in ("exp_avg", "exp_avg_sq"):
            s, values = opt.state[p][k], exported[ids[id(p)]][k].full_tensor()
            out["quantized"] &= type(s._local_tensor).__name__ == "QuantizedState"
            out["values"] &= torch.equal(s.full_tensor(), values)
            norm = float(s.float().norm().full_tensor())  # a logger's norm: a reduction over both ranks
            out["norm"] = max(out["norm"], abs(norm - float(values.norm())) / float(values.norm()))
            ema = s.detach().clone()
            ema.mul_(0.5)  # an 8-bit copy; halving keeps its codes and halves its scales: exact
            out["ema"] &= torch.equal(ema.full_tensor(), 0.5 * values) and torch.equal(s.full_tensor(), values)
    return out


def held_bytes(state: torch.Tensor) -> int:
    """Bytes a state holds on this rank: its local shard's, an 8-bit one's codes and scales."""
    local = state._local_tensor if hasattr(state, "_local_tensor") else state
    return local.codes.nbytes + local.absmax.nbytes if hasattr(local, "codes") else local.nbytes


def nonfinite_on_one_rank() -> dict:
    """check_finite=True with a nan in rank 1's shard only: every rank refuses the step, nothing changes."""
    import adamkit.torch as ak
    m = sharded(torch.float32)
    opt = ak.Adam(m.parameters(), lr=1e-2, check_finite=True)
    train(m, opt, 2, torch.float32)
    before = full(m)
    m(torch.randn(8, 96)).square().mean().backward()
    if dist.get_rank() == 1:
        next(m.parameters()).grad._local_tensor[0] = float("nan")
    try:
        opt.step()
        refused = False
    except FloatingPointError:
        refused = True
    flags = [None, None]
    dist.all_gather_object(flags, refused)
    return {"refused_on_every_rank": all(flags), "unchanged": all(torch.equal(a, b) for a, b in zip(before, full(m)))}


def mixed_precision_and_clipping() -> dict:
    """MixedPrecisionPolicy (bf16 compute, fp32 shards) and clip_grad_norm_ over DTensor gradients, against
    torch.optim doing the same."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import adamkit.torch as ak
    runs = []
    for cls in (ak.AdamW, torch.optim.AdamW):
        m = model(torch.float32)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mp_policy=policy)
        fully_shard(m, mp_policy=policy)
        opt = cls(m.parameters(), lr=1e-2)
        for t in range(5):
            x = torch.randn(8, 96, generator=torch.Generator().manual_seed(t))
            opt.zero_grad()
            m(x.to(torch.bfloat16)).float().square().mean().backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
            opt.step()
        runs.append(full(m))
    return {"difference": rel(*runs)}


def cpu_offload() -> dict:
    """FSDP2's CPU offload (``pin_memory=False``: pinning needs an accelerator) with adamkit's AdamW on the
    compiled path, against torch.optim.AdamW on the same model without offload (on CPU the offload moves nothing,
    so the two must agree as the plain FSDP2 runs do). One offloaded model per process: a second one aborts in
    torch's own all-gather, with torch.optim too."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    import adamkit.torch as ak
    runs, compiled = [], 0
    for offload in (True, False):
        m = model(torch.float32)
        policy = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if offload else {}
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, **policy)
        fully_shard(m, **policy)
        opt = (ak.AdamW if offload else torch.optim.AdamW)(m.parameters(), lr=1e-2)
        train(m, opt, 5, torch.float32)
        if offload:
            compiled = sum(len(b.params) for b in opt._kernel_plan.batches())
        runs.append(full(m))
    return {"difference": rel(*runs), "compiled_tensors": compiled}


def across_libraries() -> dict:
    """A DCP checkpoint of FSDP2 shards moves between adamkit and torch.optim, both ways: the loader's next 4 steps
    end where the saver's own next 4 steps end (float32 round-off of the two implementations)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import adamkit.torch as ak
    out = {}
    for saver, loader in ((ak.AdamW, torch.optim.AdamW), (torch.optim.AdamW, ak.AdamW)):
        path = os.environ["FSDP_CASES_DIR"] + f"/ckpt-{saver.__module__}"
        m = sharded(torch.float32)
        opt = saver(m.parameters(), lr=1e-2)
        train(m, opt, 4, torch.float32)
        model_sd, optim_sd = get_state_dict(m, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        train(m, opt, 4, torch.float32, start=4)
        m2 = sharded(torch.float32)
        opt2 = loader(m2.parameters(), lr=1e-2)
        model_sd, optim_sd = get_state_dict(m2, opt2)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(m2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train(m2, opt2, 4, torch.float32, start=4)
        out[f"{saver.__module__} -> {loader.__module__}"] = rel(full(m2), full(m))
    return out


def tensor_parallel() -> dict:
    """Tensor-parallel placements (Replicate, Shard(1)) on a mesh of the 2 ranks, every class: each rank steps its
    local shard through the kernels. float32 states against torch.optim on the full tensors; bf16 and int8 states
    against adamkit stepping the same local shard as a plain tensor (same blocks and rounding: bit for bit). The
    states are DTensors with the parameter's mesh and placements, and Replicate's replicas stay equal on every
    rank though each rank's global generator is seeded differently (the rounding stream's key is fixed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(dist.get_rank())
    return {f"{placement}/{name}/{precision}": tensor_parallel_case(mesh, placement, name, precision)
            for placement in (Replicate(), Shard(1)) for name in CLASSES
            for precision in ((None, "bf16", "int8") if name in ("AdamW", "RMSprop") else (None,))}


def tensor_parallel_case(mesh, placement, name: str, precision: str | None, steps: int = 10) -> dict:
    """One class and state precision on parameters placed by ``placement`` (see :func:`tensor_parallel`)."""
    from torch.distributed.tensor import distribute_tensor

    import adamkit.torch as ak
    kw, shapes = CLASSES[name], [(48, 600), (96, 333)]  # Shard(1) of 333 columns: uneven shards
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    dparams = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [placement])) for p in start]
    local = [torch.nn.Parameter(d._local_tensor.detach().clone()) for d in dparams]
    plain = [torch.nn.Parameter(p.clone()) for p in start]
    opt = getattr(ak, name)(dparams, state_precision=precision, **kw)
    ref = (getattr(torch.optim, name)(plain, **kw) if precision is None
           else getattr(ak, name)(local, state_precision=precision, **kw))
    for t in range(steps):
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(100 * t + i)) for i, s in enumerate(shapes)]
        for d, p, q, g in zip(dparams, plain, local, grads):
            d.grad = distribute_tensor(g, mesh, [placement])
            p.grad, q.grad = g.clone(), d.grad._local_tensor.clone()
        opt.step(), ref.step()
    states = [(d, v) for d in dparams for v in opt.state[d].values() if v.dim() > 0]  # not step, mu_product
    replicas = [None] * dist.get_world_size()
    dist.all_gather_object(replicas, [d._local_tensor for d in dparams])
    return {"difference": rel([d.full_tensor() for d in dparams], [p.detach() for p in plain]) if precision is None
            else None,
            "bit_for_bit": all(map(torch.equal, (d._local_tensor for d in dparams), (p.detach() for p in local)))
            if precision else None,
            "compiled_tensors": sum(len(b.params) for b in opt._kernel_plan.batches()),
            "states_placed": len(states) > 0 and all(v.placements == d.placements and v.device_mesh == mesh
                                                     for d, v in states),
            "replicas_equal": placement.is_shard() or all(torch.equal(a, b) for r in replicas
                                                          for a, b in zip(r, replicas[0]))}


def ddp_replicas() -> dict:
    """DDP with bf16 states and bf16 params with stochastic rounding, each rank's global generator seeded
    differently: every rank's replica must stay bit for bit the same (the rounding stream's key is fixed)."""
    import adamkit.torch as ak
    out = {}
    for label, dtype, kw in (("bf16 states", torch.float32, dict(state_precision="bf16")),
                             ("bf16 params, stochastic rounding", torch.bfloat16, dict(stochastic_rounding=True))):
        torch.manual_seed(1000 + dist.get_rank())  # DDP broadcasts rank 0's parameters
        m = torch.nn.parallel.DistributedDataParallel(model(dtype))
        opt = ak.AdamW(m.parameters(), lr=1e-2, **kw)
        train(m, opt, 5, dtype)
        replicas = [None] * dist.get_world_size()
        dist.all_gather_object(replicas, [p.detach() for p in m.parameters()])
        out[label] = all(torch.equal(a, b) for r in replicas for a, b in zip(r, replicas[0]))
    return out


def run_offload(rank: int, out: str, store_dir: str) -> None:
    as_gloo_rank(rank, 2, store_dir, out, cpu_offload)


def run(rank: int, out: str, store_dir: str) -> None:
    os.environ["FSDP_CASES_DIR"] = store_dir
    as_gloo_rank(rank, 2, store_dir, out, lambda: {
        "float32": parity(torch.float32), "float64": parity(torch.float64),
        "dcp_fp32": dcp_resume(None), "dcp_bf16": dcp_resume("bf16"), "dcp_int8": dcp_resume("int8"),
        "int8": int8_training(), "nonfinite": nonfinite_on_one_rank(),
        "mixed_precision": mixed_precision_and_clipping(), "across_libraries": across_libraries(),
        "tensor_parallel": tensor_parallel(), "ddp_replicas": ddp_replicas()})


def run_reshard(rank: int, world: int, path: str, save_to: str, out: str, store_dir: str) -> None:
    as_gloo_rank(rank, world, store_dir, out, lambda: reshard(path, save_to or None))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:  # the ranks' rendezvous store (and a default checkpoint)
        if sys.argv[1] == "--offload":  # --offload OUT.json
            mp.spawn(run_offload, args=(sys.argv[2], scratch), nprocs=2, join=True)
        elif sys.argv[1] == "--reshard":  # --reshard WORLD CHECKPOINT SAVE_TO OUT.json
            world, path, save_to, out = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
            mp.spawn(run_reshard, args=(world, path, save_to, out, scratch), nprocs=world, join=True)
        else:  # OUT.json [CHECKPOINT_DIR]
            directory = sys.argv[2] if len(sys.argv) > 2 else scratch
            mp.spawn(run, args=(sys.argv[1], directory), nprocs=2, join=True)
