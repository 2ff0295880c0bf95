"""adamkit._quantized.QuantizedState: an 8-bit state (codes + block scales) that reads as its values under any torch
op, and requantizes in place on any write: what ``opt.state[p][k]`` is for an int8 state of the torch engine
(``test_int8_reads.py`` tests it there)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from adamkit import states
from adamkit._quantized import QuantizedState


def _values(signed: bool, shape=(10, 100), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen) * torch.logspace(-6, 2, shape[-1])  # blocks of very different scales
    return v if signed else v.abs()


def _state(signed: bool = True, shape=(10, 100)) -> tuple[QuantizedState, torch.Tensor]:
    """A quantized state and its true values (what the codes mean)."""
    q = QuantizedState.from_values(_values(signed, shape), signed)
    return q, states.dequantize(q.codes, q.absmax, signed, torch.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_reports_the_values_and_keeps_the_format_of_states(signed):
    v = _values(signed)
    q = QuantizedState.from_values(v, signed)
    codes, absmax = states.quantize(v, signed)
    assert torch.equal(q.codes, codes) and torch.equal(q.absmax, absmax)  # states.quantize is the format
    assert q.codes.dtype == (torch.int8 if signed else torch.uint8) and q.signed is signed
    assert q.shape == v.shape and q.dtype == torch.float32 and not q.requires_grad
    assert torch.equal(QuantizedState(codes, absmax).dequantize(), states.dequantize(codes, absmax, signed,
                                                                                      torch.float32))


def test_what_a_logger_reads_is_the_values_not_the_codes():
    q, true = _state()
    assert float(q.float().norm()) == float(true.norm())
    assert abs(float(q.float().norm()) - float(q.codes.float().norm())) > 100  # the codes would read very differently
    assert float(q.abs().max()) == float(true.abs().max()) and float(q.mean()) == float(true.mean())
    assert torch.equal(q[3], true[3]) and torch.equal(q[:, 7:9], true[:, 7:9]) and q[2, 5].item() == true[2, 5]
    assert torch.equal(q, true) and torch.equal(q.double(), true.double())
    assert type(q + 1) is torch.Tensor and torch.equal(q + 1, true + 1)


def test_numpy_and_python_values_are_the_values_read_only():
    import numpy as np
    q, true = _state()
    array = np.asarray(q)
    assert array.dtype == np.float32 and np.array_equal(array, true.numpy()) and np.array_equal(q.numpy(), array)
    with pytest.raises(ValueError, match="read-only"):  # a copy: a write could not reach the codes
        array[0, 0] = 1.0
    assert q.tolist() == true.tolist() and q[1, 2].item() == true[1, 2].item() and float(q[4, 4]) == float(true[4, 4])


def test_iteration_unbind_and_chunks_are_views_that_write_back():
    q, true = _state()
    rows = list(q)
    assert len(rows) == 10 and all(type(r) is QuantizedState and torch.equal(r, t) for r, t in zip(rows, true))
    assert all(torch.equal(a, b) for a, b in zip(q.chunk(3, dim=1), true.chunk(3, dim=1)))
    expected = q.dequantize()
    rows[2].zero_()
    q.split(40, dim=1)[2].fill_(0.5)
    expected[2] = 0.0
    expected[:, 80:] = 0.5
    codes, absmax = states.quantize(expected, True)
    assert torch.equal(q.codes, codes) and torch.equal(q.absmax, absmax)


def test_printing_shows_values():
    q = QuantizedState.from_values(torch.full((300,), 0.25), True)
    text = repr(q)
    assert text.startswith("QuantizedState(tensor([0.2500, 0.2500") and "codes=int8" in text
    assert str(q) == text


def test_clone_and_deepcopy_are_independent_quantized_copies():
    q, true = _state()
    for dup in (q.clone(), copy.deepcopy(q), copy.deepcopy({"exp_avg": q})["exp_avg"]):
        assert type(dup) is QuantizedState and torch.equal(dup, true)
        assert dup.codes.data_ptr() != q.codes.data_ptr() and dup.absmax.data_ptr() != q.absmax.data_ptr()
        dup.fill_(1.0)
        assert torch.equal(q, true)  # the original is untouched


@pytest.mark.parametrize("weights_only", [True, False])
def test_torch_save_writes_the_values_as_a_plain_tensor(weights_only):
    q, true = _state()
    buffer = io.BytesIO()
    torch.save({"state": {0: {"exp_avg": q}}}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=weights_only)["state"][0]["exp_avg"]
    assert type(loaded) is torch.Tensor and torch.equal(loaded, true)


@pytest.mark.parametrize("signed", [True, False])
def test_in_place_writes_requantize_into_the_same_memory(signed):
    q, true = _state(signed)
    addresses = (q.codes.data_ptr(), q.absmax.data_ptr())
    q.mul_(1.0)
    assert torch.equal(q, true)  # requantizing the values gives the same codes and scales: nothing drifts
    writes = [(lambda t: t.mul_(0.5), lambda t: t * 0.5), (lambda t: t.fill_(0.125), lambda t: torch.full_like(t, 0.125)),
              (lambda t: t.copy_(_values(signed, seed=1)), lambda t: _values(signed, seed=1)),
              (lambda t: t.add_(t.abs()), lambda t: t + t.abs())]
    for write, expected in writes:
        before = q.dequantize()
        write(q)
        codes, absmax = states.quantize(expected(before), signed)
        assert torch.equal(q.codes, codes) and torch.equal(q.absmax, absmax)
        assert (q.codes.data_ptr(), q.absmax.data_ptr()) == addresses  # a kernel holding these keeps stepping them


def test_writes_through_indexing_and_views_reach_the_state():
    q, _ = _state()
    expected = q.dequantize()
    q[0] = 3.0  # slice + copy_
    q[:, 0].zero_()  # a strided view
    q.view(-1)[5] = -2.0  # a view of the whole, then an element
    q[q.dequantize() > 50] = 1.0  # index_put_
    expected[0] = 3.0
    expected[:, 0] = 0.0
    expected.view(-1)[5] = -2.0
    expected[expected > 50] = 1.0
    codes, absmax = states.quantize(expected, True)
    assert torch.equal(q.codes, codes) and torch.equal(q.absmax, absmax)


def test_copy_between_quantized_and_plain_tensors():
    q, true = _state()
    plain = torch.zeros(10, 100)
    plain.copy_(q)
    assert torch.equal(plain, true)
    other = QuantizedState.from_values(torch.zeros(10, 100), True)
    other.copy_(q)
    assert torch.equal(other.codes, q.codes) and torch.equal(other.absmax, q.absmax)


def test_reshapes_of_the_whole_share_the_codes_and_kernels_read_codes_only():
    q, true = _state()
    flat = q.view(-1)
    assert type(flat) is QuantizedState and flat.codes.data_ptr() == q.codes.data_ptr()
    assert torch.equal(flat, true.view(-1)) and torch.equal(q.reshape(1000), true.reshape(1000))
    assert q.detach().codes.data_ptr() == q.codes.data_ptr()
    part = q[2:4]
    with pytest.raises(RuntimeError, match="a view of a quantized state has no codes"):
        part.codes
    assert q.data_ptr() == 0  # the wrapper owns no memory: only .codes and .absmax may be handed to a kernel


def test_replacing_codes_or_scales_is_counted_and_one_it_cannot_read_is_an_error():
    """``QuantizedState.repointed`` counts replacements of a state's codes or scales (a kernel planned over the
    old ones plans again); new wrappers over the same codes (views, detach, clones) are not replacements."""
    q, true = _state()
    before = QuantizedState.repointed
    q.detach(), q.view(-1), q.clone(), q[2:4], copy.deepcopy(q)
    assert QuantizedState.repointed == before
    q.codes_ = q.codes_.clone()
    q.absmax_ = q.absmax_.clone()
    assert QuantizedState.repointed == before + 2 and torch.equal(q, true)
    q.codes.data = q.codes.data.view(torch.uint8)  # the same memory read as unsigned codes: not these values
    with pytest.raises(RuntimeError, match="codes of this quantized state were replaced by a torch.uint8 tensor"):
        q.norm()
    q.codes_ = q.codes_.view(torch.int8)[:5]
    with pytest.raises(RuntimeError, match="of shape \\(5, 100\\); it reads torch.int8 codes of shape \\(10, 100\\)"):
        print(q)


def test_out_arguments_and_bad_formats_are_refused():
    q, true = _state()
    with pytest.raises(RuntimeError, match="cannot be an out= argument"):
        torch.add(true, true, out=q)
    assert torch.equal(q, true)
    codes, absmax = states.quantize(true, True)
    with pytest.raises(TypeError, match="codes must be a contiguous int8 or uint8"):
        QuantizedState(codes.float(), absmax)
    with pytest.raises(TypeError, match="codes must be a contiguous"):
        QuantizedState(codes.t(), absmax)
    with pytest.raises(TypeError, match=r"absmax must be a contiguous float32 tensor of shape \(4,\)"):
        QuantizedState(codes, absmax[:3])
    with pytest.raises(TypeError, match="absmax must be"):
        QuantizedState(codes, absmax.double())


def test_as_a_dtensor_local_shard_ops_and_checkpoints_read_values(world_of_one, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.tensor import DTensor, Shard
    q, true = _state(shape=(64, 80))
    dt = DTensor.from_local(q, world_of_one, [Shard(0)], run_check=False)
    assert type(dt._local_tensor) is QuantizedState and dt._local_tensor.codes.data_ptr() == q.codes.data_ptr()
    assert float(dt.norm()) == float(true.norm()) and torch.equal(dt.full_tensor(), true)
    assert torch.equal((dt * 2).full_tensor(), true * 2)
    dt.mul_(0.5)  # in place on the shard: requantized into the same codes
    codes, absmax = states.quantize(true * 0.5, True)
    assert torch.equal(q.codes, codes) and torch.equal(q.absmax, absmax)
    dcp.save({"s": dt}, checkpoint_id=str(tmp_path))
    saved = FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata["s"]
    assert saved.properties.dtype == torch.float32 and saved.size == (64, 80)  # DCP sees float32 values
    plain = DTensor.from_local(torch.zeros(64, 80), world_of_one, [Shard(0)])
    dcp.load({"s": plain}, checkpoint_id=str(tmp_path))
    assert torch.equal(plain.full_tensor(), q.dequantize())
    target = QuantizedState.from_values(torch.zeros(64, 80), True)
    dcp.load({"s": DTensor.from_local(target, world_of_one, [Shard(0)], run_check=False)},
             checkpoint_id=str(tmp_path))
    assert torch.equal(target.codes, q.codes) and torch.equal(target.absmax, q.absmax)  # bit for bit


@torch.library.custom_op("adamkit_test::bump_codes", mutates_args=("tensors",))
def _bump_codes(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        if t.dtype == torch.int8:
            t.add_(1)


@_bump_codes.register_fake
def _(tensors: list[torch.Tensor]) -> None:
    return None


def test_under_torch_compile_an_operator_mutating_the_inner_codes_is_one_graph():
    """How the ``adamkit::step`` operator must be given 8-bit states: as their codes and scales (plain tensors),
    not as the subclass, whose in-place update an operator would apply to a dequantized copy."""
    q, _ = _state()
    holder = {"s": q}

    def step(x: torch.Tensor, inner: bool) -> torch.Tensor:
        s = holder["s"]
        _bump_codes([s.codes, s.absmax] if inner else [s])
        return x * 2

    for inner, bumped in ((True, True), (False, False)):
        torch._dynamo.reset()
        before = q.codes.clone()
        explained = torch._dynamo.explain(step)(torch.ones(3), inner)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        q.codes.copy_(before)
        torch.compile(step, fullgraph=True)(torch.ones(3), inner)
        assert torch.equal(q.codes.int() - before.int(), torch.ones_like(before, dtype=torch.int32)) is bumped
    torch._dynamo.reset()


def test_an_in_place_write_of_values_a_state_cannot_hold_is_refused_and_changes_nothing():
    signed = QuantizedState.from_values(torch.linspace(-1, 1, 5000), signed=True)
    unsigned = QuantizedState.from_values(torch.linspace(0, 1, 5000), signed=False)
    for state, write in ((signed, lambda q: q.fill_(float("nan"))), (signed, lambda q: q.mul_(float("inf"))),
                         (unsigned, lambda q: q.sub_(2.0)), (unsigned, lambda q: q[:10].fill_(-1.0))):
        codes, absmax = state.codes.clone(), state.absmax.clone()
        with pytest.raises(RuntimeError, match="an 8-bit state cannot hold"):
            write(state)
        assert torch.equal(state.codes, codes) and torch.equal(state.absmax, absmax)
    signed.mul_(0.5)  # values it can hold still write through
    assert torch.allclose(signed.dequantize()[-1], torch.tensor(0.5))
