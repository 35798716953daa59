"""Worker for test_distributed.py: one SGD step on a fixed batch, single-process or under torchrun.

    python tests/dist_step.py --mode none --out A      # reference: all 4 rows in one process
    torchrun --nproc_per_node 2 tests/dist_step.py --mode ddp --out B
Each rank takes rows rank::world; the loss is a token-level mean over the *global* batch, so the update is
the same for any world size. Rank 0 saves the full parameters (and, for --export, an HF checkpoint).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed  # noqa: E402
from conftest import padded_batch  # noqa: E402
from checkpoint import full_state_dict, save_checkpoint  # noqa: E402
from policy import load_policy, token_logprobs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="none", choices=["none", "ddp", "fsdp"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--export", default=None, help="also write an HF checkpoint here (rank 0)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist = distributed.setup("cpu")
    model, proc = load_policy("tiny", seed=0)
    sizes = [(112, 112), (140, 112), (112, 84), (84, 112)]
    full = padded_batch(proc, sizes=sizes)
    rows = list(range(dist.rank, len(sizes), dist.world))
    mine = padded_batch(proc, sizes=[sizes[i] for i in rows], seeds=rows)
    n_tokens = int(full["response_mask"].sum())  # global token count, known to every rank
    model = distributed.wrap(model, args.mode, dist)
    # note: SGD, not AdamW: Adam's first step is lr * g / (|g| + eps), which turns float-rounding noise in
    # gradients of size ~eps into visible parameter differences; SGD makes parameters equal iff gradients are.
    opt = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=0.1)
    lp = token_logprobs(model, mine)
    # token-level mean over the global batch; DDP and FSDP2 average gradients over ranks, hence x world
    loss = -lp.sum() / n_tokens * dist.world
    loss.backward()
    opt.step()
    sd = full_state_dict(model)  # collective under FSDP2
    if dist.master:
        torch.save(sd, args.out)
    if args.export:
        save_checkpoint(args.export, model, proc, state={"step": 1}, rank=dist.rank)
    # ends the process before destructors run, as the stages do (why: ckpt_worker.py, distributed.teardown)
    distributed.teardown(exit_process=True)


if __name__ == "__main__":
    main()
