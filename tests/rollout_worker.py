"""Worker for test_rollout.py: sampled rollouts from an FSDP2-sharded policy, one rank finishing early.

    torchrun --nproc_per_node 2 tests/rollout_worker.py --out R.pt
Rank r takes prompt rows r::world. Rank 1 decodes at most SHORT new tokens, rank 0 LONG, so rank 1 runs out
of work first and must keep stepping (dummy forwards) until rank 0 is done. Rank 0 saves every rank's
rollout; the test compares them with single-process rollouts of the same rows and seeds.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop", type=int, nargs="*", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist = distributed.setup("cpu")
    model, proc = sharp_tiny()
    model = distributed.wrap(model, "fsdp", dist)
    rows = list(range(dist.rank, len(SIZES), dist.world))
    ro = run(model, proc, rows, LONG if dist.rank == 0 else SHORT, args.stop)
    got = distributed.all_gather_objects(dict(rows=rows, tokens=ro.tokens, logprobs=ro.logprobs, mask=ro.mask,
                                              finish=ro.finish))  # collective: every rank sends its rollout
    if dist.master:
        torch.save(got, args.out)
    distributed.teardown()


if __name__ == "__main__":
    main()
