"""Worker for test_rollout.py / test_rollout_fsdp.py / `bench.py collectives`: rollouts on 2 ranks (gloo).

    torchrun --nproc_per_node 2 tests/rollout_worker.py --out R.pt
Rank r takes prompt rows r::world. Rank 1 decodes at most SHORT new tokens, rank 0 LONG, so rank 1 runs out
of work first. The same seeded rollouts run four ways, each under a collective counter (bench.CountCollectives):
  sharded   FSDP2, parameters gathered inside every forward; rank 1 keeps stepping (dummy forwards)
  gathered  FSDP2 inside rollout.gathered(): one all-gather per unit on entry, none per decode step
  ddp       DDP-wrapped model: generate runs the unwrapped module (plus one DDP-wrapped forward, for contrast)
then two teacher-forced forward + backward passes on each FSDP2 model (was gathering undone? note: the
first differs by one all-gather, of the root, which `gathered` reshards on exit and a sharded rollout leaves
gathered, as FSDP2 keeps the root after forward; the second is the steady state). Rank 0 saves every
rank's results; the tests compare them with each other and with single-process rollouts.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed  # noqa: E402
from conftest import random_image  # noqa: E402
from policy import load_policy  # noqa: E402

SIZES = [(112, 112), (140, 112), (112, 84), (84, 112)]
QUESTIONS = ["What species of bird is this?", "Describe this image.", "What model of aircraft is shown here?",
             "What kind of flower is this?"]
N, LONG, SHORT = 2, 14, 5
SAMPLING = dict(temperature=0.9, top_p=0.95, top_k=200)


def sharp_tiny():
    """The tiny preset with its text weights redrawn at std 0.1: a random model whose greedy output varies
    from step to step (the default init repeats one token), so stop ids fire at different steps."""
    model, proc = load_policy("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "visual" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, proc


def prompts(proc, rows):
    from data import encode_prompts
    return encode_prompts(proc, [random_image(*SIZES[i], seed=i) for i in rows], [QUESTIONS[i] for i in rows])


def seeds(rows):
    return [1000 + 10 * i + s for i in rows for s in range(N)]


def run(model, proc, rows, max_new, stop_ids, sync=None):
    import rollout
    return rollout.generate(model, prompts(proc, rows), n=N, max_new_tokens=max_new, stop_ids=stop_ids,
                            pad_id=proc.tokenizer.pad_token_id, seeds=seeds(rows), sync=sync, **SAMPLING)


def train_step(model, batch):
    """One teacher-forced forward + backward (the update's pattern); returns (loss, collectives it made)."""
    from bench import CountCollectives
    from policy import token_logprobs
    model.zero_grad(set_to_none=True)
    with CountCollectives() as c:
        lp = token_logprobs(model, batch)
        loss = -(lp * batch["response_mask"]).sum() / batch["response_mask"].sum()
        loss.backward()
    return float(loss.detach()), list(c.calls)


def record(model, ro, c):
    return dict(tokens=ro.tokens, logprobs=ro.logprobs, mask=ro.mask, finish=ro.finish,
                per_forward=c.per_forward(), calls=list(c.calls))


def main():
    import rollout
    from bench import CountCollectives
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop", type=int, nargs="*", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist = distributed.setup("cpu")
    rows = list(range(dist.rank, len(SIZES), dist.world))
    max_new = LONG if dist.rank == 0 else SHORT
    res = dict(rows=rows)
    # sharded: the FSDP2 training model as is (lockstep, dummy forwards on rank 1)
    model, proc = sharp_tiny()
    model = distributed.wrap(model, "fsdp", dist)
    with CountCollectives(model) as c:
        ro = run(model, proc, rows, max_new, args.stop)
    res["sharded"] = record(model, ro, c)
    tb = rollout.to_train_batch(prompts(proc, rows), ro)
    res["sharded"]["train"] = [train_step(model, tb) for _ in range(2)]
    # gathered: a fresh FSDP2 model, gathered before its first forward (the TAPO loop's first step)
    model, proc = sharp_tiny()
    model = distributed.wrap(model, "fsdp", dist)
    with CountCollectives(model) as c:
        with rollout.gathered(model):
            inside = rollout.sharded(model)
            ro = run(model, proc, rows, max_new, args.stop)
    res["gathered"] = record(model, ro, c)
    with rollout.gathered(model):  # rank 0 with images, rank 1 text only: fine once nothing is sharded
        from data import encode_prompts
        mixed = rollout.generate(model, encode_prompts(proc, [random_image(112, 112, 0) if dist.rank == 0
                                                              else None], [QUESTIONS[0]]), max_new_tokens=3)
    res["gathered"]["mixed_images"] = mixed.tokens.shape
    res["gathered"].update(sharded_inside=inside, sharded_after=rollout.sharded(model),
                           train=[train_step(model, tb) for _ in range(2)])
    # ddp: generate unwraps; a DDP-wrapped forward broadcasts buffers first
    model, proc = sharp_tiny()
    model = distributed.wrap(model, "ddp", dist)
    with CountCollectives(model.module) as c:
        ro = run(model, proc, rows, max_new, args.stop)
    res["ddp"] = record(model, ro, c)
    with torch.no_grad(), CountCollectives() as c:
        model(**prompts(proc, rows))
    res["ddp"]["wrapped_forward"] = list(c.calls)
    got = distributed.all_gather_objects(res)  # collective: every rank sends its results
    if dist.master:
        torch.save(got, args.out)
    # ends the process before destructors run, as the stages do (why: ckpt_worker.py, distributed.teardown)
    distributed.teardown(exit_process=True)


if __name__ == "__main__":
    main()
