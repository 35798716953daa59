"""torchrun plumbing shared by sft.py, tapo.py, rollout.py and eval.py; imports nothing of this project.

    dist = setup()                  # reads torchrun's env; NCCL on CUDA, gloo on CPU; world size 1 unlaunched
    dist.print("only rank 0 prints")
    model = wrap(model, "fsdp", dist)  # none | ddp | fsdp (FSDP2: each decoder layer, the vision tower, root)
    ...
    teardown()

The same code runs single-process (`python X.py`), single-node (`torchrun --nproc_per_node 8 X.py`) and
multi-node (`torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:PORT ...`).
"""
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0

    def print(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)


def setup(device=None):
    """Initialise torch.distributed from torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                 device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local_rank, dev)


def teardown(exit_process=False):
    """End the process group. exit_process=True (the end of a stage's main under torchrun) then ends the process
    at once, without running destructors: freeing DDP's Reducer after the group is gone runs ProcessGroupGloo's
    destructor with the GIL held, which joins a gloo thread waiting for the GIL (a rank hung for good after its
    run had finished and saved, seen in CI: tests/test_checkpoint.py, 2-rank SFT resume). Everything is written
    by then (checkpoints swapped in, metrics files closed); stdout and stderr are flushed here."""
    if tdist.is_initialized():
        tdist.barrier()  # wait for every rank to finish writing before the group goes away
        tdist.destroy_process_group()
        if exit_process:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch with `seed + rank`, so ranks draw different samples but reproducibly."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def is_distributed():
    return tdist.is_initialized() and tdist.get_world_size() > 1


def all_sum(x):
    """Sum a tensor (or float) over ranks; identity when not distributed."""
    t = torch.as_tensor(x, dtype=torch.float64).clone() if not torch.is_tensor(x) else x
    if is_distributed():
        dev = "cuda" if tdist.get_backend() == "nccl" else "cpu"
        y = t.to(dev)
        tdist.all_reduce(y)  # collective: every rank contributes its value, every rank gets the sum
        t = y.to(t.device)
    return t if torch.is_tensor(x) else float(t)


def all_max(x):
    """Maximum of a tensor (elementwise) or float over ranks; identity when not distributed."""
    t = torch.as_tensor(x, dtype=torch.float64).clone() if not torch.is_tensor(x) else x
    if is_distributed():
        dev = "cuda" if tdist.get_backend() == "nccl" else "cpu"
        y = t.to(dev)
        tdist.all_reduce(y, op=tdist.ReduceOp.MAX)  # collective: every rank gets the largest value
        t = y.to(t.device)
    return t if torch.is_tensor(x) else float(t)


def all_any(flag):
    """True on every rank if `flag` is True on any rank (used for lockstep decisions)."""
    return all_sum(float(bool(flag))) > 0


def all_gather_objects(obj):
    """List of `obj` from every rank, in rank order; [obj] when not distributed."""
    if not is_distributed():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)  # collective: every rank sends its object
    return out


def uses_fsdp(model):
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


# FSDP2's reshard-after-forward per unit of `wrap` (its own defaults, written out because rollout.gathered turns it
# off for a rollout phase and sets these back): a decoder layer or the vision tower is gathered again in backward;
# the root keeps its parameters (backward needs them at once)
RESHARD_AFTER_FORWARD = {"unit": True, "root": False}


def wrap(model, mode, dist, mixed_precision=None):
    """Wrap a HF Qwen2.5-VL model for data-parallel training.

    mode "none": as is (world size must be 1). "ddp": DistributedDataParallel. "fsdp": FSDP2 `fully_shard` of
    each text decoder layer, the vision tower as one unit, then the root (torchtitan's layout); bf16 compute
    with fp32 gradient reduction on CUDA unless `mixed_precision=False`.
    """
    model.to(dist.device)
    if mode == "none" or dist.world == 1 and mode != "fsdp":
        return model
    if mode == "ddp":
        return DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    if mode == "fsdp":
        if mixed_precision is None:
            mixed_precision = dist.device.type == "cuda"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
            else MixedPrecisionPolicy()
        unit, root = RESHARD_AFTER_FORWARD["unit"], RESHARD_AFTER_FORWARD["root"]
        for layer in model.model.language_model.layers:
            fully_shard(layer, mp_policy=mp, reshard_after_forward=unit)
        fully_shard(model.model.visual, mp_policy=mp, reshard_after_forward=unit)
        fully_shard(model, mp_policy=mp, reshard_after_forward=root)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}: none | ddp | fsdp")


def unwrap(model):
    """The underlying HF model of a DDP-wrapped one (FSDP2 modules are the model itself)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "lm_head") else model


def set_gradient_checkpointing(model, on):
    """Recompute each decoder layer's activations in backward (saves memory, costs ~30% more compute).
    transformers 5.x calls it activation checkpointing (the old names warn); earlier versions have only those."""
    hf = unwrap(model)
    new = hasattr(type(hf), "activation_checkpointing_enable")
    if on:
        kwargs = {"use_reentrant": False}
        if new:
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif new and hf.is_activation_checkpointing:
        hf.activation_checkpointing_disable()
    elif not new and getattr(hf, "is_gradient_checkpointing", False):
        hf.gradient_checkpointing_disable()
