"""Stage 1 of Fine-R1: CoT supervised fine-tuning (paper section 3.2; README "Release facts").

The policy learns to answer with a structured rationale, `<think> visual analysis -> candidates -> comparison
-> prediction </think>\\n\\n<answer>LABEL</answer>`, by teacher forcing on the release's Stage-1 JSON. The same
script trains the embedded world's *base* model from scratch on its pretraining corpus (captions, attribute
questions, knowledge texts: the same Stage-1 format, some samples text-only), so `--data` takes a mixture.

    python world.py --out out/world                              # the embedded benchmark (seconds)
    python sft.py --variant pretrain                             # base model: tiny preset on pretrain.json -> out/base
    python sft.py                                                # CoT SFT of out/base on cot_sft.json -> out/sft_cot
    python sft.py --variant nocot                                # ablation "SFT w/o CoT" -> out/sft_nocot
    torchrun --nproc_per_node 2 sft.py ...                       # the same, 2-rank DDP (gloo on CPU)
    # the release's setting: Qwen2.5-VL-7B-Instruct, 8 GPUs, FSDP2 + activation checkpointing + bf16
    torchrun --nproc_per_node 8 sft.py --model /ckpt/Qwen2.5-VL-7B-Instruct --data data/stage1_cot.json \\
        --image-root data/images --out runs/sft7b --parallel fsdp --grad-checkpointing --micro-batch 4

`--data` is a comma-separated list of sources, each `PATH[:WEIGHT]`: a Stage-1 JSON file, or an embedded-world
folder (meaning its cot_sft.json, sft_nocot.json or pretrain.json after `--variant`). WEIGHT (default 1)
repeats a source: its integer part gives whole copies, its fraction a seeded subset, fixed for the run
(`--data a.json:2,b.json:0.5`). Relative image paths resolve against `--image-root`, else the file's folder.

One optimizer step: global batch -> micro-batches sorted by length, the same count on every rank -> loss ->
backward (accumulate) -> clip -> AdamW with the cosine/warmup lr -> log -> save.

Loss: the mean NLL over every assistant token of the optimizer step, *across its micro-batches and ranks*:
    L = -(1 / N_step) * sum_{assistant tokens t of the step} log pi(y_t | image, prompt, y_<t)
N_step is known before the first forward (all micro-batches of the step are planned up front), so the update
is the same for any micro-batch size and any number of ranks (tests/test_sft.py checks both to 1e-6). System,
user, image and padding tokens carry no loss; the assistant's closing <|im_end|> does (it ends generation).

Hyper-parameters: the argparse defaults are the released SFT script's (lr 5e-6 cosine, 6 warmup steps, wd 0.1,
global batch 64, 10 epochs, cutoff 4096, bf16). `--defaults world` takes the embedded CPU benchmark's values
instead (WORLD below, per --variant); it is the default only when neither --model nor --data is given.

Deviations and choices:
 1. Δ13 the release froze the vision tower and projector (framework default) though the paper says "full
    fine-tune": the default here is the paper's full fine-tune; `--freeze vision` reproduces the release. The
    world's SFT also freezes the token embeddings and the decoder's MLPs (`--freeze vision,embeddings,mlp`).
 2. Δ14 the release's SFT used an R1 system prompt while its RL and eval used none. Default: no system prompt
    (data.py: SFT trains on the conversation the model later sees); `--system-prompt r1` = the release. The
    system message inside a Stage-1 file is not applied either way.
 3. Exact token-level normalisation over the global step (above). The release's framework averages per
    micro-batch and then over accumulation steps and ranks, which weighs a token by its micro-batch's size.
 4. Batching: global batches are drawn at random; each is sorted by length and cut into micro-batches dealt
    round-robin to ranks (`--length-grouping micro`), so padding drops while every step's samples, hence the
    optimisation, are those of plain shuffling, for any micro-batch size and world size. `global` also groups
    whole batches by length (HF group_by_length): faster, but single-task batches on a mixture (see
    supervised.epoch_batches). The epoch's last batch may be partial (nothing dropped); when it has fewer samples
    than there are micro-batch slots, a rank runs a zero-weight copy so that all ranks run the same number of
    forward calls (FSDP2 would otherwise hang).
 5. No weight decay on 1-D parameters (biases, norm weights), as the HF Trainer the release used.
 6. The lr of optimizer step s (0-based) is lr * f(s), f = HF's cosine-with-warmup: the first update runs at
    lr 0, as in the release's framework.
 7. The user turn is the Stage-1 question as written, as in the release. The embedded world's SFT files
    already ask each image under the RL, open- and closed-world prompts (world.py), since the tiny model,
    unlike Qwen2.5-VL, follows only prompts it was trained on.
 8. Under torchrun a text-only micro-batch (pretraining knowledge texts) gets one extra unscored row with a
    blank 56x56 image, so that every rank runs the vision tower at the same point of its forward (FSDP2's
    all-gathers must come in the same order on all ranks; see supervised.encode_micro_batch).
 9. Two optional keys of a Stage-1 record, ours (the release's files have neither): `"prefix": true`, the
    assistant text is the start of a longer answer and is scored without the closing <|im_end|>; `"unscored":
    [[start, end], ...]`, character spans of the assistant text whose tokens stay in the input but carry no
    loss (and do not count in N_step). The world's analysis_replay.json uses both (world.py).
10. `--pack` (the world profile's default, off for the release): a step's samples go first-fit into rows as wide
    as its longest sample, each sample with its own positions and attending only to itself (HF's packed-sequence
    path), rows dealt evenly to ranks (supervised.packed_micro_batches): the same loss up to float rounding, with
    less padding and no whole blank rows (the blank image rides in a row with room). --micro-batch counts rows.
11. With --pack and --share-prefix (on by default), the prompt tokens every sample starts with (the system turn and
    "<|im_start|>user\n", supervised.shared_prefix_len: 15 on the world) stand once at the start of each row;
    the row's later samples leave them out and attend to that copy through a 4-D attention mask, their own tokens
    keeping their positions: the same log-probs to float rounding, 10% fewer tokens on the busier rank per base
    epoch on the world (more samples fit a row; README "Stop 38"). Off, or with FlashAttention-2, each sample holds its own copy.
12. With --pack, each sample's encoding (tokens, image patches, M-RoPE positions) is kept after its first use,
    up to --encode-cache-mb per process (supervised.EncodeCache), and later epochs read it back: the same batches
    bit for bit, without re-reading images and re-running the processor (the world's base model: 572 MiB for
    its whole corpus in one process; under 2-rank DDP each rank holds what it has met).
TODO: every rank loads the full fp32 model before sharding (fine to 7B on a large host; meta-device init +
rank-0 broadcast would lower host memory). Images are decoded in the training loop (no DataLoader workers).
"""
import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
import training
from data import SYSTEM_PROMPT_R1, DataError
from checkpoint import newest_checkpoint
from policy import load_policy, takes_packed_mask
from supervised import WORLD_FILES, EncodeCache, epoch_batches, forward_backward, grouping_keys, load_mixture, \
    parse_sources, shared_prefix_len, step_micro_batches, tokenize, unscored_positions

