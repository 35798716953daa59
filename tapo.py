"""Stage 2 of Fine-R1: TAPO, Triplet Augmented Policy Optimization (paper section 3.3, Eq. 1-4).

DAPO (clip-higher, dynamic sampling, token-level loss) with two additions built on a triplet
(anchor x, positive x_pos of the same class, negative x_neg of the most similar other class):
  * intra-class augmentation: n1 rollouts on x and n2 on x_pos form ONE group, rewards normalised together;
  * inter-class augmentation: maximise a KL between the policy conditioned on x and on x_neg.

    python tapo.py                                   # embedded world, from the newest CoT-SFT checkpoint
    torchrun --nproc_per_node 8 tapo.py --model ckpt/fine-r1-sft-7b --data data/rl_train.jsonl \\
        --image-root data --parallel fsdp --grad-checkpointing --rollout-batch 192 --update-batch 64 --epochs 5

One RL step: prompts -> rollouts -> rewards + dynamic sampling -> old / negative log-probs -> advantages ->
clipped update over mini-batches -> log -> save. Each objective term is a small function below with its
equation; tests/test_tapo.py checks them on hand-computed numbers.

Deviations and choices (README "Deviations (Δ)"):
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
 6. Δ7 dynamic sampling stops after `--max-retries` (paper: 20; release: unlimited); each try draws a full
    mini rollout batch, as the release. If no group survives, the step makes no update and says so in the log
    (`kept 0`); the release instead keeps a try in which nothing survived (`--keep-unfiltered`).
 7. Δ10 `--reward strict` (default) does not reward answers listing several classes; `official` is the
    release's reward exactly (substring accuracy, its format regex).
 8. As the release: dual-clip C = 3 for negative advantages (not in the paper); the log-ratio clamped to
    [-20, 20] before exp; an optimizer step whose gradient norm is not finite is skipped (logged `skipped`);
    images pre-resized into 200,704-1,003,520 px; overlong prompts dropped at start; run length from
    `--epochs` by the release's formula (release_steps).
 9. Not in the paper or the release: `--replay FILES --replay-coef C` adds C x the SFT loss on a batch of Stage-1
    samples to every optimizer step (supervised.Replay; InstructGPT's PPO-ptx). Off by default; the embedded
    world uses it (WORLD below) to keep what its 0.7M model knows of the unseen classes. `--replay-pack` (world:
    on) packs its samples several to a row, as sft.py --pack, with the shared prompt prefix held once per row
    (`--replay-share-prefix`, as sft.py --share-prefix).
10. Implementation, not maths: `--share-prompt` (default on; DDP or one process) runs each distinct (group, image)
    prompt once in the update's and the scoring passes' teacher-forced forwards, its K/V shared by its responses
    (rollout.shared_prompt_logprobs): the same log-probs and gradient up to float rounding (README "Stop 39").
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
import training
from data import SYSTEM_PROMPT_R1, DataError, RowStream, encode_prompts, join_prompt_response, load_stage2, \
    load_triplet, parse_data_spec, prompt_length, rl_prompt, stack_prompts
from checkpoint import newest_checkpoint
from policy import load_policy, stop_token_ids, takes_packed_mask, token_logprobs, vision_token_ids
from reward import score
from rollout import decode, gathered, generate, shared_prompt_logprobs
from supervised import Replay

EMBEDDED_DATA = Path("out/world")   # the embedded world (python world.py --out out/world)
EMBEDDED_SFT = Path("out/sft_cot")  # the main job's CoT-SFT run: the default policy to start from
# The embedded world's values (--defaults world), measured on a 2-core CPU with the tiny preset. The tiny policy
# needs a larger lr than a 3B model; on the current world (seed 0) lr 1e-4 raised the training reward most
# (0.574 -> 0.655) but cost 18 points of held-out unseen accuracy, 2e-5 raised it 0.580 -> 0.634 and cost 5.5
# (README, "Tried before"). From the CoT SFT that trains only attention (the current world recipe) TAPO at
# lr 1e-4, or at 5e-5 for 40 steps, also lowered held-out accuracy (README, "Tried before this").
# Its 112 x 112 images stay as they are (no pixel budget: the release's minimum would make them 448 x 448).
# The replay of the base's corpus (the CoT SFT's own mixture, weight 3) anchors what RL on seen images would wear
# away of the unseen classes, and lets TAPO take the larger lr 4e-5 (seeds 0-6, closed / open unseen: without
# it 52.2 / 47.3 at 2e-5; weight 1 at 2e-5 56.6 / 53.7; weight 3 at 2e-5 58.5 / 55.2, reward flat on 3 seeds; weight
# 3 at 4e-5 58.8 / 56.6, reward up on 7 of 7; CoT SFT 57.8 / 54.2; README, deviations).
# Since stop 29 each RL step's 16 groups make 8 optimizer steps of 2 groups (update_batch 2; the release: 3 of 128):
# at this lr the clipped ratio almost never binds (clip fraction <= 0.003 of tokens), so the step's rollouts carry 4x the
# updates of update_batch 8 at ~1.25x the time per step (the one generate call for both images of sample_groups pays
# most of it back); the reward rises on every seed (README, "Stop 29"). lr 8e-5 does not buy 40 steps' gain in 20:
# -2.6 / -2.2 points on seen classes against 4e-5 (seeds 19-21, README "Stop 36").
# The replay packs its samples into rows (--replay-pack, since stop 31): 7.97-8.22 s per step against 8.97-9.43 padded,
# the same rewards and replay NLLs over 4 steps (seed 29, 2 ranks, side by side; out/exp/s31/bench_tapo.sh).
WORLD = dict(max_new_tokens=160, rollout_batch=16, update_batch=2, micro_batch=16, max_steps=20, lr=4e-5,
             min_pixels=0, max_pixels=0, replay="replay.json:0.5,analysis_replay.json:3", replay_coef=3.0,
             replay_pack=True, old_logprobs="sampler")


# ----------------------------------------------------------------------------------------------------------
# Configuration: the argparse defaults are the released 3B script's values (README "Release facts")

def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    # Model and data
    add("--model", help=f"HF folder or preset (tiny/small); default: newest checkpoint in {EMBEDDED_SFT}")
    add("--data", help="Stage-2 JSONL (images, problem, answer, image_noisy, image_aug) or a folder holding "
        f"rl_train.jsonl (an embedded world); default {EMBEDDED_DATA}")
    add("--image-root", help="folder that relative image paths start from (default: the data file's folder)")
    add("--out", default="out/tapo", help="run folder: step_N/ and final/ checkpoints, metrics.jsonl, samples.txt")
    add("--seed", type=int, default=0, help="seed of the prompt order and the rollout generators")
    add("--resume", nargs="?", const=training.RESUME_NEWEST, help="alone: continue from the newest checkpoint in "
        "--out (fresh start if none); --resume DIR: from that checkpoint")
    add("--defaults", choices=["release", "world"], help="values of the flags marked 'world:': release = the "
        "released 3B script (the defaults shown); world = the embedded CPU benchmark (WORLD above). Default: world "
        "when neither --model nor --data is given, else release")
    # Rollouts (intra-class augmentation)
    add("--n1", type=int, default=5, help="rollouts on the anchor image per group (paper: 5)")
    add("--n2", type=int, default=5, help="rollouts on the positive image per group (paper: 5)")
    add("--no-intra", action="store_true", help="ablation 10:0: all n1 + n2 rollouts on the anchor")
    add("--intra-condition", choices=["positive", "anchor"], default="positive",
        help="image that scores positive rollouts in the update (Δ1): positive = release, anchor = paper")
    add("--temperature", type=float, default=1.0, help="sampling temperature (release: 1.0)")
    add("--top-p", type=float, default=0.99, help="nucleus sampling (release: 0.99)")
    add("--max-new-tokens", type=int, default=2048, help="response cap (release: 2048 applied, Δ9; world: 160)")
    add("--min-pixels", type=int, default=256 * 28 * 28, help="anchor images smaller than this are scaled up, "
        "as the release (config_tapo.yaml: 200704; world: 0 = off)")
    add("--max-pixels", type=int, default=1280 * 28 * 28, help="anchor images larger than this are scaled down "
        "(release: 1003520; world: 0 = off)")
    add("--max-prompt-length", type=int, default=2048, help="rows whose prompt (image tokens included) is longer "
        "are skipped at start and counted, as EasyR1's filter_overlong_prompts (its example config: 2048)")
    # Batches, in groups (a prompt's n1 + n2 rollouts), all ranks together; dynamic sampling
    add("--rollout-batch", type=int, default=384, help="groups per RL step (release 3B: 384, 7B: 192; world: 16)")
    add("--update-batch", type=int, default=128, help="groups per optimizer step (release 3B: 128, 7B: 64; world: 2)")
    add("--micro-batch", type=int, default=4, help="sequences per forward pass per rank (release: 4; world: 16)")
    add("--mini-rollout-batch", type=int, help="groups drawn per dynamic-sampling try, all ranks (default: "
        "--rollout-batch, EasyR1's default); a retry draws this many again, as the release")
    add("--max-retries", type=int, default=20, help="extra draws to refill filtered groups (paper: 20, Δ7)")
    add("--keep-unfiltered", action="store_true", help="the release's quirk: a try in which no group survives "
        "the filter is kept whole (zero advantages, but KL and entropy terms still train); default: dropped")
    add("--epochs", type=float, default=10, help="passes over the data when --max-steps is not given, with the "
        "release's step count (see release_steps; release 3B: 10, 7B: 5)")
    add("--max-steps", type=int, help="RL steps; overrides --epochs (world: 20)")
    add("--max-minutes", type=float, help="stop cleanly (and save) after this many minutes")
    # Objective (Eq. 1-4)
    add("--old-logprobs", choices=["recompute", "sampler"], default="recompute", help="pi_old of the ratio: "
        "recompute = a teacher-forced forward over the kept rollouts before the update (release: EasyR1's "
        "actor, since vLLM samples in other kernels); sampler = the log-probs the sampler reported (rollout.py: "
        "the same weights, within 1e-5 nats in fp32 on the world, logged as lp_gap when recomputed): one "
        "forward less per step (world: sampler; with --intra-condition anchor, recomputed anyway)")
    add("--eps-low", type=float, default=0.2, help="lower clip (DAPO: 0.2)")
    add("--eps-high", type=float, default=0.28, help="upper clip, clip-higher (DAPO: 0.28)")
    add("--dual-clip", type=float, default=3.0, help="dual-clip C for negative advantages (release: 3.0; 0 = off)")
    add("--gamma", type=float, default=0.01, help="weight of the inter-class KL, maximised (paper: 0.01)")
    add("--eta1", type=float, default=0.03, help="weight of mean(-log pi) on the rollout image (paper: 0.03)")
    add("--eta2", type=float, default=0.03, help="weight of mean(-log pi_neg), no gradient (paper: 0.03)")
    add("--no-inter", action="store_true", help="ablation: gamma = eta2 = 0 and no negative-image forward")
    add("--rl-coef", type=float, default=1.0, help="weight of the TAPO objective's gradient in each update "
        "(1 = the paper). 0 = the replay-only control: the same run (rollouts, steps, replay), only the "
        "replay's gradient, to tell what RL adds beside the world's replay (README, claim 3)")
    add("--kl-ref", type=float, default=0.0, help="weight beta of a k3 KL to the initial policy (release: none, Δ5)")
    add("--replay", metavar="FILE[:W],...", help="Stage-1 files trained beside RL with the SFT loss (weight "
        "--replay-coef, --replay-batch samples per optimizer step; a world deviation, README Δ); weights as sft.py "
        "--data; a relative path not found as given is read from the --data folder; none = off. Default: none "
        "(release; world: replay.json:0.5,analysis_replay.json:3, the world CoT SFT's replay)")
    add("--replay-coef", type=float, default=0.0, help="weight of the replay NLL in the loss (release: 0, off; "
        "world: 3)")
    add("--replay-batch", type=int, default=16, help="replay samples per optimizer step, all ranks together")
    add("--replay-pack", action=argparse.BooleanOptionalAction, default=False, help="pack several replay samples "
        "into each row, as sft.py --pack: the same loss up to float rounding, less padding (world: on)")
    add("--share-prompt", action=argparse.BooleanOptionalAction, default=True, help="the teacher-forced "
        "forwards (update, pi_old, negative, reference) run each distinct prompt (group x image) once for all its "
        "responses and attend to its cached keys / values: the same log-probs and gradient up to float rounding, "
        "a 5 + 5 group's prompt twice instead of ten times. Only with DDP or one process, no activation "
        "checkpointing (FSDP2 / --grad-checkpointing: off, said at start)")
    add("--replay-share-prefix", action=argparse.BooleanOptionalAction, default=True, help="with --replay-pack: "
        "hold the prompt tokens every replay sample starts with once per row, as sft.py --share-prefix (SDPA or "
        "eager attention only)")
    add("--encode-cache-mb", type=float, default=1024, help="with --replay-pack: keep up to this many MiB of encoded "
        "replay samples per process for their next epoch (sft.py --encode-cache-mb; 0 = off)")
    add("--reward", choices=["strict", "official"], default="strict", help="accuracy check (Δ10)")
    add("--acc-weight", type=float, default=0.9, help="reward weight of accuracy (release: 0.9)")
    add("--fmt-weight", type=float, default=0.1, help="reward weight of the format (release: 0.1)")
    # Optimisation
    add("--lr", type=float, default=1e-6, help="AdamW constant lr (release: 1e-6; world: 4e-5)")
    add("--weight-decay", type=float, default=1e-2, help="AdamW weight decay, every parameter (release: 1e-2)")
    add("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (release: 1.0)")
    # System
    add("--parallel", choices=["none", "ddp", "fsdp"], help="data parallelism (default: fsdp on CUDA, ddp on CPU)")
    add("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    add("--freeze", type=training.parse_freeze, default=(), metavar="PART[,PART]",
        help="parts of the model that stay as loaded, a comma list of vision (tower and projector), language "
        "(embeddings, decoder, lm_head), embeddings (token embeddings and lm_head), mlp (the decoder's MLPs); "
        "none (default) = the whole model (release)")
    add("--rollout-sharded", action="store_true", help="FSDP2: roll out on the sharded model (an all-gather per "
        "layer per decode step, ranks in lockstep) instead of gathering it once per phase; for models that do not "
        "fit gathered (README \"Rollout memory\")")
    add("--system-prompt", choices=["default", "r1"], default="default",
        help="default = no system message (release RL); r1 = the release's SFT system prompt (Δ14)")
    add("--save-every", type=int, default=0, help="checkpoint step_N/ every N steps (0: final/ only)")
    add("--sample-every", type=int, default=5, help="write a few decoded rollouts every N steps")
    pre, _ = ap.parse_known_args(argv)
    profile = pre.defaults or ("world" if pre.model is None and pre.data is None else "release")
    if profile == "world":
        ap.set_defaults(**WORLD)
    args = ap.parse_args(argv)
    args.defaults = profile

    # ---- derived settings
    ranks = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; distributed.setup reads the same
    given = any(a.split("=")[0] == "--update-batch" for a in (sys.argv[1:] if argv is None else argv))
    if profile == "world" and args.update_batch % ranks and args.rollout_batch % ranks == 0 and not given:
        # the world's 2 groups per optimizer step cannot split over more ranks: one group per rank instead (a rank
        # count that does not divide the RL step is refused at start by check_batch_sizes, naming the flag)
        args.update_batch = ranks
    data = Path(args.data or EMBEDDED_DATA)
    args.data = str(data / "rl_train.jsonl" if data.is_dir() else data)
    if args.model is None and args.resume is None:
        ck = newest_checkpoint(EMBEDDED_SFT)
        if ck is None:
            ap.error(f"no --model and no CoT-SFT checkpoint in {EMBEDDED_SFT}: run `bash run.sh` first, or pass --model")
        args.model = str(ck)
    if args.no_intra:  # the 10:0 ablation keeps the group size
        args.n1, args.n2 = args.n1 + args.n2, 0
    if args.no_inter:
        args.gamma, args.eta2 = 0.0, 0.0
    if args.replay in ("none", ""):
        args.replay, args.replay_coef = None, 0.0  # off, whatever the profile's weight
    if args.replay:  # relative names not found as given are the --data folder's (a world's replay files)
        try:
            sources = parse_data_spec(args.replay, "--replay")
        except DataError as e:
            ap.error(str(e))
        home = Path(args.data).parent
        args.replay = ",".join(f"{home / p if not Path(p).exists() and (home / p).exists() else p}:{w:g}"
                               for p, w in sources)
    if args.rl_coef < 0 or (args.rl_coef == 0 and not args.replay):
        ap.error("--rl-coef must be >= 0, and 0 (the replay-only control) needs a --replay to train")
    if args.encode_cache_mb < 0:
        ap.error("--encode-cache-mb must be >= 0 (0 = off)")
    if (args.replay_coef > 0) != bool(args.replay):
        ap.error("--replay FILES and --replay-coef > 0 go together (--replay none turns the replay off)")
    if args.n1 + args.n2 < 2:
        ap.error("a group needs at least 2 rollouts (n1 + n2) for a standard deviation")
    if args.n1 < 1:
        ap.error("n1 (rollouts on the anchor) must be >= 1")
    if not (args.update_batch <= args.rollout_batch and args.rollout_batch % args.update_batch == 0):
        ap.error(f"--rollout-batch {args.rollout_batch} must be a multiple of --update-batch {args.update_batch}")
    return args


def check_batch_sizes(args, world):
    """Refuse at start what can never fill a step: every global batch must split evenly over the ranks."""
    for flag, n in (("--rollout-batch", args.rollout_batch), ("--update-batch", args.update_batch),
                    ("--mini-rollout-batch", args.mini_rollout_batch or args.rollout_batch)):
        if n % world:
            raise SystemExit(f"tapo.py: {flag} {n} is not a multiple of the {world} ranks: each rank holds {flag} "
                             f"/ {world} groups, so the batch could never fill; use a multiple of {world}")


def release_steps(n_rows, update_batch, rollout_batch, epochs):
    """The release's run length (EasyR1): the data is cut to whole mini-batches, then to whole RL steps, per
    epoch: floor(floor(N / update) * update / rollout) * epochs. 1,808 rows: 40 steps at 3B (128 / 384, 10
    epochs), 45 at 7B (64 / 192, 5 epochs). At least 1."""
    per_epoch = (n_rows // update_batch * update_batch) // rollout_batch
    return max(1, int(per_epoch * epochs))


def within_prompt_cap(rows, processor, system, args):
    """(rows whose RL prompt fits --max-prompt-length, number skipped): EasyR1 drops overlong prompts at load."""
    keep = [r for r in rows if prompt_length(processor, rl_prompt(r.problem), r.image, system, args.min_pixels,
                                             args.max_pixels) <= args.max_prompt_length]
    return keep, len(rows) - len(keep)


# ----------------------------------------------------------------------------------------------------------
# The objective, one equation per function (README "Release facts")

def group_advantages(rewards, eps=1e-6):
    """Eq. 2: A_i = (R_i - mean_g R) / (std_g R + eps), unbiased std over the n1 + n2 rollouts of a group.

    rewards: (G, n) -> (G, n). A zero-variance group gives A = 0 (no NaN).
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=True, keepdim=True)
    return (rewards - mean) / (std + eps)


def clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0):
    """Eq. 1 (DAPO clip-higher + dual-clip), per token: the loss to MINIMISE.

    rho = exp(clamp(lp - old, -20, 20)); l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high));
    for A < 0 additionally l = min(l, -A C) (dual clip). Returns (loss (..), clipped (..) bool, dual (..) bool).
    The log-ratio clamp is the release's guard: without it one token with lp - old = 100 gives exp = inf and NaN
    gradients for its whole micro-batch, even where A = 0.
    """
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
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


def k3(lp, other):
    """The k3 ("low-variance") estimate of KL(pi || pi_other) per token of a sample drawn from pi, as released:
    d = clamp(other - lp, -20, 20); k = clamp(e^d - d - 1, -10, 10). Returns (k, clamped bool)."""
    d = torch.clamp(other - lp, -20.0, 20.0)
    k = torch.exp(d) - d - 1
    return torch.clamp(k, -10.0, 10.0), (k > 10.0) | (k < -10.0)


def inter_class_kl(lp, neg):
    """Eq. 3 as released: k3(lp, neg), the token-level KL(pi_theta || pi_neg) to the negative image (Δ2).
    It is SUBTRACTED from the loss with weight gamma (the policy maximises it). Returns (k, clamped)."""
    return k3(lp, neg)


