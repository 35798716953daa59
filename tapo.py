"""Stage 2 of Fine-R1: TAPO, Triplet Augmented Policy Optimization (paper section 3.3, Eq. 1-4).

DAPO (clip-higher, dynamic sampling, token-level loss) with two additions built on a triplet
(anchor x, positive x_pos of the same class, negative x_neg of the most similar other class):
  * intra-class augmentation: n1 rollouts on x and n2 on x_pos form ONE group, rewards normalised together;
  * inter-class augmentation: maximise a KL between the policy conditioned on x and on x_neg.

    python tapo.py                                   # embedded world, from the newest CoT-SFT checkpoint
    torchrun --nproc_per_node 8 tapo.py --model ckpt/fine-r1-sft-7b --data data/rl_train.jsonl \\
        --image-root data --parallel fsdp --grad-checkpointing --rollout-batch 192 --update-batch 64

One RL step: prompts -> rollouts -> rewards + dynamic sampling -> old / negative log-probs -> advantages ->
clipped update over mini-batches -> log -> save. Each objective term is a small function below with its
equation; tests/test_tapo.py checks them on hand-computed numbers.

Deviations and choices (REFERENCE.md section 2 "Δ"):
 1. Δ1 `--intra-condition positive` (default, release): positive rollouts' old/new log-probs are computed on
    x_pos, the image they were sampled from; `anchor` (paper) scores them on x.
 2. Δ2 the inter-class term is the release's token-level k3 estimate of KL(pi_theta || pi_neg), clamped
    (d in [-20, 20], k in [-10, 10]), not the paper's sequence-level ratio.
 3. Δ3 pi_neg is computed without gradient (old policy on x_neg). Δ4 the eta1 term is mean(-log pi) with
    gradient (it lowers entropy, as in the release); the eta2 term mean(-log pi_neg) has no gradient at all:
    it only shifts the logged loss, exactly as in the release.
 4. Δ5 no reference-model KL by default (`--kl-ref` > 0 adds a k3 KL to the frozen initial policy).
 5. Δ6 the loss is a token-level mean over ALL response tokens of the mini-batch, across its micro-batches
    and across ranks (the paper's 1 / sum_i |o_i|); the release averaged per micro-batch of 4 sequences.
 6. Δ7 dynamic sampling stops after `--max-retries` (paper: 20; release: unlimited). If no group survives,
    the step makes no update and says so in the log (`kept 0`).
 7. Δ10 `--reward strict` (default) does not reward answers listing several classes; `official` is the
    release's substring check.
 8. Dual-clip C = 3 (release default, not in the paper) for negative advantages.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
from data import encode_prompts, join_prompt_response, load_stage2, load_triplet, rl_prompt, SYSTEM_PROMPT_R1
from policy import (load_optimizer_state, load_policy, load_trainer_state, newest_checkpoint, optimizer_state,
                    save_checkpoint, token_logprobs, vision_token_ids)
from reward import score
from rollout import decode, generate

WORLD_DIR = Path("out/world")
SFT_RUN = Path("out/sft_cot")


# ----------------------------------------------------------------------------------------------------------
# Configuration

def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model and data
    ap.add_argument("--model", default=None, help="HF folder or preset (tiny/small); default: newest checkpoint "
                    f"in {SFT_RUN} (the main job's CoT-SFT stage)")
    ap.add_argument("--data", default=None, help="Stage-2 JSONL (images, problem, answer, image_noisy, image_aug) "
                    f"or an embedded-world folder (uses its rl_train.jsonl); default {WORLD_DIR}")
    ap.add_argument("--image-root", default=None, help="folder that relative image paths start from "
                    "(default: the data file's folder)")
    ap.add_argument("--out", default="out/tapo", help="run folder: checkpoints, metrics.jsonl, samples.txt")
    ap.add_argument("--seed", type=int, default=0, help="seed for data order and rollout generators")
    ap.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'auto' (newest in --out)")
    ap.add_argument("--defaults", choices=["auto", "release", "world"], default="auto",
                    help="hyper-parameter profile for flags left unset: release (released 3B script) or world "
                    "(the embedded CPU benchmark); auto = world for presets / our world folder")
    # Rollouts (intra-class augmentation)
    ap.add_argument("--n1", type=int, default=5, help="rollouts on the anchor image per group (paper: 5)")
    ap.add_argument("--n2", type=int, default=5, help="rollouts on the positive image per group (paper: 5)")
    ap.add_argument("--no-intra", action="store_true", help="ablation 10:0: all n1+n2 rollouts on the anchor")
    ap.add_argument("--intra-condition", choices=["positive", "anchor"], default="positive",
                    help="image that scores positive rollouts in the update (Δ1): positive = release, anchor = paper")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (release: 1.0)")
    ap.add_argument("--top-p", type=float, default=0.99, help="nucleus sampling (release: 0.99)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response length cap (release: 2048, Δ9; world: 160)")
    # Batches and dynamic sampling
    ap.add_argument("--rollout-batch", type=int, default=None, help="groups per RL step, global (release 3B: 384; world: 16)")
    ap.add_argument("--update-batch", type=int, default=None, help="groups per optimizer step, global (release 3B: 128; world: 8)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass per rank (release: 4; world: 16)")
    ap.add_argument("--max-retries", type=int, default=20, help="extra prompt draws to refill filtered groups (paper: 20)")
    ap.add_argument("--max-steps", type=int, default=None, help="RL steps (release: 10 epochs over the data; world: 20)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop cleanly (and save) after this many minutes")
    # Objective (Eq. 1-4)
    ap.add_argument("--eps-low", type=float, default=0.2, help="lower clip (DAPO: 0.2)")
    ap.add_argument("--eps-high", type=float, default=0.28, help="upper clip, clip-higher (DAPO: 0.28)")
    ap.add_argument("--dual-clip", type=float, default=3.0, help="dual-clip bound C for negative advantages (release: 3.0; 0 = off)")
    ap.add_argument("--gamma", type=float, default=0.01, help="weight of the inter-class KL, maximised (paper: 0.01)")
    ap.add_argument("--eta1", type=float, default=0.03, help="weight of mean(-log pi) on the rollout image (paper: 0.03)")
    ap.add_argument("--eta2", type=float, default=0.03, help="weight of mean(-log pi_neg), no gradient (paper: 0.03)")
    ap.add_argument("--no-inter", action="store_true", help="ablation: gamma = eta2 = 0 and no negative-image forward")
    ap.add_argument("--kl-ref", type=float, default=0.0, help="reference-model KL weight (paper/release: none, Δ5)")
    ap.add_argument("--reward", choices=["strict", "official"], default="strict", help="accuracy check (Δ10)")
    ap.add_argument("--acc-weight", type=float, default=0.9, help="reward weight of accuracy (release: 0.9)")
    ap.add_argument("--fmt-weight", type=float, default=0.1, help="reward weight of the format (release: 0.1)")
    # Optimisation
    ap.add_argument("--lr", type=float, default=None, help="AdamW constant lr (release: 1e-6; world: 1e-4)")
    ap.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (release: 1e-2)")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (release: 1.0)")
    # System
    ap.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default=None,
                    help="data parallelism under torchrun (default: fsdp on CUDA, ddp on CPU)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    ap.add_argument("--system-prompt", choices=["default", "r1"], default="default",
                    help="default = no system message (release RL); r1 = the release's SFT system prompt (Δ14)")
    ap.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: end only + 50)")
    ap.add_argument("--sample-every", type=int, default=5, help="write a few decoded rollouts every N steps")
    args = ap.parse_args(argv)

    # ---- derived settings, per profile
    if args.data is None:
        args.data = str(WORLD_DIR)
    if Path(args.data).is_dir():
        args.data = str(Path(args.data) / "rl_train.jsonl")
    if args.model is None and args.resume is None:
        ck = newest_checkpoint(SFT_RUN)
        if ck is None:
            ap.error(f"no --model and no CoT-SFT checkpoint in {SFT_RUN}: run `bash run.sh` (or `python world.py "
                     f"--out {WORLD_DIR}` and the sft.py stages it lists) first, or pass --model")
        args.model = str(ck)
    world_profile = args.defaults == "world" or (args.defaults == "auto" and (
        args.model in ("tiny", "small") or _is_preset_checkpoint(args.model) or Path(args.data).parent == WORLD_DIR))
    # world: the tiny policy needs a larger lr than a 3B model (at 2e-5 no ratio left the clip range in 15 steps)
    prof = dict(max_new_tokens=160, rollout_batch=16, update_batch=8, max_steps=20, lr=1e-4, micro_batch=16) \
        if world_profile else dict(max_new_tokens=2048, rollout_batch=384, update_batch=128, max_steps=None, lr=1e-6,
                                   micro_batch=4)
    for k, v in prof.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.profile = "world" if world_profile else "release"
    if args.no_intra:  # the 10:0 ablation keeps the group size
        args.n1, args.n2 = args.n1 + args.n2, 0
    if args.no_inter:
        args.gamma, args.eta2 = 0.0, 0.0
    assert args.n1 + args.n2 >= 2, "a group needs at least 2 rollouts for a standard deviation"
    assert args.n1 >= 1, "n1 (rollouts on the anchor) must be >= 1"
    assert args.update_batch <= args.rollout_batch and args.rollout_batch % args.update_batch == 0, \
        f"--rollout-batch {args.rollout_batch} must be a multiple of --update-batch {args.update_batch}"
    return args


def _is_preset_checkpoint(path):
    f = Path(str(path)) / "config.json"
    return f.exists() and "preset" in json.loads(f.read_text())


# ----------------------------------------------------------------------------------------------------------
# The objective, one equation per function (REFERENCE.md section 2)

def group_advantages(rewards, eps=1e-6):
    """Eq. 2: A_i = (R_i - mean_g R) / (std_g R + eps), unbiased std over the n1 + n2 rollouts of a group.

    rewards: (G, n) -> (G, n). A zero-variance group gives A = 0 (no NaN).
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=True, keepdim=True)
    return (rewards - mean) / (std + eps)


def clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0):
    """Eq. 1 (DAPO clip-higher + dual-clip), per token: the loss to MINIMISE.

    rho = exp(lp - old); l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high));
    for A < 0 additionally l = min(l, -A C) (dual clip). Returns (loss (..), clipped (..) bool, dual (..) bool).
    """
    ratio = torch.exp(lp - old)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(l1, l2)
    clipped = l2 > l1
    dual = torch.zeros_like(clipped)
    if dual_clip and dual_clip > 1:
        l3 = -adv * dual_clip
        dual = (adv < 0) & (loss > l3)
        loss = torch.where(adv < 0, torch.minimum(loss, l3), loss)
    return loss, clipped, dual


def inter_class_kl(lp, neg):
    """Eq. 3 as released: k3 estimate of KL(pi_theta || pi_neg) per token, clamped.

    d = clamp(neg - lp, -20, 20); k = clamp(exp(d) - d - 1, -10, 10). Returns (k, clamped bool).
    It is SUBTRACTED from the loss with weight gamma (the policy maximises it).
    """
    d = torch.clamp(neg - lp, -20.0, 20.0)
    k = torch.exp(d) - d - 1
    return torch.clamp(k, -10.0, 10.0), (k > 10.0) | (k < -10.0)


def entropy_terms(lp, neg, eta1, eta2):
    """Eq. 4 as released: eta1 * (-lp) with gradient (lowers entropy) + eta2 * (-neg) WITHOUT gradient (Δ3, Δ4)."""
    return eta1 * (-lp) + eta2 * (-neg.detach())