EMBEDDED_DATA = Path("out/world")  # the embedded world (python world.py --out out/world)
RUNS = {"pretrain": Path("out/base"), "cot": Path("out/sft_cot"), "nocot": Path("out/sft_nocot")}

# The embedded world's values (--defaults world), per --variant, measured on a 2-core CPU with the tiny preset.
# pretrain (from scratch on pretrain.json): lr 1e-3 (at 3e-3 held-out captions were 24/96 exact, at 1e-3 69/96),
# batch 16 (beat 32 at equal epochs). cot / nocot: about 300 steps on the 90 SFT samples (each seen image asked
# under the RL, open and closed prompts: the tiny model follows only prompts it was trained on); the vision tower
# and projector frozen, as the release's SFT (Δ13): trained too, the CoT model lost more of the unseen classes
# (seed 0 of a world with 32 quizzes per class: closed unseen 49.3 vs 60.4; README, "Tried before"). The token
# embeddings and the decoder's MLPs stay frozen too (a world deviation): a few hundred steps on seen classes
# otherwise overwrite what the 0.7M model knows of the unseen ones (closed unseen over 5 seeds: 35.7 with only
# the vision side frozen, 44.4 with the embeddings as well, 51.4 with the MLPs as well; README "Tried before this").
# The embedded world's base model: the 1.2M-parameter 4-layer preset (README "Results": the 0.7M "tiny" did not
# make the rationale's copies and lookup on unseen classes), 8 epochs: with 7 (and this micro-batch) CoT SFT reached
# 68.3 / 63.9 closed seen / unseen on seed 0, against 82.1 / 74.3 after 8 epochs with micro-batch 8. Its micro-batch
# of 4 per rank, not 8, only splits the same 16-sample step differently (the same gradient up to float summation
# order): 0.84x the time per step under DDP on 2 cores, measured, as a rank's two micro-batches of a length-sorted
# batch pad less than one of 8.
# Since stop 31 every world SFT packs its samples into rows (--pack; the same loss up to float rounding): side by
# side on seed 29's world, base steps under 2-rank DDP 178-182 vs 225-234 ms (padding 10% vs 24%), CoT SFT steps
# 138-157 vs 184-200 ms (16% vs 44%), identical losses to 4 decimals after 100-120 steps (out/exp/s31/bench_*.sh).
BASE_PRESET = "tiny4"
WORLD = {
    "pretrain": dict(lr=1e-3, warmup_steps=50, epochs=8, batch_size=16, micro_batch=4, max_length=512,
                     min_pixels=0, max_pixels=0, pack=True),
    "cot": dict(lr=1e-3, warmup_steps=10, epochs=27, batch_size=8, micro_batch=8, max_length=512,
                min_pixels=0, max_pixels=0, freeze=("vision", "embeddings", "mlp"), pack=True),
    "nocot": dict(lr=1e-3, warmup_steps=10, epochs=27, batch_size=8, micro_batch=8, max_length=512,
                  min_pixels=0, max_pixels=0, freeze=("vision", "embeddings", "mlp"), pack=True),
}


