"""Ways to change things under an optimizer, each run by ``test_memory_safety.py`` in a child process.

``python tests/safety_cases.py NAME...`` runs the named cases in order and prints one ``RESULT <json>`` line per
case. Each case does the same thing to an adamkit optimizer and to torch.optim's, on identical parameters, and
reports either ``stepped`` with the largest difference between the two afterwards (parameters and states), or
``refused`` with the exception adamkit raised and whether everything was left bit for bit as it was (torch's
own outcome is reported beside it). A crash ends the process: the parent test sees no RESULT for that case.
"""

from __future__ import annotations

import collections
import copy
import json
import sys
import traceback
from typing import Any, Callable

import torch

import adamkit.torch as ak
from adamkit._quantized import QuantizedState

CASES: dict[str, Callable[[], dict]] = {}


def case(fn: Callable[[], dict]) -> Callable[[], dict]:
    CASES[fn.__name__] = fn
    return fn


def twins(name: str = "Adam", shapes=((64, 80), (5000,)), fused: Any = None, dtype=torch.float32, **kw: Any):
    """The same parameters and gradients under adamkit's and torch.optim's ``name``."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, getattr(ak, name)(ours, fused=fused, **kw), theirs, getattr(torch.optim, name)(theirs, **kw)


def grads(params: list, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def snapshot(params: list, opt: Any) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, QuantizedState) and v.root is None:  # its codes and scales as they are (a case may
                out += [v.codes_.clone(), v.absmax_.clone()]       # have broken them)
            elif torch.is_tensor(v):
                out.append(v.detach().clone())
    return out


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    def bits(x: torch.Tensor) -> torch.Tensor:  # nan == nan, bit for bit
        return x.detach().reshape(-1).view(torch.uint8)
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y))
                                    for x, y in zip(a, b))


def difference(ours: list, opt: Any, theirs: list, ref: Any) -> float:
    """Largest difference, relative to each tensor's scale, over parameters and every state tensor."""
    worst = 0.0
    pairs = list(zip(ours, theirs))
    for p, q in zip(ours, theirs):
        a, b = opt.state.get(p, {}), ref.state.get(q, {})
        if set(a) != set(b):
            return float("inf")
        pairs += [(a[k], b[k]) for k in a if torch.is_tensor(a[k])]
    for x, y in pairs:
        x, y = torch.as_tensor(x).detach().double(), torch.as_tensor(y).detach().double()
        if x.shape != y.shape:
            return float("inf")
        scale = float(y.abs().max()) if y.numel() else 0.0
        worst = max(worst, float((x - y).abs().max()) / (scale or 1.0) if y.numel() else 0.0)
    return worst


def outcome(ours: list, opt: Any, theirs: list, ref: Any, change: Callable[[list, Any], None], steps: int = 2) -> dict:
    """Step both ``steps`` times, apply ``change`` to each, then step again; report what happened."""
    for t in range(steps):
        grads(ours, t), grads(theirs, t)
        opt.step(), ref.step()
    change(ours, opt), change(theirs, ref)
    grads(ours, 99), grads(theirs, 99)
    try:
        ref.step()
        torch_outcome = "stepped"
    except Exception as e:  # noqa: BLE001 - torch's own outcome, for the record
        torch_outcome = f"{type(e).__name__}: {e}"[:200]
    before = snapshot(ours, opt)
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 - the error adamkit gives is the result
        return {"outcome": "refused", "error": f"{type(e).__name__}: {e}"[:300], "torch": torch_outcome,
                "unchanged": same_bits(before, snapshot(ours, opt))}
    return {"outcome": "stepped", "torch": torch_outcome, "difference": difference(ours, opt, theirs, ref)}


def both_paths(change: Callable[[list, Any], None], name: str = "Adam", **kw: Any) -> dict:
    """``change`` on the compiled path (fused=None) and the reference path (fused=False)."""
    return {str(fused): outcome(*twins(name, fused=fused, **kw), change) for fused in (None, False)}


# -- state replaced, cleared, re-created ---------------------------------------------------------------------------

@case
def state_tensor_replaced():
    return both_paths(lambda ps, o: o.state[ps[0]].__setitem__("exp_avg", torch.zeros_like(ps[0])))