def entropy_terms(lp, neg, eta1, eta2):
    """Eq. 4 as released: eta1 * (-lp) with gradient (lowers entropy) + eta2 * (-neg) WITHOUT gradient (Δ3, Δ4)."""
    return eta1 * (-lp) + eta2 * (-neg.detach())


def tapo_token_loss(lp, old, neg, adv, ref=None, *, eps_low, eps_high, dual_clip, gamma, eta1, eta2, beta=0.0):
    """All terms per token: L = l_clip - gamma * k_neg + eta1 (-lp) + eta2 (-neg) [+ beta * k_ref].

    neg None (--no-inter): no inter-class or eta2 term. ref None or beta 0: no reference KL (Δ5).
    Returns (loss (..), parts dict of per-token tensors for the log)."""
    pg, clipped, dual = clipped_surrogate(lp, old, adv, eps_low, eps_high, dual_clip)
    loss = pg
    k = clamped = None
    if neg is not None:
        k, clamped = inter_class_kl(lp, neg)
        loss = loss - gamma * k + entropy_terms(lp, neg, eta1, eta2)
    else:
        loss = loss + eta1 * (-lp)
    if ref is not None and beta > 0:
        loss = loss + beta * k3(lp, ref)[0]
    return loss, dict(pg=pg, clipped=clipped, dual=dual, k=k, k_clamped=clamped)


