"""Training plumbing shared by sft.py and tapo.py: resume, wrapping, optimizer groups, grad clipping, RNG, saves.

    resume = resume_path(args.resume, out)                 # --resume alone = newest checkpoint in --out
    freeze(model, "vision")                                # optional: one side stays as loaded
    model, parallel = wrap_for_training(model, args.parallel, args.grad_checkpointing, dist)
    opt = build_optimizer(model, lr, weight_decay, betas, decay_1d=False)
    state = restore(resume, model, opt, dist)              # loop state dict (or None); RNG streams restored
    gnorm = clip_grad_norm(model, max_norm)                # DTensor-aware global norm
    save(out / "step_10", model, processor, opt, state, dist)  # collective; every rank's RNG stored

Both stages call these, so resume, the optimizer's parameter groups and clipping mean the same in both.

Layer: training -> checkpoint, report, distributed.
"""
import argparse
from pathlib import Path

import torch

import distributed
import report
from checkpoint import (CheckpointError, load_optimizer_state, load_trainer_state, optimizer_state, resume_checkpoint, rng_state,
                        save_checkpoint, set_rng_state)

# `--resume` with no value: the newest complete checkpoint in --out (argparse `const`)
RESUME_NEWEST = "newest"


def resume_path(resume, out):
    """The folder to resume from, verified (checkpoint.resume_checkpoint; collective): None (fresh), the newest
    complete checkpoint in `out` for RESUME_NEWEST (None when there is none yet, so a restarted job script
    starts fresh the first time; damaged newer ones are skipped with a warning), else the folder given."""
    if resume is None:
        return None
    try:  # "auto": the spelling of earlier versions
        return resume_checkpoint("auto" if resume in (RESUME_NEWEST, "auto") else resume, out)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None


def default_parallel(dist):
    """FSDP2 on CUDA, DDP on CPU (gloo)."""
    return "fsdp" if dist.device.type == "cuda" else "ddp"


FREEZE_PARTS = {  # --freeze PART[,PART...]: the parameters that stay as loaded
    "vision": "the vision tower and its merger (the projector; the release's SFT, Δ13)",
    "language": "everything else: embeddings, decoder, lm_head (only the vision side learns)",
    "embeddings": "the token embeddings and lm_head (one matrix when tied)",
    "mlp": "the language decoder's MLPs (attention and norms still learn)",
}


def parse_freeze(spec):
    """`--freeze` value -> a tuple of parts: "none" -> (), "vision,mlp" -> ("vision", "mlp"). argparse type."""
    parts = tuple(p.strip() for p in str(spec).split(",") if p.strip())
    if parts == ("none",):
        return ()
    bad = [p for p in parts if p not in FREEZE_PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(bad) or repr(spec)}: none, or a comma list of "
                                         f"{', '.join(FREEZE_PARTS)}")
    return parts


def frozen_by(name, parts):
    """Whether parameter `name` belongs to one of `parts` (FREEZE_PARTS)."""
    visual = name.startswith("model.visual.")
    return (("vision" in parts and visual) or ("language" in parts and not visual)
            or ("embeddings" in parts and not visual and ("embed_tokens." in name or name.startswith("lm_head.")))
            or ("mlp" in parts and not visual and ".mlp." in name))


def freeze(model, parts):
    """Stop training the named parts of the model (FREEZE_PARTS; a string is one comma list, None or () = train
    all). Returns the number of trainable parameters left; raises ValueError when none is. Call before wrapping."""
    parts = parse_freeze(parts) if isinstance(parts, str) else tuple(parts or ())
    for p in parts:
        if p not in FREEZE_PARTS:
            raise ValueError(f"freeze: unknown part {p!r} ({', '.join(FREEZE_PARTS)})")
    for name, p in model.named_parameters():
        if frozen_by(name, parts):
            p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"freeze {','.join(parts)}: no trainable parameter left")
    return n


def wrap_for_training(model, parallel, grad_checkpointing, dist):
    """Gradient checkpointing, then the data-parallel wrapper: (model, mode). One process runs unwrapped,
    except FSDP2 on CUDA (it also brings the bf16 mixed-precision policy)."""
    parallel = parallel or default_parallel(dist)
    distributed.set_gradient_checkpointing(model, grad_checkpointing)
    mode = parallel if dist.world > 1 or (parallel == "fsdp" and dist.device.type == "cuda") else "none"
    return distributed.wrap(model, mode, dist), mode


def build_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), decay_1d=False):
    """AdamW over the trainable parameters. decay_1d=False: no weight decay on 1-D parameters (biases, norm
    weights), as the HF Trainer the release's SFT used; True: decay on every parameter (the release's RL
    framework, EasyR1 / verl, builds AdamW on all parameters alike)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_1d:
        groups = [{"params": params, "weight_decay": weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=1e-8)


def clip_grad_norm(model, max_norm):
    """Global gradient norm (DTensor-aware for FSDP2, as torchtitan), then clip to max_norm if > 0. Returns the
    norm before clipping as a float (inf / nan when a gradient is not finite)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()  # collective: sums the squared shard norms of every rank
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm,
                                             total, foreach=True)
    return float(total)


def save(path, model, processor, optimizer, state, dist):
    """Checkpoint `path` (HF folder + resume state). Collective: every rank's RNG streams are gathered and,
    under FSDP2, the sharded weights and optimizer moments too; rank 0 writes."""
    state = dict(state, rng=distributed.all_gather_objects(rng_state()))  # collective: every rank's RNG
    opt_sd = optimizer_state(model, optimizer)  # collective under FSDP2
    save_checkpoint(path, model, processor, state=state, rank=dist.rank, optimizer_state=opt_sd)
    if dist.master:
        report.plot_curves(Path(path).parent)  # the run's curves.png, refreshed at every checkpoint


def restore(resume, model, optimizer, dist):
    """Load the optimizer state and this rank's RNG streams from checkpoint `resume`; returns the saved loop
    state (dict) or None when `resume` is None. With another world size, every rank takes rank 0's RNG."""
    if resume is None:
        return None
    ts = load_trainer_state(resume)
    load_optimizer_state(model, optimizer, ts["optimizer"])
    state = ts["state"]
    rngs = state.get("rng")
    if rngs:
        set_rng_state(rngs[dist.rank] if len(rngs) == dist.world else rngs[0])
    return state


def changed_settings(saved_args, args, ignore=("resume", "max_steps", "max_minutes", "model", "save_every", "out")):
    """{flag: (saved, now)} for settings that differ from the checkpoint's, to warn about on resume."""
    now = vars(args)
    return {k: (v, now.get(k)) for k, v in saved_args.items() if k not in ignore and k in now and now[k] != v}