@case
def state_tensor_replaced_wrong_dtype():
    """A state of another dtype, wider or narrower than the kernel reads (a float16 state under a float32
    parameter would be read past its end; a float32 state under a float16 parameter misread)."""
    def replace(dtype):
        return lambda ps, o: o.state[ps[1]].__setitem__("exp_avg_sq", torch.zeros_like(ps[1], dtype=dtype))
    return {"float64 state": both_paths(replace(torch.float64)), "float16 state": both_paths(replace(torch.float16)),
            "float32 state, float16 param": both_paths(replace(torch.float32), dtype=torch.float16)}


@case
def state_tensor_replaced_wrong_size():
    return both_paths(lambda ps, o: o.state[ps[1]].__setitem__("exp_avg", torch.zeros(10)))


@case
def state_tensor_data_reassigned():
    return both_paths(lambda ps, o: setattr(o.state[ps[1]]["exp_avg"], "data", torch.zeros(7)))


@case
def state_tensor_set_empty():
    return both_paths(lambda ps, o: o.state[ps[1]]["exp_avg_sq"].set_())


@case
def state_tensor_data_repointed_same_layout():
    """New memory of the right layout under the same state tensor (``.data =``, ``set_``): the step must update it,
    as torch.optim does, not the memory planned before."""
    def change(ps, o):
        o.state[ps[0]]["exp_avg"].data = torch.zeros_like(ps[0])
        o.state[ps[1]]["exp_avg_sq"].set_(torch.zeros_like(ps[1]))
    return both_paths(change)


@case
def state_tensor_resized_in_place():
    """``resize_`` to fewer elements keeps the tensor's address: the shape must still be seen."""
    return both_paths(lambda ps, o: o.state[ps[1]]["exp_avg"].resize_(3))


@case
def state_entry_deleted():
    """A state deleted from a tensor that has stepped: torch.optim's KeyError, not a state made again from 0."""
    return both_paths(lambda ps, o: o.state[ps[1]].__delitem__("exp_avg_sq"))


@case
def step_counter_edited_in_place():
    out = {}
    for label, value in (("nan", float("nan")), ("inf", float("inf")), ("negative", -1.0)):
        out[label] = both_paths(lambda ps, o, value=value: o.state[ps[1]]["step"].fill_(value))
    return out


@case
def state_cleared():
    return both_paths(lambda ps, o: o.state.clear())


@case
def state_recreated():
    return both_paths(lambda ps, o: setattr(o, "state", collections.defaultdict(dict)))


@case
def state_entry_replaced_by_copy():
    return both_paths(lambda ps, o: o.state.__setitem__(ps[0], copy.deepcopy(dict(o.state[ps[0]]))))


# -- step counters ---------------------------------------------------------------------------------------------

@case
def step_fill_zero():
    return both_paths(lambda ps, o: [s["step"].fill_(0) for s in o.state.values()], amsgrad=True)


@case
def step_counters_of_every_dtype():
    out = {}
    for dtype in (torch.int64, torch.int32, torch.float16, torch.bfloat16, torch.uint8, torch.float64):
        def change(ps, o, dtype=dtype):
            sd = o.state_dict()
            for s in sd["state"].values():
                s["step"] = s["step"].to(dtype)
            o.load_state_dict(sd)
        out[str(dtype)] = both_paths(change, "NAdam")
    return out


@case
def step_counters_unusable():
    out = {}
    for label, value in (("negative", torch.tensor(-3.0)), ("huge negative", torch.tensor(-1e308, dtype=torch.float64)),
                         ("nan", torch.tensor(float("nan"))), ("string", "7"), ("bool", torch.tensor(True)),
                         ("two elements", torch.tensor([1.0, 2.0]))):
        def change(ps, o, value=value):
            o.state[ps[1]]["step"] = value
        out[label] = both_paths(change)
    return out


@case
def step_as_plain_number():
    def change(ps, o):
        sd = o.state_dict()
        for s in sd["state"].values():
            s["step"] = float(s["step"])
        o.load_state_dict(sd)
    return both_paths(change, "RAdam")


# -- parameters and gradients changed ------------------------------------------------------------------------------

@case
def model_double():
    return both_paths(lambda ps, o: [setattr(p, "data", p.data.double()) for p in ps])


@case
def model_bfloat16():
    return both_paths(lambda ps, o: [setattr(p, "data", p.data.to(torch.bfloat16)) for p in ps])


@case
def model_float16():
    return both_paths(lambda ps, o: [setattr(p, "data", p.data.half()) for p in ps])


@case
def float16_model_float():
    """float16 parameters (float16 states, on the kernels) converted to float32 after the first steps."""
    return both_paths(lambda ps, o: [setattr(p, "data", p.data.float()) for p in ps], dtype=torch.float16)


