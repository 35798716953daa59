"""Worker for test_sft.py: the gradient of one SFT step, single-process or under torchrun.

    python tests/sft_worker.py --data stage1.json --micro 8 --out ref.pt
    torchrun --nproc_per_node 2 tests/sft_worker.py --data stage1.json --mode fsdp --micro 2 --out fsdp.pt
Three steps' gradients from the same initial weights: all samples of the file as one global batch; only
its last, text-only sample (a batch smaller than the number of ranks: the other rank runs a zero-weight copy);
samples MIXED at micro-batch 1 (one rank's micro-batch is text-only, the other's has an image). Rank 0 saves
{"full", "one", "mixed": {name: grad}, "norm_full": float} with unsharded fp32 gradients.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed  # noqa: E402
import supervised  # noqa: E402
from distributed import unwrap  # noqa: E402
from policy import load_policy  # noqa: E402
import training  # noqa: E402

MIXED = [0, 2]  # an image sample and a text-only one: at micro-batch 1 one rank has an image, the other not


def grads(model):
    out = {}
    for name, p in unwrap(model).named_parameters():
        g = p.grad
        if g is None:
            g = torch.zeros_like(p)
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()  # collective: all-gathers the FSDP2 shards
        out[name] = g.detach().cpu().clone()
    return out


def step_grads(model, processor, samples, prompt_lens, resp_ids, keys, batch, micro, dist, pack=False, share=0):
    n_step = sum(len(resp_ids[i]) for i in batch)
    mine, _ = supervised.step_micro_batches(model, processor, samples, prompt_lens, resp_ids, keys, batch, micro,
                                            dist.rank, dist.world, pack=pack, device=dist.device,
                                            need_image=dist.world > 1, share=share)
    supervised.forward_backward(model, mine, n_step, dist.world)
    norm = training.clip_grad_norm(model, 0.0)
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return g, norm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--mode", default="none", choices=["none", "ddp", "fsdp"])
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pack", action="store_true", help="rows of several samples (sft.py --pack)")
    ap.add_argument("--share", action="store_true", help="with --pack: the shared prompt prefix once per row "
                    "(sft.py --share-prefix)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist = distributed.setup("cpu")
    model, processor = load_policy("tiny", seed=0)
    samples = supervised.load_mixture(args.data)
    prompt_lens, resp_ids, _ = supervised.tokenize(samples, processor, None, 512)
    keys = supervised.grouping_keys(prompt_lens, resp_ids)
    share = supervised.shared_prefix_len(samples, processor, None) if args.share else 0
    model = distributed.wrap(model, args.mode, dist)
    model.train()
    full, norm = step_grads(model, processor, samples, prompt_lens, resp_ids, keys, list(range(len(samples))),
                            args.micro, dist, args.pack, share)
    one, _ = step_grads(model, processor, samples, prompt_lens, resp_ids, keys, [len(samples) - 1], args.micro, dist,
                        args.pack, share)
    mixed, _ = step_grads(model, processor, samples, prompt_lens, resp_ids, keys, MIXED, 1, dist, args.pack, share)
    if dist.master:
        torch.save({"full": full, "one": one, "mixed": mixed, "norm_full": norm}, args.out)
    # ends the process before destructors run, as the stages do (why: ckpt_worker.py, distributed.teardown)
    distributed.teardown(exit_process=True)


if __name__ == "__main__":
    main()