def loss_coefficients(args):
    """The objective's coefficients from the parsed flags (tapo_token_loss keyword arguments)."""
    return dict(eps_low=args.eps_low, eps_high=args.eps_high, dual_clip=args.dual_clip, gamma=args.gamma,
                eta1=args.eta1, eta2=args.eta2, beta=args.kl_ref)


# ----------------------------------------------------------------------------------------------------------
# Rollouts. Batch levels, named alike everywhere: an RL step draws --rollout-batch groups (all ranks); a
# mini-batch of --update-batch groups makes one optimizer step; a micro-batch of --micro-batch sequences is
# one forward pass on one rank. Every sampled response is a Sample carrying all its update needs.

@dataclass
class Group:
    """One Stage-2 row: its prompt encoded ONCE per image (anchor, positive, negative) and its rollouts."""
    row: object
    prompts: dict                 # side -> single-row encode_prompts output ("anchor", "positive", "negative")
    samples: list = field(default_factory=list)

    def accuracy(self):
        return sum(s.accuracy for s in self.samples) / len(self.samples)


@dataclass
class Sample:
    """One rollout and everything the update needs: log-probs (L,) under the sampler, the old policy on its
    update image, the old policy on the negative image and the reference policy; advantage; weight (0 for the
    lockstep filler)."""
    group: Group
    side: str                     # "anchor" | "positive": the image it was sampled from
    ids: list                     # response token ids (incl. the stop token if it stopped)
    text: str
    finish: str                   # "stop" | "length"
    sample_lp: torch.Tensor       # (L,) log-probs reported by the sampler
    overall: float
    accuracy: float
    format: float
    old: torch.Tensor = None      # (L,)
    neg: torch.Tensor = None      # (L,)
    ref: torch.Tensor = None      # (L,)
    adv: float = 0.0
    weight: float = 1.0