@case
def param_data_smaller():
    return both_paths(lambda ps, o: setattr(ps[1], "data", ps[1].data[:100]))


@case
def param_data_transposed():
    return both_paths(lambda ps, o: setattr(ps[0], "data", ps[0].data.t().contiguous().t()))


@case
def param_data_reshaped_same_size():
    return both_paths(lambda ps, o: setattr(ps[0], "data", ps[0].data.reshape(-1).clone()))


@case
def param_storage_freed():
    """A parameter whose memory was freed. torch.optim itself crashes the process here (it writes through the freed
    memory), so only adamkit steps."""
    out = {}
    for fused in (None, False):
        ours, opt, _, _ = twins(fused=fused)
        for t in range(2):
            grads(ours, t)
            opt.step()
        ours[1].data.untyped_storage().resize_(0)
        grads(ours[:1], 99)
        ours[1].grad = torch.randn(5000)
        before = snapshot(ours[:1], opt)
        try:
            opt.step()
            out[str(fused)] = {"outcome": "stepped", "difference": float("inf")}
        except Exception as e:  # noqa: BLE001 - the error adamkit gives is the result
            out[str(fused)] = {"outcome": "refused", "error": f"{type(e).__name__}: {e}"[:300],
                               "unchanged": same_bits(before, snapshot(ours[:1], opt))}
    return out


@case
def param_data_new_memory():
    return both_paths(lambda ps, o: setattr(ps[1], "data", ps[1].data.clone()))


def changed_after_gradients(edit: Callable[[list], None], dtype: torch.dtype = torch.float32) -> dict:
    """``edit`` applied to the parameters after their gradients are set for the next step: a gradient's or a
    parameter's ``.data`` replaced behind the other's back (``outcome`` would set new gradients after the
    change; torch.optim is not compared)."""
    def change(ps, o):
        grads(ps, 99)
        edit(ps)
    out = {}
    for fused in (None, False):
        ours, opt, theirs, ref = twins(fused=fused, dtype=dtype)
        grads(ours, 0), grads(theirs, 0)
        opt.step(), ref.step()
        change(ours, opt)
        before = snapshot(ours, opt)
        try:
            opt.step()
            out[str(fused)] = {"outcome": "stepped", "torch": "not compared", "difference": float("inf")}
        except Exception as e:  # noqa: BLE001
            out[str(fused)] = {"outcome": "refused", "error": f"{type(e).__name__}: {e}"[:300],
                               "torch": "not compared", "unchanged": same_bits(before, snapshot(ours, opt))}
    return out


@case
def grad_data_smaller():
    return changed_after_gradients(lambda ps: setattr(ps[1].grad, "data", torch.randn(100)))


@case
def float16_grad_data_float32():
    """A float32 gradient (twice the bytes) under a float16 parameter stepped by the kernels."""
    return changed_after_gradients(lambda ps: setattr(ps[1].grad, "data", torch.randn(5000)), torch.float16)


@case
def float16_param_viewed_as_bfloat16():
    """The same memory, now bfloat16, under float16 gradients and states: the address and size are unchanged,
    the dtype is not (the kernels would read bfloat16 bits as float16)."""
    return changed_after_gradients(lambda ps: setattr(ps[1], "data", ps[1].data.view(torch.bfloat16)),
                                   torch.float16)


@case
def grad_data_viewed_as_int32():
    """The same memory, address and size, now int32: caught by the gradients' metadata guard (one call over all
    of them), as a gradient of another size is."""
    return changed_after_gradients(lambda ps: setattr(ps[1].grad, "data", ps[1].grad.data.view(torch.int32)))


@case
def grad_storage_freed_compiled_path():
    """A gradient whose storage was resized to 0 bytes keeps its shape, and its address becomes 0. torch.optim and
    the reference path (torch ops) read it anyway and crash; the compiled path checks every gradient's address."""
    ours, opt, _, _ = twins()
    grads(ours, 0)
    opt.step()
    grads(ours, 1)
    ours[1].grad.untyped_storage().resize_(0)
    before = snapshot(ours, opt)
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 - the error adamkit gives is the result
        return {"outcome": "refused", "error": f"{type(e).__name__}: {e}"[:300], "torch": "crashes",
                "unchanged": same_bits(before, snapshot(ours, opt))}
    return {"outcome": "stepped", "torch": "crashes", "difference": float("inf")}