# ----------------------------------------------------------------------------------------------------------
# Configuration: the argparse defaults are the released SFT script's values (README "Release facts")

def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model and data
    ap.add_argument("--model", default=None, help="HF folder or preset (tiny/tiny4/small) to start from; default: "
                    f"the {BASE_PRESET} preset for --variant pretrain, else the newest checkpoint in {RUNS['pretrain']} "
                    "(the world's base model)")
    ap.add_argument("--data", default=None, help="comma-separated sources PATH[:WEIGHT], each a Stage-1 JSON or an "
                    f"embedded-world folder (its file for --variant); default {EMBEDDED_DATA}")
    ap.add_argument("--variant", choices=list(WORLD_FILES), default="cot", help="which training of the embedded "
                    "world: cot = Stage 1 on cot_sft.json, nocot = the answer-only ablation on sft_nocot.json, "
                    "pretrain = the base model on pretrain.json; picks the file of a world folder, the default "
                    "--out and --model, and the world values of --defaults world")
    ap.add_argument("--image-root", default=None, help="folder that relative image paths start from "
                    "(default: each data file's folder)")
    ap.add_argument("--system-prompt", choices=["default", "r1"], default="default",
                    help="default = no system message, as RL and eval (Δ14); r1 = the release's SFT system prompt")
    ap.add_argument("--out", default=None, help="run folder: step_N/ and final/ checkpoints, metrics.jsonl "
                    "(default: out/base, out/sft_cot or out/sft_nocot after --variant)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data order (and of a preset's init)")
    ap.add_argument("--resume", nargs="?", const=training.RESUME_NEWEST, default=None,
                    help="--resume alone: continue from the newest checkpoint in --out (fresh start if there is "
                    "none); --resume DIR: from that checkpoint folder")
    ap.add_argument("--defaults", choices=["release", "world"], default=None,
                    help="values of the flags marked 'world:' below: release = the released SFT script (the "
                    "defaults shown); world = the embedded CPU benchmark (WORLD[--variant] at the top of sft.py). "
                    "Default: world when neither --model nor --data is given (the embedded default), else release")
    # Optimisation
    ap.add_argument("--lr", type=float, default=5e-6, help="peak AdamW lr (release: 5e-6; world: 1e-3)")
    ap.add_argument("--warmup-steps", type=int, default=6, help="linear warmup steps before the cosine decay "
                    "(release: 6; world: 50 pretrain, 10 SFT)")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on >=2-D weights (release: 0.1)")
    ap.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas (release: HF default)")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (release: 1.0)")
    ap.add_argument("--epochs", type=float, default=10, help="passes over the data (release: 10; world: 8 pretrain, "
                    "27 SFT)")
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs (and sets "
                    "the cosine schedule's length)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this many minutes: save "
                    "final/ with the full resume state")
    # Batching
    ap.add_argument("--batch-size", type=int, default=64, help="samples per optimizer step, all ranks and "
                    "micro-batches together (release: 64 = 4 GPUs x 4 x accumulation 4; world: 16 pretrain, 8 SFT)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass per rank; gradient "
                    "accumulation covers the rest of the batch; at most --batch-size (release: 4; world: 4 pretrain, "
                    "8 SFT)")
    ap.add_argument("--min-pixels", type=int, default=32 * 32, help="images smaller than this are scaled up first "
                    "(release, LLaMA-Factory image_min_pixels: 1024; world: 0 = off)")
    ap.add_argument("--max-pixels", type=int, default=768 * 768, help="images larger than this are scaled down "
                    "first (release image_max_pixels: 589824; world: 0 = off)")
    ap.add_argument("--max-length", type=int, default=4096, help="tokens per sample (prompt + response); longer "
                    "responses are truncated (release cutoff: 4096; world: 512)")
    ap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=False,
                    help="pack several samples into each row (as wide as the step's longest sample), each attending "
                    "only to itself with its own positions: no padding between samples, ranks evened by rows, "
                    "--micro-batch then counts rows. The same loss up to float rounding (release: off; world: on)")
    ap.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                    help="with --pack: hold the prompt tokens every sample starts with (system turn, user header) "
                    "once per row, the row's other samples attending to that copy: the same loss up to float "
                    "rounding, fewer tokens (SDPA or eager attention only; ignored with FlashAttention-2)")
    ap.add_argument("--encode-cache-mb", type=float, default=1024, help="with --pack: keep up to this many MiB of "
                    "encoded samples (tokens, image patches, positions) per process for later epochs, instead of "
                    "re-reading and re-encoding them; the same batches bit for bit (0 = off)")
    ap.add_argument("--length-grouping", choices=["micro", "global", "none"], default="micro",
                    help="micro: random global batches, each sorted by length into micro-batches (less padding, "
                    "same steps as none); global: also group whole batches by length (HF group_by_length; "
                    "single-task batches on mixtures); none: random micro-batches")
    # System
    ap.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default=None,
                    help="data parallelism under torchrun (default: fsdp on CUDA, ddp on CPU)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute decoder activations in backward")
    ap.add_argument("--freeze", type=training.parse_freeze, default=(), metavar="PART[,PART]",
                    help="parts of the model that stay as loaded, a comma list: vision = the vision tower and "
                    "projector (the release, Δ13); language = embeddings, decoder and lm_head, only the vision side "
                    "learns (samples without an image are then dropped: nothing trainable sees them); embeddings = "
                    "token embeddings and lm_head; mlp = the decoder's MLPs. none (default) = full fine-tune "
                    "(paper). World: vision,embeddings,mlp for cot / nocot (README, deviations), none for pretrain")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 compute on CUDA (default: bf16 autocast, fp32 "
                    "master weights; CPU always runs fp32)")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint step_N/ every N steps (0: final/ only)")
    pre, _ = ap.parse_known_args(argv)
    profile = pre.defaults or ("world" if pre.model is None and pre.data is None else "release")
    if profile == "world":
        ap.set_defaults(**WORLD[pre.variant])
    args = ap.parse_args(argv)
    args.defaults = profile

    # ---- derived settings
    args.data = args.data or str(EMBEDDED_DATA)
    args.out = args.out or str(RUNS[args.variant])
    if args.model is None:
        base = newest_checkpoint(RUNS["pretrain"])
        args.model = BASE_PRESET if args.variant == "pretrain" else str(base) if base else None
        if args.model is None and args.resume is None:
            ap.error(f"no --model and no base checkpoint in {RUNS['pretrain']}: run `python sft.py --variant "
                     "pretrain` first, or pass --model")
    try:
        parse_sources(args.data, args.variant)
    except DataError as e:
        ap.error(str(e))
    if args.batch_size < 1 or args.micro_batch < 1:
        ap.error("--batch-size and --micro-batch must be >= 1")
    if args.encode_cache_mb < 0:
        ap.error("--encode-cache-mb must be >= 0 (0 = off)")
    args.micro_batch = min(args.micro_batch, args.batch_size)
    return args


