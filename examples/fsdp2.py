"""Train a small transformer with FSDP2 on CPU processes, AdamW with 8-bit states, checkpoint with DCP, resume.

Run it with::

    torchrun --standalone --nproc_per_node 2 examples/fsdp2.py [--steps 40] [--checkpoint DIR]

Every rank holds a shard of each parameter (a DTensor) and of each optimizer state; adamkit steps each shard
through its compiled CPU kernels. Halfway through, the model and optimizer are saved with
``torch.distributed.checkpoint``; a fresh model and optimizer load that checkpoint and train the second half
again, and the script checks that the resumed run ends exactly where the uninterrupted one did.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import adamkit.torch

VOCAB, WIDTH, LENGTH = 32, 64, 16


class TinyTransformer(torch.nn.Module):
    """Predicts each next token of a sequence that repeats with period 4."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=4 * WIDTH, dropout=0.0,
                                             batch_first=True)
            for _ in range(2))
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(x)


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyTransformer()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = adamkit.torch.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, state_precision="int8")
    return model, optimizer


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> float:
    loss = torch.tensor(0.0)
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # each rank its own batch
        start = torch.randint(0, VOCAB, (8, 1), generator=g)
        tokens = (start + torch.arange(LENGTH + 1) % 4) % VOCAB
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if dist.get_rank() == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1:3d}  loss {loss.item():.4f}", flush=True)
    return loss.item()


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def held_bytes(state: torch.Tensor) -> int:
    """Bytes a state holds on this rank: an 8-bit state reads as float32 values but holds 8-bit codes and one
    float32 scale per 256 elements (``.codes``, ``.absmax``)."""
    shard = local(state)
    return shard.codes.nbytes + shard.absmax.nbytes if hasattr(shard, "codes") else shard.nbytes


def state_bytes_per_parameter(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    params = list(model.parameters())
    stored = sum(held_bytes(v) for p in params for k, v in optimizer.state[p].items() if k != "step")
    return stored / sum(local(p).numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint", default=None,
                        help="DCP checkpoint folder, kept (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, half = dist.get_rank(), args.steps // 2
    folder = [args.checkpoint or (tempfile.mkdtemp(prefix="adamkit-fsdp2-") if rank == 0 else None)]
    dist.broadcast_object_list(folder)  # rank 0's folder for every rank
    model, optimizer = build()
    train(model, optimizer, range(half))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder[0])
    if rank == 0:
        print(f"saved a DCP checkpoint at step {half} to {folder[0]}", flush=True)
    final = train(model, optimizer, range(half, args.steps))

    resumed_model, resumed_optimizer = build()
    model_sd, optim_sd = get_state_dict(resumed_model, resumed_optimizer)
    checkpoint = {"model": model_sd, "optim": optim_sd}
    dcp.load(checkpoint, checkpoint_id=folder[0])
    set_state_dict(resumed_model, resumed_optimizer, model_state_dict=checkpoint["model"],
                   optim_state_dict=checkpoint["optim"])
    if rank == 0:
        print(f"resumed from step {half}", flush=True)
    resumed = train(resumed_model, resumed_optimizer, range(half, args.steps))
    same = all(torch.equal(a.full_tensor(), b.full_tensor())
               for a, b in zip(model.parameters(), resumed_model.parameters()))
    per_param = state_bytes_per_parameter(model, optimizer)
    if rank == 0:
        print(f"final loss {final:.4f}, resumed run {resumed:.4f}, parameters identical: {same}")
        print(f"optimizer state on rank 0: {per_param:.2f} bytes per parameter "
              f"(8-bit codes + one float32 scale per 256; tensors under 4096 elements per rank stay float32)")
    dist.barrier()  # every rank is done with the checkpoint
    if rank == 0 and args.checkpoint is None:
        shutil.rmtree(folder[0])
    dist.destroy_process_group()
    if not same:
        raise SystemExit("the resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # torch 2.13's gloo ranks now and then abort at interpreter exit, after all their work is done ("terminate
    # called without an active exception", from a C++ static destructor): leave without running those destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