@case
def grad_expanded():
    def change(ps, o):
        ps[1].grad = torch.ones(1).expand(5000)
    return both_paths(change)


@case
def params_swapped_in_group():
    def change(ps, o):
        o.param_groups[0]["params"].reverse()
        ps.reverse()
    return both_paths(change, "AdamW")


@case
def int8_state_model_double():
    """8-bit states do not depend on the parameter's dtype: after model.double() the compiled path must step exactly
    as the reference path does (or refuse cleanly)."""
    def run(fused):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(5000))]
        opt = ak.AdamW(ps, state_precision="int8", fused=fused)
        for t in range(2):
            grads(ps, t)
            opt.step()
        for p in ps:
            p.data = p.data.double()
        grads(ps, 99)
        opt.step()
        return ps, opt
    ours, opt = run(None)
    theirs, ref = run(False)
    return {"outcome": "stepped", "torch": "n/a", "difference": difference(ours, opt, theirs, ref)}


# -- 8-bit states (QuantizedState) changed under the optimizer ------------------------------------------------------
# The same change to AdamW with int8 states on each path, beside the reference path doing it too: both must step
# alike (the kernels and the reference path store the same codes), or refuse cleanly with nothing changed.

def int8_twins(fused: Any) -> tuple[list, Any, list, Any]:
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(*s)) for s in ((64, 80), (5000,))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return (ours, ak.AdamW(ours, fused=fused, state_precision="int8"), theirs,
            ak.AdamW(theirs, fused=False, state_precision="int8"))


def int8_paths(change: Callable[[Any], None]) -> dict:
    """``change(opt.state[p])`` for the 5000-element parameter (a ragged last block), on both paths."""
    return {str(fused): outcome(*int8_twins(fused), lambda ps, o: change(o.state[ps[1]])) for fused in (None, False)}


@case
def int8_state_replaced_by_quantized_state():
    return int8_paths(lambda st: st.__setitem__("exp_avg", QuantizedState.from_values(torch.full((5000,), 0.01), True)))


@case
def int8_state_replaced_by_full_precision():
    """A float32 tensor assigned to an 8-bit state: quantized at the step, never read as codes."""
    return int8_paths(lambda st: st.__setitem__("exp_avg_sq", torch.full((5000,), 0.5)))


@case
def int8_state_edited_in_place():
    return int8_paths(lambda st: (st["exp_avg"].zero_(), st["exp_avg_sq"].mul_(0.5)))


@case
def int8_scale_edited_in_place():
    out = {}
    for label, value in (("nan", float("nan")), ("inf", float("inf")), ("negative", -1.0)):
        out[label] = int8_paths(lambda st, value=value: st["exp_avg"].absmax.__setitem__(0, value))
    return out


@case
def int8_state_assigned_values_it_cannot_hold():
    out = {"nan": int8_paths(lambda st: st.__setitem__("exp_avg", torch.full((5000,), float("nan")))),
           "negative": int8_paths(lambda st: st.__setitem__("exp_avg_sq", torch.full((5000,), -1.0)))}
    return out


@case
def int8_codes_replaced():
    """New codes and scales of the right layout put inside the QuantizedState: the state reads them, so the step
    must update them (not the memory planned before)."""
    def change(st):
        q = st["exp_avg"]
        q.codes_, q.absmax_ = torch.zeros_like(q.codes_), torch.zeros_like(q.absmax_)
    return int8_paths(change)


@case
def int8_codes_data_repointed():
    """The codes tensor itself given new memory of the right layout (``.data =``): the state reads it, so the step
    must update it."""
    return int8_paths(lambda st: setattr(st["exp_avg_sq"].codes, "data", torch.zeros_like(st["exp_avg_sq"].codes)))


@case
def int8_codes_replaced_wrong_size():
    return int8_paths(lambda st: setattr(st["exp_avg"], "codes_", st["exp_avg"].codes_[:100]))


@case
def int8_codes_replaced_wrong_dtype():
    return int8_paths(lambda st: setattr(st["exp_avg"], "codes_", st["exp_avg"].codes_.view(torch.uint8)))


@case
def int8_absmax_wrong_shape():
    return int8_paths(lambda st: setattr(st["exp_avg_sq"], "absmax_", st["exp_avg_sq"].absmax_[:-1].clone()))


@case
def int8_codes_data_reassigned():
    return int8_paths(lambda st: setattr(st["exp_avg"].codes, "data", torch.zeros(7, dtype=torch.int8)))


