"""Worker for test_checkpoint.py: FSDP2 saves before the first optimizer step and mid-run, and resumes exactly.

    torchrun --nproc_per_node 2 tests/ckpt_worker.py --out DIR
One launch (2 ranks, gloo, AdamW on a fixed batch): a forward without backward (a TAPO step that kept no
group), save step_0 (no optimizer step yet), 3 steps with a save at step_2, the final weights W3. Then, from
step_0 and from step_2 (`--resume auto`), a fresh model + optimizer resumes to step 3. Rank 0 writes
DIR/result.json: whether each resumed W3 equals the uninterrupted one bit for bit.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed  # noqa: E402
from checkpoint import (full_state_dict, load_optimizer_state, load_trainer_state, optimizer_state,  # noqa: E402
                        resume_checkpoint, save_checkpoint)
from conftest import padded_batch  # noqa: E402
from policy import load_policy, token_logprobs  # noqa: E402

STEPS = 3


def build(src, dist):
    model, proc = load_policy(src, seed=0)
    model = distributed.wrap(model, "fsdp", dist)
    return model, proc, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def train_step(model, opt, mine, n_tokens, world):
    lp = token_logprobs(model, mine)
    (-lp.sum() / n_tokens * world).backward()  # token mean over the global batch; FSDP2 averages over ranks
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist = distributed.setup("cpu")
    out = Path(args.out)
    sizes = [(112, 112), (140, 112), (112, 84), (84, 112)]
    rows = list(range(dist.rank, len(sizes), dist.world))
    mine = padded_batch(load_policy("tiny")[1], sizes=[sizes[i] for i in rows], seeds=rows)
    n_tokens = int(padded_batch(load_policy("tiny")[1], sizes=sizes)["response_mask"].sum())

    model, proc, opt = build("tiny", dist)
    with torch.no_grad():
        token_logprobs(model, mine)  # leaves the FSDP2 root unsharded: the state of tapo.py after `kept 0`
    save_checkpoint(out / "step_0", model, proc, state={"step": 0}, rank=dist.rank,
                    optimizer_state=optimizer_state(model, opt))  # collective
    for s in range(1, STEPS + 1):
        train_step(model, opt, mine, n_tokens, dist.world)
        if s == 2:
            save_checkpoint(out / "step_2", model, proc, state={"step": s}, rank=dist.rank,
                            optimizer_state=optimizer_state(model, opt))
    ref = full_state_dict(model)  # collective

    result = {}
    for resume in (str(out / "step_0"), "auto"):
        ck = resume_checkpoint(resume, out)  # collective
        model, proc, opt = build(ck, dist)
        ts = load_trainer_state(ck)
        load_optimizer_state(model, opt, ts["optimizer"])
        for _ in range(ts["state"]["step"], STEPS):
            train_step(model, opt, mine, n_tokens, dist.world)
        got = full_state_dict(model)
        if dist.master:
            result[ck.name] = {"optimizer_saved": ts["optimizer"] is not None,
                               "identical": got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)}
    if dist.master:
        (out / "result.json").write_text(json.dumps(result))
    # the process ends in teardown, before destructors run: an FSDP2/DDP module freed after the group is gone can
    # abort a rank at exit ("terminate called without an active exception": a rank of ckpt_worker.py, stop 26)
    distributed.teardown(exit_process=True)


if __name__ == "__main__":
    main()
