"""Run a function as one rank of a gloo process group, the way ``adamkit bench --distributed`` and the FSDP2 tests
spawn their ranks.

A rank ends with ``os._exit`` once its result is written and its group destroyed: torch 2.13's gloo ranks abort at
interpreter exit now and then ("terminate called without an active exception", from a C++ static destructor, with
no Python frame left; it happens with torch.optim alone too), which would fail a run whose every result was
already written.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable


def leave() -> None:
    """End this process now, after flushing its output, without running C++ static destructors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def as_gloo_rank(rank: int, world: int, store_dir: str, out: str, work: Callable[[], Any]) -> None:
    """Run ``work`` as rank ``rank`` of ``world`` gloo ranks that share the file store in ``store_dir``; rank 0
    writes what ``work`` returns to ``out`` as JSON; then the rank leaves (an exception in ``work`` propagates)."""
    import torch.distributed as dist

    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        result = work()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()
    leave()