# ----------------------------------------------------------------------------------------------------------
# Schedule

def cosine_with_warmup(step, warmup, total):
    """lr multiplier of optimizer step `step` (0-based): HF get_cosine_schedule_with_warmup (the release).
    step / warmup during warmup, then 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    args = get_args(argv)
    dist = distributed.setup()
    distributed.seed_everything(args.seed, dist.rank)
    out = Path(args.out)
    system = SYSTEM_PROMPT_R1 if args.system_prompt == "r1" else None

    # ---- model, data, optimizer, resume state
    resume = training.resume_path(args.resume, out)
    if args.resume and resume is None:
        dist.print(f"--resume: no checkpoint in {out} yet, starting fresh")
    if resume is None and args.model is None:
        raise SystemExit(f"sft.py: nothing to start from: no --model and no checkpoint in {out}")
    model, processor = load_policy(resume or args.model, seed=args.seed)
    pixels = (args.min_pixels, args.max_pixels)  # the release's pre-resize, before the processor's own
    try:
        samples = load_mixture(args.data, args.variant, args.image_root, args.seed)
        if "language" in args.freeze:  # a text-only sample would reach no trainable parameter
            n_all, samples = len(samples), [s for s in samples if s.image is not None]
            dist.print(f"--freeze language: {n_all - len(samples)} of {n_all} samples have no image, dropped")
            if not samples:
                raise DataError(f"{args.data}: no sample has an image, and --freeze language trains only the "
                                "vision side")
        prompt_lens, resp_ids, truncated = tokenize(samples, processor, system, args.max_length, pixels)
    except DataError as e:
        raise SystemExit(f"sft.py: bad data: {e}")
    keys = grouping_keys(prompt_lens, resp_ids)
    unscored = unscored_positions(processor.tokenizer, samples, resp_ids)
    share = shared_prefix_len(samples, processor, system) if args.pack and args.share_prefix and \
        takes_packed_mask(model) else 0
    training.freeze(model, args.freeze)  # Δ13 (vision); world cot / nocot: vision, embeddings, mlp
    model, parallel = training.wrap_for_training(model, args.parallel, args.grad_checkpointing, dist)
    model.train()
    bf16 = dist.device.type == "cuda" and not args.no_bf16
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    group_batches, group_micro = args.length_grouping == "global", args.length_grouping != "none"
    steps_per_epoch = len(epoch_batches(keys, args.batch_size, args.seed, 0, group_batches))
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    optimizer = training.build_optimizer(model, args.lr, args.weight_decay, args.betas, decay_1d=False)  # HF Trainer
    state = training.restore(resume, model, optimizer, dist) or dict(step=0, tokens_seen=0, elapsed=0.0)
    start, tokens_seen, elapsed0 = state["step"], state["tokens_seen"], state["elapsed"]
    if resume:
        changed = training.changed_settings(state.get("args", {}), args)
        if changed:
            dist.print(f"warning: resuming with changed settings {changed} (saved, now)")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dist.print(json.dumps({**vars(args), "parallel": parallel, "world": dist.world,
                           "samples": len(samples), "truncated": truncated, "shared_prefix": share,
                           "steps_per_epoch": steps_per_epoch,
                           "total_steps": total, "params": n_params, "trainable": n_train, "bf16": bf16,
                           "resumed_from": str(resume) if resume else None, "start_step": start}, indent=1))
    if dist.master:
        out.mkdir(parents=True, exist_ok=True)

    def save(name, step):  # collective: every rank takes part (RNG streams, FSDP2 shards)
        run_state = {"step": step, "epoch": step // steps_per_epoch, "batch_index": step % steps_per_epoch,
                     "order_seed": args.seed, "args": vars(args), "tokens_seen": tokens_seen,
                     "elapsed": elapsed0 + time.time() - t_start}
        training.save(out / name, model, processor, optimizer, run_state, dist)

    # ---- loop
    t_start = time.time()
    if start >= total:
        dist.print(f"nothing to do: {resume} is at step {start} of {total}")
        distributed.teardown(exit_process=True)
        return
    bar = tqdm(total=total, initial=start, disable=not dist.master, desc="sft", dynamic_ncols=True)
    cache = {}
    encoded = EncodeCache(args.encode_cache_mb) if args.pack and args.encode_cache_mb > 0 else None
    step = start
    while step < total:
        t0 = time.time()
        epoch, b = divmod(step, steps_per_epoch)
        if epoch not in cache:
            cache = {epoch: epoch_batches(keys, args.batch_size, args.seed, epoch, group_batches)}
        batch = cache[epoch][b]
        # every rank plans the whole step, so the step's token counts need no communication
        n_step = max(1, sum(len(resp_ids[i]) - len(unscored.get(i, ())) for i in batch))  # scored tokens, all ranks
        # ---- forward / backward over this rank's micro-batches
        mine, (real, padded) = step_micro_batches(
            model, processor, samples, prompt_lens, resp_ids, keys, batch, args.micro_batch, dist.rank, dist.world,
            pack=args.pack, group=group_micro, system=system, device=dist.device, need_image=dist.world > 1,
            pixels=pixels, unscored=unscored, cache=encoded, share=share)
        lr = args.lr * cosine_with_warmup(step, args.warmup_steps, total)
        nll = forward_backward(model, mine, n_step, dist.world, autocast)

        # ---- step
        gnorm = training.clip_grad_norm(model, args.grad_clip)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += real

        # ---- log
        loss = distributed.all_sum(float(nll)) / n_step  # collective: every rank's summed NLL
        dt = time.time() - t0
        rec = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": lr, "grad_norm": gnorm,
               "tokens": real, "assistant_tokens": n_step, "tok_s": real / dt, "pad": 1 - real / padded,
               "step_s": dt, "elapsed_s": elapsed0 + time.time() - t_start}
        if dist.master:
            bar.update(1)
            bar.write(f"step {step}/{total} | loss {loss:.4f} | lr {lr:.1e} | tok/s {real / dt:.0f} | "
                      f"pad {rec['pad']:.2f} | gnorm {gnorm:.2f} | {dt:.2f} s")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

        # ---- save
        timed_out = args.max_minutes is not None and (time.time() - t_start) / 60 > args.max_minutes
        timed_out = distributed.all_any(timed_out)  # collective: stop on every rank together
        if timed_out and step < total:
            save("final", step)
            dist.print(f"--max-minutes {args.max_minutes} reached at step {step}/{total}: saved {out / 'final'} "
                       f"(resumable with --resume auto)")
            break
        if args.save_every and step % args.save_every == 0 and step < total:
            save(f"step_{step}", step)
    else:
        save("final", step)
        dist.print(f"done: {step} steps, {tokens_seen} tokens, {elapsed0 + time.time() - t_start:.0f} s -> "
                   f"{out / 'final'}" + (f" (encode cache: {len(encoded.pieces)} samples, {encoded.nbytes / 2 ** 20:.0f} "
                                        f"MiB, {encoded.hits} of {encoded.hits + encoded.misses} read back)"
                                        if encoded else ""))
    bar.close()
    distributed.teardown(exit_process=True)


if __name__ == "__main__":
    main()