def tapo_token_loss(lp, old, neg, adv, cfg, ref=None):
    """All terms per token: L = l_clip - gamma * k_neg + eta1 (-lp) + eta2 (-neg) [+ beta * k_ref]."""
    pg, clipped, dual = clipped_surrogate(lp, old, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
    loss = pg
    k = clamped = None
    if neg is not None:
        k, clamped = inter_class_kl(lp, neg)
        loss = loss - cfg.gamma * k + entropy_terms(lp, neg, cfg.eta1, cfg.eta2)
    else:
        loss = loss + cfg.eta1 * (-lp)
    if ref is not None and cfg.kl_ref > 0:
        d = torch.clamp(ref - lp, -20.0, 20.0)
        loss = loss + cfg.kl_ref * torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)
    return loss, dict(pg=pg, clipped=clipped, dual=dual, k=k, k_clamped=clamped)


# ----------------------------------------------------------------------------------------------------------
# Batches of rollouts

class Prompts:
    """An endless, resumable stream of this rank's Stage-2 rows: epoch e uses permutation(seed, e), rank r
    takes every world-th row from r (sharding by stride)."""

    def __init__(self, rows, seed, rank, world):
        self.rows, self.seed, self.rank, self.world = rows, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _epoch_order(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(len(self.rows), generator=g).tolist()
        return perm[self.rank::self.world]

    def take(self, k):
        out = []
        while len(out) < k:
            if self._order is None:
                self._order = self._epoch_order()
            if self.cursor >= len(self._order):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
                continue
            out.append(self.rows[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, s):
        self.epoch, self.cursor, self._order = s["epoch"], s["cursor"], None


def rollout_groups(model, processor, rows, args, system, seed_base):
    """Phase 2: n1 samples on each anchor and n2 on its positive; returns one dict per group."""
    tok = processor.tokenizer
    stop = [tok.convert_tokens_to_ids("<|im_end|>")] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    triplets = [load_triplet(r) for r in rows]  # (anchor, positive, negative) PIL, same size
    text = [rl_prompt(r.problem) for r in rows]
    groups = [dict(row=r, images=t, text=q, rollouts=[]) for r, t, q in zip(rows, triplets, text)]
    n_tok, t0 = 0, time.time()
    for side, n in (("anchor", args.n1), ("positive", args.n2)):
        if n == 0:
            continue
        imgs = [t[0] if side == "anchor" else t[1] for t in triplets]
        batch = encode_prompts(processor, imgs, text, system)
        seeds = [seed_base + 1000 * i + (0 if side == "anchor" else 500) + j for i in range(len(rows)) for j in range(n)]
        ro = generate(model, batch, n=n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, stop_ids=stop, pad_id=tok.pad_token_id, seeds=seeds,
                      suppress_ids=vision_token_ids(tok))
        texts = decode(tok, ro)
        n_tok += int(ro.lengths.sum())
        for r in range(len(texts)):
            g = groups[r // n]
            L = int(ro.lengths[r])
            s = score(texts[r], g["row"].answer, mode=args.reward, acc_weight=args.acc_weight, fmt_weight=args.fmt_weight)
            g["rollouts"].append(dict(side=side, ids=ro.tokens[r, :L].tolist(), lp=ro.logprobs[r, :L].clone(),
                                      text=texts[r], finish=ro.finish[r], **s))
    return groups, n_tok, time.time() - t0


def score_batch(model, processor, items, system, temperature, which):
    """Teacher-forced log-probs (no grad) of rollouts on a chosen image. items: list of (group, rollout);
    which(group, rollout) -> PIL image. Returns a list of (L,) tensors."""
    if not items:
        return []
    batch = make_batch(processor, items, system, which)
    with torch.no_grad():
        lp = token_logprobs(model, batch, temperature=temperature)
    return [lp[i, batch["prompt_len"]:batch["prompt_len"] + len(ro["ids"])] for i, (_, ro) in enumerate(items)]


def make_batch(processor, items, system, which):
    images = [which(g, ro) for g, ro in items]
    prompts = encode_prompts(processor, images, [g["text"] for g, _ in items], system)
    return join_prompt_response(prompts, [ro["ids"] for _, ro in items], processor.tokenizer.pad_token_id)


def update_image(args):
    """Image that scores a rollout in the update: its own (Δ1 release) or always the anchor (paper)."""
    def which(g, ro):
        return g["images"][0] if ro["side"] == "anchor" or args.intra_condition == "anchor" else g["images"][1]
    return which


def negative_image(g, ro):
    return g["images"][2]


def pad_right(tensors, L):
    out = torch.zeros(len(tensors), L)
    for i, t in enumerate(tensors):
        out[i, :len(t)] = t
    return out


def accumulate_grads(model, processor, all_items, idx, weight, old, neg, refl, adv, args, system, n_tok_global,
                     n_micro, world, sums):
    """Backward of one mini-batch (items idx of this rank) in n_micro micro-batches; gradients accumulate.

    The loss is a token-level mean over the mini-batch's response tokens on ALL ranks (n_tok_global): each
    token contributes tok_loss / n_tok_global, whatever the micro-batch split or the world size (Δ6).
    Ranks with fewer micro-batches run weight-0 ones so that every rank makes n_micro forward calls.
    """
    mb = args.micro_batch
    for u in range(n_micro):
        real = idx[u * mb:(u + 1) * mb]
        sel = real or idx[:1] or [0]
        chunk = [all_items[i] for i in sel]
        batch = make_batch(processor, chunk, system, update_image(args))
        P = batch["prompt_len"]
        lp = token_logprobs(model, batch, temperature=args.temperature)[:, P:]       # (b, L)
        L = lp.shape[1]
        w = torch.tensor([weight[i] if real else 0.0 for i in sel])[:, None]        # (b, 1): 0 for filler rows
        mask = batch["response_mask"][:, P:].float() * w                               # (b, L)
        o = pad_right([old[i] for i in sel], L)
        nl = pad_right([neg[i] for i in sel], L) if neg else None
        rl = pad_right([refl[i] for i in sel], L) if refl else None
        a = torch.tensor([adv.get(id(all_items[i][1]), 0.0) for i in sel])[:, None].expand(-1, L)
        tok_loss, st = tapo_token_loss(lp, o, nl, a, args, rl)
        # token-level mean over the global mini-batch; DDP / FSDP2 average gradients over ranks, hence x world
        loss = (tok_loss * mask).sum() / n_tok_global * world
        loss.backward()
        with torch.no_grad():
            sums["loss"] += float((tok_loss * mask).sum())
            sums["pg"] += float((st["pg"] * mask).sum())
            sums["clip"] += float((st["clipped"].float() * mask).sum())
            sums["dual"] += float((st["dual"].float() * mask).sum())
            sums["ent"] += float((-lp * mask).sum())
            sums["tokens"] += float(mask.sum())
            if st["k"] is not None:
                sums["k"] += float((st["k"] * mask).sum())
                sums["k_clamped"] += float((st["k_clamped"].float() * mask).sum())


# ----------------------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    args = get_args(argv)
    dist = distributed.setup()
    distributed.seed_everything(args.seed, dist.rank)
    # OMP_NUM_THREADS wins when set (note: on a shared CPU, more threads than free cores slows steps ~10x)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or
                          max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world)))))
    out = Path(args.out)
    system = SYSTEM_PROMPT_R1 if args.system_prompt == "r1" else None

    # ---- model, optimizer, resume state
    resume = args.resume
    if resume == "auto":
        resume = newest_checkpoint(out)
        if resume is None:
            dist.print(f"--resume auto: no checkpoint in {out}, starting fresh")
    model_src = resume or args.model
    model, processor = load_policy(model_src, dtype=torch.float32)
    parallel = args.parallel or ("fsdp" if dist.device.type == "cuda" else "ddp")
    distributed.set_gradient_checkpointing(model, args.grad_checkpointing)
    model = distributed.wrap(model, parallel if dist.world > 1 or parallel == "fsdp" and dist.device.type == "cuda"
                             else "none", dist)
    ref = None
    if args.kl_ref > 0:
        assert args.model, "--kl-ref needs --model: the frozen reference policy"
        ref, _ = load_policy(args.model, dtype=torch.float32)
        ref = ref.to(dist.device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rows = load_stage2(args.data, args.image_root)
    prompts = Prompts(rows, args.seed, dist.rank, dist.world)
    step = 0
    if resume:
        st = load_trainer_state(resume)
        step = st["state"]["step"]
        prompts.load(st["state"]["prompts"][dist.rank] if dist.world == len(st["state"]["prompts"])
                     else st["state"]["prompts"][0])
        load_optimizer_state(model, opt, st["optimizer"])
        dist.print(f"resumed from {resume} at step {step}")
    max_steps = args.max_steps or math.ceil(10 * len(rows) / args.rollout_batch)  # release: 10 epochs
    per_rank = max(1, args.rollout_batch // dist.world)
    upd_per_rank = max(1, args.update_batch // dist.world)
    if dist.master:
        out.mkdir(parents=True, exist_ok=True)
        print("config:", json.dumps(vars(args), sort_keys=True), flush=True)
        print(f"tapo: {len(rows)} rows from {args.data}; model {model_src}; world {dist.world} ({parallel}); "
              f"{max_steps} steps", flush=True)
    t_start = time.time()
    bar = tqdm(total=max_steps, initial=step, desc="tapo", disable=not dist.master, dynamic_ncols=True)
    while step < max_steps:
        t_step = time.time()
        model.eval()
        # ---------------------------------------------------------------- 1-3. prompts, rollouts, dynamic sampling
        kept, last, retries, n_gen_tok, t_gen, drawn = [], None, 0, 0, 0.0, 0
        all_stats = []
        for attempt in range(args.max_retries + 1):
            need = per_rank - len(kept)
            batch_rows = prompts.take(per_rank if attempt == 0 else max(1, need))
            seed_base = ((args.seed * 1_000_003 + step) * 1_000_003 + attempt * 4099 + dist.rank) * 100_000
            groups, nt, tg = rollout_groups(model, processor, batch_rows, args, system, seed_base)
            n_gen_tok, t_gen, drawn, last = n_gen_tok + nt, t_gen + tg, drawn + len(groups), groups
            all_stats += groups
            for g in groups:
                acc = sum(r["accuracy"] for r in g["rollouts"]) / len(g["rollouts"])
                if 0.01 < acc < 0.99 and len(kept) < per_rank:  # Δ7: drop all-right / all-wrong groups
                    kept.append(g)
            # collective: every rank learns the global kept count, so all ranks retry (or stop) together
            total_kept = distributed.all_sum(float(len(kept)))
            if total_kept >= args.rollout_batch or attempt == args.max_retries:
                break
            retries += 1

        # ---------------------------------------------------------------- 4. old and negative log-probs (no grad)
        items = [(g, ro) for g in kept for ro in g["rollouts"]]
        # every rank must run the same number of forward calls: pad with rollouts of a filtered group (weight 0)
        n_max = max(distributed.all_gather_objects(len(items)))
        filler = [(g, ro) for g in last for ro in g["rollouts"]]
        fill = [filler[i % len(filler)] for i in range(n_max - len(items))]
        all_items = items + fill
        weight = [1.0] * len(items) + [0.0] * len(fill)
        mb = args.micro_batch
        old, neg, refl = [], [], []  # per item: (L,) log-probs
        for s in range(0, len(all_items), mb):
            chunk = all_items[s:s + mb]
            old += score_batch(model, processor, chunk, system, args.temperature, update_image(args))
            if args.gamma > 0 or args.eta2 > 0:
                neg += score_batch(model, processor, chunk, system, args.temperature, negative_image)
            if ref is not None:
                refl += score_batch(ref, processor, chunk, system, args.temperature, update_image(args))
        gap = max([float((ro["lp"] - o).abs().max()) for (g, ro), o in zip(items, old)
                   if ro["side"] == "anchor" or args.intra_condition == "positive"] or [0.0])

        # ---------------------------------------------------------------- 5. group-normalised advantages
        adv = {}
        for g in kept:
            R = torch.tensor([[ro["overall"] for ro in g["rollouts"]]])  # (1, n1 + n2)
            for ro, a in zip(g["rollouts"], group_advantages(R)[0]):
                adv[id(ro)] = float(a)

        # ---------------------------------------------------------------- 6. policy update over mini-batches
        model.train()
        sums = dict(loss=0.0, pg=0.0, clip=0.0, dual=0.0, k=0.0, k_clamped=0.0, ent=0.0, tokens=0.0)
        n_groups_rank = len(kept)
        n_mini = max(1, args.rollout_batch // args.update_batch)
        per_mini = upd_per_rank * (args.n1 + args.n2)
        updates = 0
        for m in range(n_mini):
            idx = list(range(m * per_mini, min((m + 1) * per_mini, len(all_items))))
            if m == n_mini - 1:
                idx = list(range(m * per_mini, len(all_items)))
            n_tok_local = sum(len(all_items[i][1]["ids"]) * weight[i] for i in idx)
            # collective: the global number of response tokens of this mini-batch (token-level mean, Δ6)
            n_tok_global = distributed.all_sum(float(n_tok_local))
            n_micro = max(distributed.all_gather_objects(math.ceil(len(idx) / mb)))
            if n_tok_global == 0:
                continue  # nothing survived anywhere: no update (logged as kept 0)
            accumulate_grads(model, processor, all_items, idx, weight, old, neg, refl, adv, args, system,
                             n_tok_global, n_micro, dist.world, sums)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            sums["gnorm"] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            updates += 1
        step += 1

        # ---------------------------------------------------------------- 7. log
        def mean_of(key, side=None, pool=all_stats):
            v = [ro[key] for g in pool for ro in g["rollouts"] if side is None or ro["side"] == side]
            return distributed.all_sum(sum(v)) / max(1.0, distributed.all_sum(float(len(v))))
        gnorm = sums.pop("gnorm", 0.0)
        tot = {k: distributed.all_sum(v) for k, v in sums.items()}
        ntok = max(1.0, tot["tokens"])
        lens = [len(ro["ids"]) for g in all_stats for ro in g["rollouts"]]
        trunc = [ro["finish"] == "length" for g in all_stats for ro in g["rollouts"]]
        kept_global = distributed.all_sum(float(n_groups_rank))
        drawn_global = distributed.all_sum(float(drawn))
        m = dict(step=step, reward=mean_of("overall"), acc=mean_of("accuracy"), acc_anchor=mean_of("accuracy", "anchor"),
                 acc_positive=mean_of("accuracy", "positive") if args.n2 else None, format=mean_of("format"),
                 kept=kept_global, kept_frac=kept_global / max(1.0, drawn_global), retries=retries, updates=updates,
                 loss=tot["loss"] / ntok, pg=tot["pg"] / ntok, kl_neg=tot["k"] / ntok, kl_neg_clamped=tot["k_clamped"] / ntok,
                 entropy=tot["ent"] / ntok, clip_frac=tot["clip"] / ntok, dual_clip_frac=tot["dual"] / ntok,
                 len=distributed.all_sum(float(sum(lens))) / max(1.0, distributed.all_sum(float(len(lens)))),
                 trunc=distributed.all_sum(float(sum(trunc))) / max(1.0, distributed.all_sum(float(len(trunc)))),
                 lp_gap=max(distributed.all_gather_objects(gap)),
                 grad_norm=gnorm, rollout_tok_s=distributed.all_sum(float(n_gen_tok)) / max(1e-9, t_gen), step_s=time.time() - t_step)
        if dist.master:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            bar.update(1)
            msg = (f"step {step}/{max_steps} | reward {m['reward']:.3f} | acc {m['acc']:.3f} (anchor {m['acc_anchor']:.3f}"
                   + (f", pos {m['acc_positive']:.3f}" if args.n2 else "") + f") | fmt {m['format']:.2f} | kept "
                   f"{int(kept_global)}/{int(drawn_global)} retries {retries} | kl_neg {m['kl_neg']:.4f} | ent "
                   f"{m['entropy']:.3f} | clip {m['clip_frac']:.3f} | len {m['len']:.0f} | gap {m['lp_gap']:.1e} | "
                   f"{m['rollout_tok_s']:.0f} tok/s | {m['step_s']:.1f} s")
            if kept_global == 0:
                msg += f" | no group survived after {retries} retries: no update"
            bar.write(msg)
            if args.sample_every and step % args.sample_every == 0 and all_stats:
                with open(out / "samples.txt", "a") as f:
                    for g in all_stats[:2]:
                        for ro in g["rollouts"][:2]:
                            f.write(f"--- step {step} | gt {g['row'].answer} | {ro['side']} | reward {ro['overall']:.2f}\n"
                                    f"{ro['text']}\n")

        # ---------------------------------------------------------------- 8. save
        timed_out = args.max_minutes is not None and (time.time() - t_start) / 60 > args.max_minutes
        # collective: every rank agrees whether to stop (time differs slightly across ranks)
        timed_out = distributed.all_any(timed_out)
        last_step = step >= max_steps or timed_out
        if last_step or (args.save_every and step % args.save_every == 0):
            state = dict(step=step, args=vars(args), prompts=distributed.all_gather_objects(prompts.state()))
            opt_sd = optimizer_state(model, opt)  # collective under FSDP2
            save_checkpoint(out / ("final" if last_step else f"step_{step}"), model, processor, state=state,
                            rank=dist.rank, optimizer_state=opt_sd)
        if timed_out:
            dist.print(f"--max-minutes {args.max_minutes} reached at step {step}: saved and stopping")
            break
    bar.close()
    distributed.teardown()


if __name__ == "__main__":
    main()