@case
def int8_state_replaced_by_codes():
    """Codes alone (what opt.state held before 8-bit states read as values) cannot be read without scales."""
    return int8_paths(lambda st: st.__setitem__("exp_avg", st["exp_avg"].codes.clone()))


@case
def int8_state_replaced_by_part_of_one():
    return int8_paths(lambda st: st.__setitem__("exp_avg", st["exp_avg"][0:5000]))


def resize_refused(error: Exception, ours: list, opt: Any) -> dict:
    """The outcome of a refused ``resize_(0)`` of memory the kernels write: refused, nothing changed, and the
    optimizer steps on."""
    before = snapshot(ours, opt)
    unchanged = same_bits(before, snapshot(ours, opt))
    grads(ours, 2)
    opt.step()
    return {"outcome": "refused", "error": f"{type(error).__name__}: {error}"[:300], "torch": "n/a",
            "unchanged": unchanged, "steps_on": bool(all(torch.isfinite(p).all() for p in ours))}


def state_storage_freed(get: Callable[[Any, Any], torch.Tensor]) -> dict:
    """The storage of ``get(opt, p)`` resized to 0 bytes after a step of the compiled path, which writes states
    and step counters by address: it made their memory unresizable when it planned, so the resize is refused and
    stepping goes on (torch.optim's torch ops would read and write the freed memory)."""
    ours, opt, _, _ = twins()
    grads(ours, 0)
    opt.step()
    try:
        get(opt, ours[1]).untyped_storage().resize_(0)
    except RuntimeError as e:
        return resize_refused(e, ours, opt)
    return {"outcome": "resized, not refused"}


@case
def state_storage_freed_compiled_path():
    return state_storage_freed(lambda opt, p: opt.state[p]["exp_avg"])


@case
def step_counter_storage_freed_compiled_path():
    return state_storage_freed(lambda opt, p: opt.state[p]["step"])


@case
def int8_codes_storage_freed():
    """The codes' storage resized to 0 bytes: the tensor keeps its shape, its memory is gone."""
    out = {}
    for fused in (None, False):
        ours, opt, _, _ = int8_twins(fused)
        grads(ours, 0)
        opt.step()
        grads(ours, 1)
        try:  # the compiled path's memory cannot be freed under it
            opt.state[ours[1]]["exp_avg"].codes.untyped_storage().resize_(0)
        except RuntimeError as e:
            out[str(fused)] = resize_refused(e, ours, opt)
            continue
        before = [ours[0].detach().clone(), ours[1].detach().clone(), opt.state[ours[0]]["exp_avg"].codes.clone()]
        try:
            opt.step()
            out[str(fused)] = {"outcome": "stepped", "torch": "n/a", "difference": float("inf")}
        except Exception as e:  # noqa: BLE001 - the error adamkit gives is the result
            after = [ours[0].detach(), ours[1].detach(), opt.state[ours[0]]["exp_avg"].codes]
            out[str(fused)] = {"outcome": "refused", "error": f"{type(e).__name__}: {e}"[:300], "torch": "n/a",
                               "unchanged": same_bits(before, after)}
    return out


@case
def zero_redundancy_reload():
    import os
    import tempfile

    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    scratch = tempfile.TemporaryDirectory()
    store = dist.FileStore(os.path.join(scratch.name, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        results = []
        for cls in (ak.Adam, torch.optim.Adam):
            torch.manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(5000))]
            zero = ZeroRedundancyOptimizer(ps, optimizer_class=cls, lr=1e-2)
            grads(ps, 0)
            zero.step()
            zero.consolidate_state_dict(0)
            saved = copy.deepcopy(zero.state_dict())
            for t in (1, 2):
                grads(ps, t)
                zero.step()
            zero.load_state_dict(saved)  # roll back a stepped ZeRO optimizer
            grads(ps, 3)
            zero.step()
            results.append([p.detach().clone() for p in ps])
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results))
        return {"outcome": "stepped", "torch": "stepped", "difference": diff}
    finally:
        dist.destroy_process_group()
        scratch.cleanup()


def main(names: list[str]) -> None:
    for name in names:
        print(f"START {name}", flush=True)
        try:
            result = CASES[name]()
        except Exception:  # noqa: BLE001 - an unexpected failure of the case itself is a result too
            result = {"outcome": "case failed", "error": traceback.format_exc()[-1500:]}
        print("RESULT " + json.dumps({"name": name, "result": result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
