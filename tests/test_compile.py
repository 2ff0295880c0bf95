"""torch.compile sees ``opt.step()`` as one operator: one graph, no break, the same bits as eager."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

import adamkit.torch as akt
from adamkit._quantized import QuantizedState


def _model_and_grads(seed: int = 0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))
    return m, torch.randn(16, 64)


@pytest.mark.parametrize("name,kw", [("AdamW", dict(lr=1e-2)), ("NAdam", dict(lr=1e-2, state_precision="int8"))])
def test_compiled_step_is_one_graph_without_breaks_and_matches_eager(name, kw):
    results = []
    for compiled in (True, False):
        torch._dynamo.reset()
        m, x = _model_and_grads()
        opt = getattr(akt, name)(m.parameters(), **kw)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no dynamo warning about the step's internals
            for _ in range(4):
                opt.zero_grad()
                m(x).square().mean().backward()
                step()
        # 8-bit states stay QuantizedStates whose codes the operator updated (it is given codes and scales)
        states = [v.dequantize() if type(v) is QuantizedState else v.clone() for p in m.parameters()
                  for v in opt.state[p].values()]
        assert any(type(v) is QuantizedState for p in m.parameters() for v in opt.state[p].values()) == (
            kw.get("state_precision") == "int8")
        results.append([p.detach().clone() for p in m.parameters()] + states)
        if compiled:
            explanation = torch._dynamo.explain(opt.step)()
            assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    assert all(torch.equal(a, b) for a, b in zip(*results))
