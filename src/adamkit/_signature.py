"""Constructor signatures built from a rule's hyperparameters, shared by the engines."""

from __future__ import annotations

import inspect
from typing import Any, Iterable

from .rules import Rule

_P = inspect.Parameter


def rule_signature(rule: Rule, extra: Iterable[inspect.Parameter] = ()) -> inspect.Signature:
    """``(self, params, <hyperparameters in torch.optim order>, *, <extra>)`` with torch's defaults."""
    parameters = [_P("self", _P.POSITIONAL_OR_KEYWORD), _P("params", _P.POSITIONAL_OR_KEYWORD)]
    for h in rule.hypers:
        kind = _P.KEYWORD_ONLY if h.keyword_only else _P.POSITIONAL_OR_KEYWORD
        parameters.append(_P(h.name, kind, default=h.default))
    parameters.extend(extra)
    # keyword-only parameters must come last
    parameters.sort(key=lambda p: p.kind == _P.KEYWORD_ONLY)
    return inspect.Signature(parameters)


def bind(signature: inspect.Signature, self: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind constructor arguments to ``signature``; TypeError for unknown or duplicate names, as Python would."""
    bound = signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    values.pop("self")
    return values