def encode_group(processor, row, system, min_pixels=None, max_pixels=None):
    """A Group with the RL prompt encoded once on each of the triplet's images (the anchor in the pixel budget,
    positive and negative resized to its size, so the three prompts have the same tokens and M-RoPE positions)."""
    images = load_triplet(row, min_pixels, max_pixels)
    text = rl_prompt(row.problem)
    sides = ("anchor", "positive", "negative")
    return Group(row, {s: encode_prompts(processor, [im], [text], system) for s, im in zip(sides, images)})


def sample_groups(model, processor, rows, args, system, seed_base):
    """Phase 2: n1 rollouts on each anchor and n2 on its positive, scored by the reward. -> ([Group], tokens)."""
    tok = processor.tokenizer
    stop = stop_token_ids(model, tok)  # every eos of the generation config, as vLLM / HF generate
    groups = [encode_group(processor, r, system, args.min_pixels, args.max_pixels) for r in rows]
    n_tok = 0
    calls = [[("anchor", args.n1, 0)], [("positive", args.n2, 500)]]
    if args.n1 == args.n2:  # one batched call for both images: the same rollouts (each has its own seeded
        # generator; equal up to float rounding in the batched matmuls), 1.2-1.4x faster on CPU (stop 29)
        calls = [calls[0] + calls[1]]
    for call in calls:
        call = [(side, n, offset) for side, n, offset in call if n > 0]
        if not call:
            continue
        n = call[0][1]  # rows: side-major, then group, then sample
        batch = stack_prompts([g.prompts[side] for side, _, _ in call for g in groups], tok.pad_token_id)
        # one generator per rollout, seeded from (step, attempt, rank, prompt, side, sample): replayable
        seeds = [seed_base + 1000 * i + offset + j for _, _, offset in call for i in range(len(groups)) for j in range(n)]
        ro = generate(model, batch, n=n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, stop_ids=stop, pad_id=tok.pad_token_id, seeds=seeds,
                      suppress_ids=vision_token_ids(tok))
        texts = decode(tok, ro)
        n_tok += int(ro.lengths.sum())
        for r, text in enumerate(texts):
            side = call[r // (n * len(groups))][0]
            g, L = groups[(r // n) % len(groups)], int(ro.lengths[r])
            s = score(text, g.row.answer, mode=args.reward, acc_weight=args.acc_weight, fmt_weight=args.fmt_weight)
            g.samples.append(Sample(g, side, ro.tokens[r, :L].tolist(), text, ro.finish[r], ro.logprobs[r, :L].clone(),
                                    s["overall"], s["accuracy"], s["format"]))
    return groups, n_tok


def update_side(sample, intra_condition):
    """Image that scores a rollout in the update (Δ1): its own (release) or always the anchor (paper)."""
    return "anchor" if sample.side == "anchor" or intra_condition == "anchor" else "positive"


def micro_batch(samples, sides, pad_id):
    """Teacher-forcing batch [prompt on image sides[i] | response of samples[i]], from the cached prompts."""
    prompts = stack_prompts([s.group.prompts[side] for s, side in zip(samples, sides)], pad_id)
    return join_prompt_response(prompts, [s.ids for s in samples], pad_id)


def response_forward(model, samples, sides, pad_id, temperature, share):
    """Teacher-forced log pi(response token | prompt on image sides[i], earlier tokens) / temperature of each
    sample: ((b, L) log-probs, (b, L) response mask), L the longest response. share (--share-prompt): each
    distinct (group, image) prompt runs once for all its responses (rollout.shared_prompt_logprobs: the same
    log-probs up to float rounding; a 5 + 5 group's update forward + backward 0.6x the time on the world), else
    the padded batch [prompt | response] per sample (micro_batch)."""
    if not share:
        batch = micro_batch(samples, sides, pad_id)
        P = batch["prompt_len"]
        return token_logprobs(model, batch, temperature=temperature)[:, P:], batch["response_mask"][:, P:]
    rows, index, prompts = {}, [], []
    for s, side in zip(samples, sides):
        key = (id(s.group), side)
        if key not in rows:
            rows[key] = len(prompts)
            prompts.append(s.group.prompts[side])
        index.append(rows[key])
    return shared_prompt_logprobs(model, stack_prompts(prompts, pad_id), index, [s.ids for s in samples], pad_id,
                                  temperature)


@torch.no_grad()
def response_logprobs(model, samples, sides, pad_id, temperature, micro, share=False):
    """Teacher-forced log-probs (no grad) of each sample's response on the given image side: [(L,)]."""
    out = []
    for i in range(0, len(samples), micro):
        chunk = samples[i:i + micro]
        lp, _ = response_forward(model, chunk, sides[i:i + micro], pad_id, temperature, share)
        out += [lp[j, :len(s.ids)] for j, s in enumerate(chunk)]
    return out


def rl_batches(model, ref, processor, prompts, args, system, dist, step):
    """Phases 1-5 of each RL step, as an endless generator: yields (samples of this rank, stats) with old /
    negative / reference log-probs, advantages and weights filled in; the training loop only updates."""
    pad = processor.tokenizer.pad_token_id
    per_rank = args.rollout_batch // dist.world                      # groups this rank keeps per step
    per_try = (args.mini_rollout_batch or args.rollout_batch) // dist.world  # prompts this rank draws per try
    while True:
        # ---- 1-3. prompts, rollouts, dynamic sampling (Δ7: drop all-right / all-wrong groups, <= max_retries);
        # every try draws a full mini rollout batch, as the release, and keeps what fits
        model.eval()
        kept, drawn, retries, n_tok, survived, t0 = [], [], 0, 0, 0, time.time()
        for attempt in range(args.max_retries + 1):
            rows = prompts.take(per_try)
            seed_base = ((args.seed * 1_000_003 + step) * 1_000_003 + attempt * 4099 + dist.rank) * 100_000
            with gathered(model, enabled=not args.rollout_sharded):  # FSDP2: one all-gather per unit, not per token
                groups, nt = sample_groups(model, processor, rows, args, system, seed_base)
            drawn += groups
            n_tok += nt
            survivors = [g for g in groups if 0.01 < g.accuracy() < 0.99]
            survived += len(survivors)
            # collective (only with the flag, the same on every rank): did any group of this try survive anywhere?
            if args.keep_unfiltered and distributed.all_sum(float(len(survivors))) == 0:
                survivors = groups  # the release's quirk: nothing survived, so the whole try is kept
            kept += survivors[:per_rank - len(kept)]
            # collective: every rank learns the global kept count, so all ranks retry (or stop) together
            if distributed.all_sum(float(len(kept))) >= args.rollout_batch or attempt == args.max_retries:
                break
            retries += 1
        t_gen = time.time() - t0

        # ---- 4. lockstep filler: every rank must run the same number of forward calls, so ranks with fewer
        # kept rollouts pad with weight-0 copies of the last drawn groups' rollouts
        samples = [s for g in kept for s in g.samples]
        n_max = max(distributed.all_gather_objects(len(samples)))  # collective: every rank's rollout count
        spare = [s for g in groups for s in g.samples]
        samples += [Sample(**{**vars(spare[i % len(spare)]), "weight": 0.0}) for i in range(n_max - len(samples))]

        # ---- 5. old, negative and reference log-probs (no grad), each on its image; advantages (Eq. 2)
        upd = [update_side(s, args.intra_condition) for s in samples]
        # the sampler's log-probs serve as pi_old where every rollout is scored on its own image (the same choice on
        # every rank, so the ranks' forward calls stay in lockstep)
        reuse = args.old_logprobs == "sampler" and (args.intra_condition == "positive" or args.n2 == 0)
        if reuse:
            for s in samples:
                s.old = s.sample_lp
        else:
            for s, lp in zip(samples, response_logprobs(model, samples, upd, pad, args.temperature, args.micro_batch,
                                                        args.share_prompt)):
                s.old = lp
        if args.gamma > 0 or args.eta2 > 0:
            for s, lp in zip(samples, response_logprobs(model, samples, ["negative"] * len(samples), pad,
                                                        args.temperature, args.micro_batch, args.share_prompt)):
                s.neg = lp
        if ref is not None:
            for s, lp in zip(samples, response_logprobs(ref, samples, upd, pad, args.temperature, args.micro_batch,
                                                        args.share_prompt)):
                s.ref = lp
        for g in kept:
            adv = group_advantages(torch.tensor([[s.overall for s in g.samples]]))[0]  # (n1 + n2,)
            for s, a in zip(g.samples, adv.tolist()):
                s.adv = a
        # sampler vs trainer mismatch, on rollouts whose old log-probs were computed on their own image
        gap = None if reuse else max([float((s.sample_lp - s.old).abs().max()) for s, side in zip(samples, upd)
                                      if s.weight > 0 and side == s.side and len(s.ids)] or [0.0])
        yield samples, dict(drawn=drawn, kept=len(kept), survived=survived, retries=retries, gen_tokens=n_tok,
                            gen_s=t_gen, lp_gap=gap)
        step += 1


# ----------------------------------------------------------------------------------------------------------
# The update

LOSS_STATS = ("loss", "pg", "clip", "dual", "k", "k_clamped", "ent", "tokens", "push_pg", "push_inter")


def pad_right(tensors, L):
    out = torch.zeros(len(tensors), L)
    for i, t in enumerate(tensors):
        out[i, :len(t)] = t
    return out


def accumulate_grads(model, mini, n_micro, n_tok_global, coef, args, pad_id, world, scale=1.0):
    """Forward + backward of one mini-batch of this rank's samples in n_micro micro-batches (gradients add up),
    the objective's gradient times `scale` (--rl-coef; 0 = the replay-only control: no gradient, the same log).

    The loss is a token-level mean over the mini-batch's response tokens on ALL ranks (n_tok_global): each
    token contributes tok_loss / n_tok_global, whatever the micro-batch split or the world size (Δ6). A rank
    with fewer micro-batches runs weight-0 ones, so that every rank makes n_micro forward calls.
    Returns a (len(LOSS_STATS),) tensor of this rank's token sums for the log.
    """
    sums = torch.zeros(len(LOSS_STATS), dtype=torch.float64)
    mb = args.micro_batch
    for u in range(n_micro):
        real = mini[u * mb:(u + 1) * mb]
        chunk = real or mini[:1]
        lp, rmask = response_forward(model, chunk, [update_side(s, args.intra_condition) for s in chunk], pad_id,
                                     args.temperature, args.share_prompt)                # (b, L)
        L = lp.shape[1]
        w = torch.tensor([s.weight if real else 0.0 for s in chunk])[:, None]            # (b, 1)
        mask = rmask.float() * w                                                           # (b, L)
        adv = torch.tensor([s.adv for s in chunk])[:, None].expand(-1, L)                  # (b, L)
        neg = pad_right([s.neg for s in chunk], L) if chunk[0].neg is not None else None
        ref = pad_right([s.ref for s in chunk], L) if chunk[0].ref is not None else None
        tok_loss, parts = tapo_token_loss(lp, pad_right([s.old for s in chunk], L), neg, adv, ref, **coef)
        # how hard each term pulls on each token's log pi, |d term / d lp| (the log's push_*; the eta1 term's is
        # eta1 on every token): the clipped surrogate's against gamma x the inter-class KL's
        push_pg = torch.autograd.grad((parts["pg"] * mask).sum(), lp, retain_graph=True)[0].abs()
        push_inter = (coef["gamma"] * torch.autograd.grad((parts["k"] * mask).sum(), lp, retain_graph=True)[0].abs()
                      if parts["k"] is not None else torch.zeros_like(lp))
        # token-level mean over the global mini-batch; DDP / FSDP2 average gradients over ranks, hence x world
        ((tok_loss * mask).sum() / n_tok_global * world * scale).backward()
        with torch.no_grad():
            k = parts["k"] if parts["k"] is not None else torch.zeros_like(lp)
            kc = parts["k_clamped"] if parts["k_clamped"] is not None else torch.zeros_like(mask, dtype=torch.bool)
            terms = (tok_loss, parts["pg"], parts["clipped"], parts["dual"], k, kc, -lp, torch.ones_like(lp))
            sums += torch.stack([(t.double() * mask).sum() for t in terms]
                                + [push_pg.double().sum(), push_inter.double().sum()])  # mask already inside
    return sums


def update(model, opt, samples, args, dist, pad_id, replay=None, step=0, need_image=False):
    """Phase 6: one optimizer step per mini-batch of --update-batch groups, each with the replay term when there
    is one (its batch k = step x mini-batches + m). -> (loss sums, grad norm, updates, skipped, replay NLL sums)."""
    model.train()
    n_mini = args.rollout_batch // args.update_batch
    per_mini = max(1, args.update_batch // dist.world) * (args.n1 + args.n2)  # this rank's samples per mini-batch
    minis = [samples[m * per_mini:(m + 1) * per_mini] for m in range(n_mini - 1)]
    minis.append(samples[(n_mini - 1) * per_mini:])  # the last mini-batch also takes the lockstep filler
    # collective: the global response-token count of each mini-batch (token-level mean, Δ6) and every rank's
    # micro-batch count (the largest is run everywhere), for all mini-batches at once
    n_tok = distributed.all_sum(torch.tensor([sum(len(s.ids) * s.weight for s in mini) for mini in minis],
                                             dtype=torch.float64))
    n_micro = distributed.all_max(torch.tensor([math.ceil(len(mini) / args.micro_batch) for mini in minis],
                                               dtype=torch.float64))
    coef, sums, gnorm, updates = loss_coefficients(args), torch.zeros(len(LOSS_STATS), dtype=torch.float64), 0.0, 0
    skipped, replay_sums = 0, [0.0, 0.0]  # this rank's replay NLL, the replayed tokens of all ranks
    for m, (mini, nt, nm) in enumerate(zip(minis, n_tok.tolist(), n_micro.tolist())):
        if nt == 0:
            continue  # nothing survived anywhere: no update (logged as kept 0)
        sums += accumulate_grads(model, mini, int(nm), nt, coef, args, pad_id, dist.world, scale=args.rl_coef)
        if replay is not None:  # the same decision and micro-batch count on every rank (nt is global)
            nll, n = replay.backward(model, step * n_mini + m, dist.device, dist.rank, dist.world, need_image)
            replay_sums = [replay_sums[0] + nll, replay_sums[1] + n]
        gnorm = training.clip_grad_norm(model, args.grad_clip)  # the same value on every rank
        if math.isfinite(gnorm):
            opt.step()
            updates += 1
        else:
            skipped += 1  # as the release: a non-finite gradient norm skips the optimizer step (logged)
        opt.zero_grad(set_to_none=True)
    return sums, gnorm, updates, skipped, replay_sums


# ----------------------------------------------------------------------------------------------------------
# The log: this rank's sums stacked in one tensor, one all-reduce

def step_metrics(step, samples, stats, sums, gnorm, updates, skipped, t_step, n2, replay_sums=(0.0, 0.0)):
    rollouts = [s for g in stats["drawn"] for s in g.samples]
    anchor = [s for s in rollouts if s.side == "anchor"]
    positive = [s for s in rollouts if s.side == "positive"]
    local = torch.tensor([
        sum(s.overall for s in rollouts), sum(s.accuracy for s in rollouts), sum(s.format for s in rollouts),
        len(rollouts), sum(s.accuracy for s in anchor), len(anchor), sum(s.accuracy for s in positive), len(positive),
        sum(len(s.ids) for s in rollouts), sum(s.finish == "length" for s in rollouts),
        stats["kept"], len(stats["drawn"]), stats["gen_tokens"], stats["survived"], replay_sums[0], *sums.tolist()],
        dtype=torch.float64)
    tot = distributed.all_sum(local).tolist()  # collective: one all-reduce of every rank's sums
    (reward, acc, fmt, n, acc_a, n_a, acc_p, n_p, length, trunc, kept, drawn, gen_tok, surv, replay_nll), loss = \
        tot[:15], tot[15:]
    ls = dict(zip(LOSS_STATS, loss))
    ntok = max(1.0, ls["tokens"])
    return dict(step=step, reward=reward / max(1, n), acc=acc / max(1, n), acc_anchor=acc_a / max(1, n_a),
                acc_positive=acc_p / max(1, n_p) if n2 else None, format=fmt / max(1, n), kept=kept,
                drawn=drawn, kept_frac=kept / max(1, drawn), survived_frac=surv / max(1, drawn), retries=stats["retries"], updates=updates, skipped=skipped,
                loss=ls["loss"] / ntok,
                pg=ls["pg"] / ntok, kl_neg=ls["k"] / ntok, kl_neg_clamped=ls["k_clamped"] / ntok,
                push_pg=ls["push_pg"] / ntok, push_inter=ls["push_inter"] / ntok,
                entropy=ls["ent"] / ntok, clip_frac=ls["clip"] / ntok, dual_clip_frac=ls["dual"] / ntok,
                len=length / max(1, n), trunc=trunc / max(1, n),
                replay_nll=replay_nll / replay_sums[1] if replay_sums[1] else None,
                # collective (every rank recomputes or none does): the largest gap of any rank
                lp_gap=distributed.all_max(stats["lp_gap"]) if stats["lp_gap"] is not None else None,
                grad_norm=gnorm, rollout_tok_s=gen_tok / max(1e-9, stats["gen_s"]), step_s=time.time() - t_step)


def log_line(m, max_steps, n2):
    return (f"step {m['step']}/{max_steps} | reward {m['reward']:.3f} | acc {m['acc']:.3f} (anchor {m['acc_anchor']:.3f}"
            + (f", pos {m['acc_positive']:.3f}" if n2 else "") + f") | fmt {m['format']:.2f} | kept "
            f"{int(m['kept'])}/{int(m['drawn'])} (survived {m['survived_frac']:.2f}) retries {m['retries']} | "
            f"kl_neg {m['kl_neg']:.4f} | ent {m['entropy']:.3f} | clip {m['clip_frac']:.3f} | len {m['len']:.0f} | "
            + (f"gap {m['lp_gap']:.1e}" if m["lp_gap"] is not None else "pi_old sampler") + (f" | replay {m['replay_nll']:.3f}" if m["replay_nll"] is not None else "")
            + f" | {m['rollout_tok_s']:.0f} tok/s | {m['step_s']:.1f} s"
            + (f" | no group survived after {m['retries']} retries: no update" if m["kept"] == 0 else "")
            + (f" | {m['skipped']} update(s) skipped: non-finite gradient norm" if m["skipped"] else ""))


def write_samples(out, step, drawn):
    with open(out / "samples.txt", "a") as f:
        for g in drawn[:2]:
            for s in g.samples[:2]:
                f.write(f"--- step {step} | gt {g.row.answer} | {s.side} | reward {s.overall:.2f}\n{s.text}\n")


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

    # ---- model, reference, optimizer, data, resume state
    resume = training.resume_path(args.resume, out)
    if args.resume and resume is None:
        dist.print(f"--resume: no checkpoint in {out} yet, starting fresh")
    model, processor = load_policy(resume or args.model, dtype=torch.float32)
    training.freeze(model, args.freeze)
    model, parallel = training.wrap_for_training(model, args.parallel, args.grad_checkpointing, dist)
    # the flags as given are saved with checkpoints (resume compares them); `run` is what this run does
    run = argparse.Namespace(**vars(args))
    if args.share_prompt and (parallel == "fsdp" or args.grad_checkpointing or not takes_packed_mask(model)):
        dist.print("--share-prompt: off (it needs DDP or one process, no activation checkpointing, SDPA or eager "
                   "attention); every response's forward holds its own prompt")
        run.share_prompt = False
    ref = None
    if args.kl_ref > 0:  # Δ5: the frozen initial policy
        if not args.model:
            raise SystemExit("tapo.py: --kl-ref needs --model (the frozen reference policy)")
        ref = load_policy(args.model, dtype=torch.float32)[0].to(dist.device).eval().requires_grad_(False)
    opt = training.build_optimizer(model, args.lr, args.weight_decay, decay_1d=True)  # release: AdamW on all
    check_batch_sizes(args, dist.world)
    try:
        rows, too_long = within_prompt_cap(load_stage2(args.data, args.image_root), processor, system, args)
    except DataError as e:
        raise SystemExit(f"tapo.py: bad data: {e}") from None
    if not rows:
        raise SystemExit(f"tapo.py: every row of {args.data} is longer than --max-prompt-length {args.max_prompt_length}")
    replay = None
    if args.replay:
        try:
            replay = Replay(args.replay, processor, system, coef=args.replay_coef, batch=args.replay_batch,
                            micro=args.micro_batch, max_length=args.max_prompt_length + args.max_new_tokens,
                            pixels=(args.min_pixels, args.max_pixels), image_root=args.image_root, seed=args.seed,
                            images_only="language" in args.freeze, pack=args.replay_pack,
                            cache_mb=args.encode_cache_mb,
                            share_prefix=args.replay_share_prefix and takes_packed_mask(model))
        except DataError as e:
            raise SystemExit(f"tapo.py: bad --replay data: {e}") from None
        dist.print(f"replay: {len(replay.samples)} samples from {args.replay}, {replay.batch} per optimizer step "
                   f"at coef {args.replay_coef} ({replay.truncated} truncated, {replay.share} shared prefix tokens "
                   "per packed row)")
    prompts = RowStream(rows, args.seed, dist.rank, dist.world)
    state = training.restore(resume, model, opt, dist) or dict(step=0)
    step = state["step"]
    if resume:
        ps = state["prompts"]
        prompts.load(ps[dist.rank] if len(ps) == dist.world else ps[0])
        changed = training.changed_settings(state.get("args", {}), args)
        dist.print(f"resumed from {resume} at step {step}" + (f"; changed (saved, now): {changed}" if changed else ""))
    max_steps = args.max_steps or release_steps(len(rows), args.update_batch, args.rollout_batch, args.epochs)
    if dist.master:
        out.mkdir(parents=True, exist_ok=True)
        print("config:", json.dumps(vars(args), sort_keys=True), flush=True)
        print(f"tapo: {len(rows)} rows from {args.data} ({too_long} skipped: prompt over --max-prompt-length); "
              f"model {resume or args.model}; world {dist.world} "
              f"({parallel}); {max_steps} steps; defaults {args.defaults}; shared prompts {run.share_prompt}", flush=True)

    # ---- loop: each step takes one ready batch of rollouts and updates on it
    t_start = time.time()
    bar = tqdm(total=max_steps, initial=step, desc="tapo", disable=not dist.master, dynamic_ncols=True)
    batches = rl_batches(model, ref, processor, prompts, run, system, dist, step)
    pad = processor.tokenizer.pad_token_id
    while step < max_steps:
        t_step = time.time()
        samples, stats = next(batches)
        sums, gnorm, updates, skipped, replay_sums = update(model, opt, samples, run, dist, pad, replay, step,
                                                            need_image=dist.world > 1)
        step += 1
        m = step_metrics(step, samples, stats, sums, gnorm, updates, skipped, t_step, args.n2, replay_sums)
        if dist.master:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            bar.update(1)
            bar.write(log_line(m, max_steps, args.n2))
            if args.sample_every and step % args.sample_every == 0:
                write_samples(out, step, stats["drawn"])

        # ---- save (collective): at the end, every --save-every steps, or when --max-minutes is up
        # collective: every rank agrees whether to stop (elapsed time differs slightly across ranks)
        timed_out = distributed.all_any(args.max_minutes is not None and (time.time() - t_start) / 60 > args.max_minutes)
        last = step >= max_steps or timed_out
        if last or (args.save_every and step % args.save_every == 0):
            # collective: every rank's position in its prompt stream
            run_state = dict(step=step, args=vars(args), prompts=distributed.all_gather_objects(prompts.state()))
            training.save(out / ("final" if last else f"step_{step}"), model, processor, opt, run_state, dist)
        if timed_out:
            dist.print(f"--max-minutes {args.max_minutes} reached at step {step}: saved and stopping")
            break
    bar.close()
    distributed.teardown(exit_process=True)


if __name__ == "__main__":
    main()
