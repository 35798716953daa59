"""Benchmarks that print ratios side by side in one run (this machine is shared and noisy).

    python bench.py logprobs   # peak memory of the naive log-softmax gather vs the chunked head (policy.py)
    python bench.py rollout    # TAPO's rollout workload: rollout.generate vs HF generate, tokens/s and memory
    python bench.py sft        # SFT step tokens/s, 1 process vs 2-rank DDP (padded / packed rows); padding per plan
    python bench.py topp       # top-p filtering per decode step: the top-k prefix vs one full sort per row
    python bench.py collectives  # collectives per decode step on 2 ranks: FSDP2 sharded vs rollout.gathered vs DDP
    python bench.py gpu        # on a GPU, < 8 min: rollout ours vs HF at ~0.5B / 3B shapes, fraction of the
                               # bandwidth limit, bf16 SFT step and TAPO update MFU, peak memory
    python bench.py gpu --device cpu --small   # the same script on CPU with tiny presets (proves it runs)

Each prints its figures and, as its last line, one greppable summary (`logprobs peak_ratio=...`).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch


# ----------------------------------------------------------------------------------------------------------
# collectives: how many torch.distributed calls a rollout's decode steps make (sharded vs gathered vs DDP)

COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "all_gather_object",
               "reduce_scatter_single", "reduce_scatter_tensor", "broadcast", "_broadcast_coalesced", "barrier",
               "all_to_all_single", "reduce")


class CountCollectives:
    """Counts calls of torch.distributed's collectives (patched at module level, where FSDP2, DDP and
    distributed.py look them up) and marks the top-level forward calls of `model`, so that
    `per_forward()` gives the collectives from each forward's start to the next one's (the last: to exit).

        with CountCollectives(model) as c:
            rollout.generate(model, ...)
        c.per_forward()   # [prefill, decode step 1, ...]: a decode step's entry also holds its all_any
    """

    def __init__(self, model=None):
        self.model, self.calls, self.marks = model, [], []

    def __enter__(self):
        import torch.distributed as tdist
        self._saved = {}
        for name in COLLECTIVES:
            fn = getattr(tdist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def counted(*a, _fn=fn, _name=name, **k):
                self.calls.append(_name)
                return _fn(*a, **k)
            setattr(tdist, name, counted)
        if self.model is not None:  # prepend: before FSDP2's own pre-forward (the root's all-gather)
            self._hook = self.model.register_forward_pre_hook(lambda m, a: self.marks.append(len(self.calls)),
                                                              prepend=True)
        return self

    def __exit__(self, *exc):
        import torch.distributed as tdist
        for name, fn in self._saved.items():
            setattr(tdist, name, fn)
        if self.model is not None:
            self._hook.remove()

    def per_forward(self):
        ends = self.marks[1:] + [len(self.calls)]
        return [e - s for s, e in zip(self.marks, ends)]


def bench_collectives(args):
    """2 ranks (gloo, tests/rollout_worker.py): collectives per decode step, FSDP2 sharded vs gathered vs DDP."""
    import statistics
    import tempfile
    out = os.path.join(tempfile.mkdtemp(), "got.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "rollout_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"worker failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    got = torch.load(out)
    print("collectives: tiny preset (2 text layers), FSDP2 / DDP on 2 ranks (gloo); rank 0 decodes 14 tokens, "
          "rank 1 5; counted by patching torch.distributed (bench.CountCollectives)")
    print(f"  {'path':9s} {'rank':>4s} {'forwards':>8s} {'per decode step (median)':>24s} {'whole rollout':>13s}  calls")
    med = {}
    for path in ("sharded", "gathered", "ddp"):
        for rank, g in enumerate(got):
            x = g[path]
            per = statistics.median(x["per_forward"][1:]) if len(x["per_forward"]) > 1 else 0
            med[path] = max(med.get(path, 0), per)
            kinds = {k: x["calls"].count(k) for k in sorted(set(x["calls"]))}
            print(f"  {path:9s} {rank:4d} {len(x['per_forward']):8d} {per:24.0f} {len(x['calls']):13d}  {kinds}")
    print(f"  a DDP-wrapped forward (not used by rollout.generate) makes {got[0]['ddp']['wrapped_forward']}")
    print(f"collectives per_step_sharded={med['sharded']:.0f} per_step_gathered={med['gathered']:.0f} "
          f"per_step_ddp={med['ddp']:.0f} gathered_entry={len(got[0]['gathered']['calls'])}")


# ----------------------------------------------------------------------------------------------------------
# logprobs: naive (B*T, V) float32 log-softmax vs the chunked autograd head, at Qwen2.5-VL-3B's head size

def _status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss():
    """Reset the process's peak RSS (Linux: writing 5 to clear_refs) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _peak_rss():
    return _status_kib("VmHWM")


def _logprobs_variant(args):
    """Child process: allocate inputs, then run one variant; report the peak memory above the inputs."""
    from policy import chunked_logprobs, naive_logprobs
    torch.manual_seed(0)
    dev = torch.device(args.device)
    n, hdim, vocab = args.rows, args.hidden, args.vocab
    h = torch.randn(n, hdim, device=dev).requires_grad_(args.backward)
    w = torch.randn(vocab, hdim, device=dev).mul_(0.02).requires_grad_(args.backward)  # in place: no temporary
    t = torch.randint(0, vocab, (n,), device=dev)
    # the parameter and hidden-state gradients are the same size for both paths and unavoidable: count them
    # as part of the baseline (they are what any training step must hold), not as extra memory.
    grads = (h.numel() + w.numel()) * 4 if args.backward else 0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    t0 = time.time()
    if args.variant == "naive":
        lp = naive_logprobs(h, w, t)
    else:
        lp = chunked_logprobs(h, w, t, chunk=args.chunk)
    if args.backward:
        lp.sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss()
    print(json.dumps({"extra_bytes": max(0, peak - base - grads), "raw_bytes": peak - base,
                      "seconds": time.time() - t0, "lp_sum": float(lp.detach().double().sum())}))


def bench_logprobs(args):
    from policy import default_chunk
    chunk = args.chunk or default_chunk(args.vocab)
    print(f"logprobs: rows {args.rows} (2 x 1024 response tokens), hidden {args.hidden}, vocab {args.vocab}, "
          f"fp32, chunk {chunk} rows, device {args.device}; each variant in a fresh process")
    res = {}
    for backward in (False, True):
        for variant in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "_logprobs_variant", "--variant", variant, "--rows", str(args.rows),
                   "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--chunk", str(chunk),
                   "--device", args.device] + (["--backward"] if backward else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if out.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[(variant, backward)] = r
            print(f"  {'fwd+bwd' if backward else 'fwd    '} {variant:8s} extra peak {r['extra_bytes'] / 2**20:8.0f} MiB"
                  f"  (raw {r['raw_bytes'] / 2**20:8.0f} MiB)  {r['seconds']:6.1f} s  sum(lp) {r['lp_sum']:.4f}")
    agree = abs(res[("naive", False)]["lp_sum"] - res[("chunked", False)]["lp_sum"])
    ratios = {b: res[("naive", b)]["extra_bytes"] / max(1, res[("chunked", b)]["extra_bytes"]) for b in (False, True)}
    print(f"  |sum(lp) naive - chunked| = {agree:.2e}")
    print(f"logprobs peak_ratio={min(ratios.values()):.1f} fwd_ratio={ratios[False]:.1f} "
          f"fwdbwd_ratio={ratios[True]:.1f} chunk={chunk} vocab={args.vocab} rows={args.rows}")


# ----------------------------------------------------------------------------------------------------------
# rollout: rollout.generate vs HF generate(num_return_sequences=n) on TAPO's workload, alternating in one run

def _big_config(tokenizer, vocab=32768):
    """A ~0.8B random Qwen2.5-VL: Qwen2.5-1.5B's text widths at 12 layers, an 8-block 1280-wide vision tower,
    the vocabulary padded to 32k (ids above the tokenizer's are never decoded, only sampled)."""
    from transformers import Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=max(vocab, len(tokenizer)), hidden_size=1536, intermediate_size=8960, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=1536,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[3, 7], in_channels=3, tokens_per_second=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)


def _rollout_inputs(args, processor):
    """args.prompts RL prompts x (anchor, positive) images of image_size^2: 2 * prompts prompt rows."""
    import numpy as np
    from PIL import Image
    from data import encode_prompts, rl_prompt
    rng = np.random.default_rng(0)
    s = args.image_size
    images, texts = [], []
    questions = ["What species of bird is this?", "What model of aircraft is this?", "What kind of flower is this?",
                 "What breed of dog is this?"]
    for i in range(args.prompts):
        anchor = rng.random((s, s, 3)) * 255
        positive = np.clip(anchor + rng.normal(0, 20, anchor.shape), 0, 255)  # same class, another view
        for im in (anchor, positive):
            images.append(Image.fromarray(im.astype("uint8")))
            texts.append(rl_prompt("<image> Based on this image, " + questions[i % 4].lower()))
    return encode_prompts(processor, images, texts)


def bench_rollout(args):
    import statistics
    import rollout
    from policy import count_params, load_policy
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, processor = load_policy(args.preset)
    if args.config == "big":
        from transformers import Qwen2_5_VLForConditionalGeneration
        with torch.device(dev):
            model = Qwen2_5_VLForConditionalGeneration(_big_config(processor.tokenizer))
    model = model.to(device=dev, dtype=dtype).eval()
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in _rollout_inputs(args, processor).items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    pad = processor.tokenizer.pad_token_id
    B, P = batch["input_ids"].shape
    n_tok = B * args.n * args.new_tokens
    vis = int((batch["mm_token_type_ids"] == 1).sum()) // B
    print(f"rollout: {args.preset if args.config == 'preset' else 'big'} model ({count_params(model) / 1e6:.1f}M "
          f"params, {args.dtype}, {dev}), {args.prompts} prompts x (anchor + positive) x {args.n} samples, "
          f"{args.image_size}x{args.image_size} images ({vis} visual tokens), prompt width {P}, "
          f"{args.new_tokens} new tokens, temperature 1, EOS disabled; {args.rounds} rounds alternating"
          + (f"; {torch.get_num_threads()} CPU thread(s)" if dev.type == "cpu" else ""))

    def ours(r):
        ro = rollout.generate(model, batch, n=args.n, max_new_tokens=args.new_tokens, temperature=1.0,
                              stop_ids=(), pad_id=pad, seeds=r)
        return int(ro.mask.sum())

    def hf(r):
        torch.manual_seed(r)
        out = model.generate(**batch, do_sample=True, num_return_sequences=args.n, max_new_tokens=args.new_tokens,
                             temperature=1.0, top_p=1.0, top_k=0,
                             eos_token_id=[], pad_token_id=pad)
        return int(out[:, P:].numel())

    res = {"ours": [], "hf": []}
    peak = {"ours": 0, "hf": 0}
    for r in range(args.rounds):
        for name, fn in (("ours", ours), ("hf", hf)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                _reset_peak_rss()
            t0 = time.perf_counter()
            got = fn(r)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            mem = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _peak_rss()
            assert got == n_tok, f"{name} generated {got} tokens, expected {n_tok}"
            res[name].append(n_tok / dt)
            peak[name] = max(peak[name], mem)
            print(f"  round {r} {name:4s} {dt:7.2f} s  {n_tok / dt:8.1f} tok/s  peak {mem / 2**20:8.0f} MiB")
    tok_s = {k: statistics.median(v) for k, v in res.items()}
    what = "max_memory_allocated" if dev.type == "cuda" else "peak RSS"
    print(f"  median: ours {tok_s['ours']:.1f} tok/s, HF {tok_s['hf']:.1f} tok/s; {what} ours "
          f"{peak['ours'] / 2**20:.0f} MiB, HF {peak['hf'] / 2**20:.0f} MiB")
    print(f"rollout speedup={tok_s['ours'] / tok_s['hf']:.2f} ours_tok_s={tok_s['ours']:.1f} "
          f"hf_tok_s={tok_s['hf']:.1f} ours_peak_mib={peak['ours'] / 2**20:.0f} hf_peak_mib={peak['hf'] / 2**20:.0f} "
          f"device={dev.type} dtype={args.dtype} config={args.config if args.config == 'big' else args.preset} "
          f"rows={B}x{args.n} new_tokens={args.new_tokens}")


# ----------------------------------------------------------------------------------------------------------
# sft: tokens/s of an SFT step (small preset), 1 process vs 2-rank DDP; padding with / without length grouping;
# on CUDA, MFU of a bf16 FSDP2 step of a Qwen2.5-VL-3B-shaped random model

def _sft_world(path):
    """The embedded world at `path`, or the default world generated into a temporary folder (a few seconds)."""
    from pathlib import Path
    if (Path(path) / "world.json").exists():
        return Path(path)
    import tempfile
    import world
    return world.generate(Path(tempfile.mkdtemp()) / "world", seed=0, workers=1)


def _sft_step(args):
    """Child, single process or torchrun: median time of an SFT step on the world's CoT rationales."""
    import statistics
    from pathlib import Path
    import distributed
    import supervised
    from policy import load_policy
    dist = distributed.setup("cpu")
    model, processor = load_policy(args.preset, seed=0)
    samples = supervised.load_mixture(str(Path(args.world) / f"{args.source}.json"))
    prompt_lens, resp_ids, _ = supervised.tokenize(samples, processor, None, 4096)
    keys = supervised.grouping_keys(prompt_lens, resp_ids)
    model = distributed.wrap(model, "ddp" if dist.world > 1 else "none", dist)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # the CoT file's first samples (near-equal lengths); a seeded draw of the pretraining mix (captions, attribute
    # answers, knowledge texts: lengths 39-236 tokens, what the world's base trains on)
    batch = (list(range(min(args.batch, len(samples)))) if args.source == "cot_sft"
             else supervised.epoch_batches(keys, args.batch, 0, 0, group=False)[0])
    n_step = sum(len(resp_ids[i]) for i in batch)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        mbs, _ = supervised.step_micro_batches(model, processor, samples, prompt_lens, resp_ids, keys, batch,
                                               args.micro, dist.rank, dist.world, pack=args.pack, device=dist.device,
                                               need_image=dist.world > 1)
        supervised.forward_backward(model, mbs, n_step, dist.world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        distributed.all_sum(0.0)  # collective: the step ends when the slowest rank is done
        times.append(time.perf_counter() - t0)
    real = sum(prompt_lens[i] + len(resp_ids[i]) for i in batch)
    if dist.master:
        print(json.dumps({"tok_s": real / statistics.median(times[1:]), "step_s": statistics.median(times[1:]),
                          "tokens": real, "samples": len(batch)}))
    distributed.teardown()


def _qwen3b_config(tokenizer):
    """Qwen2.5-VL-3B-Instruct's shapes (text 2048 x 36 layers, vocab 151,936; vision 1280 x 32 blocks)."""
    from transformers import Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)


def _train_flops(model, batch):
    """Model FLOPs of one training step (forward + backward = 3 x forward; recomputation not counted):
    text 6 N T + 12 L d S T (PaLM's attention term, S = sequence width), the LM head only on scored tokens
    (the chunked head), vision 6 N_vis P + 12 L_vis d_vis W P (W: 64-patch windows, full attention blocks)."""
    from distributed import unwrap
    hf = unwrap(model)
    tc, vc = hf.config.text_config, hf.config.vision_config
    n_text = sum(p.numel() for p in hf.model.language_model.layers.parameters())
    n_vis = sum(p.numel() for p in hf.model.visual.parameters())
    B, S = batch["input_ids"].shape
    tokens = int(batch["attention_mask"].sum())
    scored = int(batch["response_mask"].sum())
    patches = int(batch["pixel_values"].shape[0]) if batch.get("pixel_values") is not None else 0
    per_img = patches // max(1, len(batch.get("image_grid_thw", [])))
    win = (vc.window_size // vc.patch_size) ** 2
    n_full = len(vc.fullatt_block_indexes)
    vis_attn = 12 * vc.hidden_size * patches * ((vc.depth - n_full) * win + n_full * per_img)
    return (6 * n_text * tokens + 12 * tc.num_hidden_layers * tc.hidden_size * S * tokens
            + 6 * tc.vocab_size * tc.hidden_size * scored + 6 * n_vis * patches + vis_attn)


def _sft_mfu(args):
    """Child under torchrun: bf16 FSDP2 SFT steps of a random Qwen2.5-VL-3B-shaped model; prints MFU."""
    import contextlib
    import statistics
    import numpy as np
    from PIL import Image
    import distributed
    import supervised
    import training
    from data import encode_pairs
    from policy import load_policy
    from transformers import Qwen2_5_VLForConditionalGeneration
    dist = distributed.setup()
    if not torch.distributed.is_initialized():  # FSDP2 needs a process group even at world size 1
        torch.distributed.init_process_group("nccl" if dist.device.type == "cuda" else "gloo")
    model, processor = load_policy("small")
    if args.shape == "3b":
        with torch.device(dist.device):
            model = Qwen2_5_VLForConditionalGeneration(_qwen3b_config(processor.tokenizer))
    if args.grad_checkpointing:
        distributed.set_gradient_checkpointing(model, True)
    model = distributed.wrap(model, "fsdp", dist)  # bf16 params / fp32 reduce on CUDA
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dist.device.type == "cuda")
    rng = np.random.default_rng(dist.rank)
    images = [Image.fromarray((rng.random((args.image_size, args.image_size, 3)) * 255).astype("uint8"))
              for _ in range(args.micro)]
    responses = [" ".join(rng.choice(["red", "head", "wings", "tipped", "blue", "the", "bird"], args.response_words))
                 for _ in range(args.micro)]
    batch = encode_pairs(processor, images, ["What species of bird is this?"] * args.micro, responses)
    batch = {k: v.to(dist.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    n_step = int(distributed.all_sum(float(batch["response_mask"].sum())))
    flops = distributed.all_sum(float(_train_flops(model, batch)))  # collective: the step's FLOPs, all ranks
    cuda = dist.device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None
    times = []
    for _ in range(args.steps + 2):  # two warm-up steps
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        supervised.forward_backward(model, [(batch, 1.0)], n_step, dist.world, autocast or contextlib.nullcontext)
        training.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[2:])
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = 989.4e12 if ("H100" in name or "H200" in name) else 312e12 if "A100" in name else None
    if dist.master:
        print(json.dumps({"device": name, "world": dist.world, "params": sum(p.numel() for p in model.parameters()),
                          "seq": int(batch["input_ids"].shape[1]), "micro": args.micro, "step_s": dt,
                          "tflops_per_gpu": flops / dt / dist.world / 1e12,
                          "mfu": flops / dt / dist.world / peak if peak else None,
                          "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))
    distributed.teardown()


def _torchrun(nproc, args, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # --standalone: the rendezvous store binds a port the OS picks (no fixed port to collide on)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__] + args
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_sft(args):
    import supervised
    from policy import load_policy
    world = _sft_world(args.world)
    cores = args.threads or os.cpu_count() or 1
    step = ["_sft_step", "--world", str(world), "--preset", args.preset, "--source", "cot_sft", "--batch", str(args.batch),
            "--micro", str(args.micro), "--steps", str(args.steps)]
    print(f"sft: {args.preset} preset, fp32 CPU, global batch {args.batch} CoT samples of {world}, micro-batch "
          f"{args.micro}; 1 process x {cores} threads vs 2-rank DDP (gloo) x {max(1, cores // 2)} threads")
    one = _torchrun(1, step, cores)
    ddp = _torchrun(2, step, max(1, cores // 2))
    ddp_pack = _torchrun(2, step + ["--pack"], max(1, cores // 2))  # sft.py --pack: several samples per row
    mix = [a if a != "cot_sft" else "pretrain" for a in step]  # the base's pretraining mix, padded vs packed
    mix_pad, mix_pack = _torchrun(2, mix, max(1, cores // 2)), _torchrun(2, mix + ["--pack"], max(1, cores // 2))
    for name, r in (("1 process", one), ("DDP x 2", ddp), ("DDP x 2, packed rows", ddp_pack),
                    ("pretrain mix, DDP x 2", mix_pad), ("  the same, packed rows", mix_pack)):
        print(f"  {name:24s} {r['step_s']:6.3f} s/step  {r['tok_s']:8.0f} tok/s  ({r['tokens']} tokens/step)")

    # padding: one epoch plan (3 epochs) of the pretraining + CoT mixture, micro-batches of --micro
    _, processor = load_policy(args.preset)
    samples = supervised.load_mixture(f"{world / 'pretrain.json'},{world / 'cot_sft.json'}")
    prompt_lens, resp_ids, _ = supervised.tokenize(samples, processor, None, 4096)
    pad = {}
    keys = supervised.grouping_keys(prompt_lens, resp_ids)
    lengths = [p + len(r) for p, r in zip(prompt_lens, resp_ids)]
    real = padded = 0
    for epoch in range(3):
        for b in supervised.epoch_batches(keys, 32, 0, epoch, False):
            for mb in supervised.packed_micro_batches(b, lengths, args.micro, 1)[0][0]:
                r, q = supervised.packed_cost(mb, lengths)
                real, padded = real + r, padded + q
    pad["packed"] = 1 - real / padded
    hf_keys = [p + len(r) for p, r in zip(prompt_lens, resp_ids)]  # HF's key: total length
    for name, k, group_batches, group_micro in (("grouped", keys, False, True), ("global", keys, True, True),
                                                ("global_hf_key", hf_keys, True, True), ("random", keys, False, False)):
        real = padded = 0
        for epoch in range(3):
            for b in supervised.epoch_batches(k, 32, 0, epoch, group_batches):
                for mb in supervised.rank_micro_batches(b, k, args.micro, 1, group_micro)[0]:
                    r, p = supervised.micro_batch_cost(mb, prompt_lens, resp_ids)
                    real, padded = real + r, padded + p
        pad[name] = 1 - real / padded
    print(f"  padding, {len(samples)} pretrain + CoT samples, 3 epochs, batch 32, micro-batch {args.micro}: grouped "
          f"within batches (sft.py default) {pad['grouped']:.3f}, random {pad['random']:.3f}; whole batches grouped "
          f"too (--length-grouping global) {pad['global']:.3f}, the same by total length (HF) {pad['global_hf_key']:.3f}; "
          f"packed rows (--pack) {pad['packed']:.3f}")

    mfu = "n/a"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        r = _torchrun(n, ["_sft_mfu", "--shape", "3b", "--micro", str(args.mfu_micro), "--steps", "5"]
                      + (["--grad-checkpointing"] if args.grad_checkpointing else []), 8)
        print(f"  bf16 FSDP2 x {n} {r['device']}: 3B-shaped ({r['params'] / 1e9:.2f}B params), micro-batch "
              f"{r['micro']} x {r['seq']} tokens, {r['step_s']:.3f} s/step, {r['tflops_per_gpu']:.0f} TFLOP/s per GPU, "
              f"MFU {r['mfu']}, max memory {r['max_mem_gib']:.1f} GiB")
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else f"{r['tflops_per_gpu']:.0f}TFLOPs"
    print(f"sft tok_s_1={one['tok_s']:.0f} tok_s_ddp2={ddp['tok_s']:.0f} ddp2_speedup={ddp['tok_s'] / one['tok_s']:.2f} "
          f"pack_speedup_ddp2={ddp_pack['tok_s'] / ddp['tok_s']:.2f} "
          f"pack_speedup_pretrain_ddp2={mix_pack['tok_s'] / mix_pad['tok_s']:.2f} pad_packed={pad['packed']:.3f} "
          f"pad_grouped={pad['grouped']:.3f} pad_random={pad['random']:.3f} pad_global={pad['global']:.3f} "
          f"mfu_3b_fsdp_bf16={mfu}")


# ----------------------------------------------------------------------------------------------------------
# gpu: one command for a GPU machine: rollout ours vs HF, fraction of the bandwidth limit, SFT / TAPO MFU

# bf16 dense peak FLOP/s and HBM bandwidth (bytes/s) by device-name fragment (vendor data sheets, SXM parts)
GPUS = {"H200": (989.4e12, 4.8e12), "H100": (989.4e12, 3.35e12), "A100": (312e12, 2.039e12),
        "L40S": (362e12, 0.864e12), "A10": (125e12, 0.6e12)}


def _half_b_config(tokenizer):
    """A ~0.5B random Qwen2.5-VL: Qwen2.5-0.5B's text widths (896 x 24 layers, 14 heads, 2 KV heads, vocab
    151,936, tied head) and a 4-block 1280-wide vision tower (Qwen2.5-VL's blocks, fewer of them)."""
    from transformers import Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [8, 12, 12]},  # head_dim 64
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=896,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[3], in_channels=3, tokens_per_second=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)


def _copy_bandwidth(dev):
    """Measured copy bandwidth (bytes read + written per second) of a 256 MiB tensor: the CPU's stand-in for
    the HBM figure."""
    x = torch.empty(64 * 2**20, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 5 * 2 * x.numel() * 4 / (time.perf_counter() - t0)


def _decode_bytes(model, rows, groups, prompt_len, new_tokens):
    """Bytes one decode step must read at least, averaged over a rollout: the text weights once (the
    embedding table excepted: one row per token; a tied head reads it once) plus the KV cache our sampler
    reads, the prompt part once per prompt (shared prefix) and the generated part per row, at mean length."""
    from distributed import unwrap
    hf = unwrap(model)
    tc = hf.config.text_config
    el = 2  # bf16
    w = sum(p.numel() for p in hf.model.language_model.layers.parameters()) + tc.hidden_size  # + final norm
    w += tc.vocab_size * tc.hidden_size  # the LM head (tied or not, read once per step)
    head_dim = tc.hidden_size // tc.num_attention_heads
    kv_per_tok = tc.num_hidden_layers * 2 * tc.num_key_value_heads * head_dim
    kv = kv_per_tok * (groups * prompt_len + rows * new_tokens / 2)
    return (w + kv) * el


def _gpu_rollout(model, processor, args, dev, shape):
    """Rollout tok/s, ours (inside rollout.gathered, as TAPO runs it) vs HF generate, on TAPO's workload."""
    import statistics
    import rollout
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in _rollout_inputs(args, processor).items()}
    pad = processor.tokenizer.pad_token_id
    B, P = batch["input_ids"].shape
    R, T = B * args.n, args.new_tokens
    cuda = dev.type == "cuda"

    def ours(r):
        ro = rollout.generate(model, batch, n=args.n, max_new_tokens=T, temperature=1.0, stop_ids=(), pad_id=pad,
                              seeds=r)
        return int(ro.mask.sum())

    def hf(r):
        torch.manual_seed(r)
        out = model.generate(**batch, do_sample=True, num_return_sequences=args.n, max_new_tokens=T,
                             temperature=1.0, top_p=1.0, top_k=0, eos_token_id=[], pad_token_id=pad)
        return int(out[:, P:].numel())

    res, peak = {"ours": [], "hf": []}, {"ours": 0, "hf": 0}
    with rollout.gathered(model):  # FSDP2 world 1 here: parameters once in bf16, as in the TAPO loop
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, kernels) and is not counted
            for name, fn in (("ours", ours), ("hf", hf)):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                got = fn(r)
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                assert got == R * T, f"{name} generated {got} tokens, expected {R * T}"
                if r > 0:
                    res[name].append(R * T / dt)
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated() if cuda else 0)
    tok_s = {k: statistics.median(v) for k, v in res.items()}
    step_bytes = _decode_bytes(model, R, B, P, T)
    limit = R * args.bandwidth / step_bytes  # tok/s if every decode step only read its bytes at full bandwidth
    return dict(rows=R, prompt=P, new=T, ours=tok_s["ours"], hf=tok_s["hf"], ms_step=R / tok_s["ours"] * 1e3,
                limit=limit, frac=tok_s["ours"] / limit, step_gb=step_bytes / 1e9,
                peak_ours=peak["ours"] / 2**30, peak_hf=peak["hf"] / 2**30)


def _gpu_train(model, processor, args, dev, kind):
    """Median time, MFU and peak memory of one bf16 FSDP2 training step on a TAPO- or SFT-shaped micro-batch.

    sft: token-level NLL of CoT-length responses. tapo: the update's clipped surrogate (Eq. 3, eps 0.2 / 0.28)
    on rollout-length responses with random advantages, old log-probs from a no-grad forward first (TAPO's
    phase 4; its FLOPs are counted, 2 N per token). Both: chunked head, grad clip, AdamW.
    """
    import statistics
    import numpy as np
    from PIL import Image
    from data import encode_pairs
    from policy import token_logprobs
    cuda = dev.type == "cuda"
    rng = np.random.default_rng(0)
    words = args.sft_words if kind == "sft" else args.tapo_words
    images = [Image.fromarray((rng.random((args.image_size, args.image_size, 3)) * 255).astype("uint8"))
              for _ in range(args.micro)]
    responses = [" ".join(rng.choice(["red", "head", "wings", "tipped", "blue", "the", "bird"], words))
                 for _ in range(args.micro)]
    batch = encode_pairs(processor, images, ["What species of bird is this?"] * args.micro, responses)
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    mask = batch["response_mask"]
    n_tok = mask.sum()
    flops = _train_flops(model, batch)
    if kind == "tapo":
        flops += flops // 3  # + the old log-probs' no-grad forward (1/3 of forward + backward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)  # as tapo.py / sft.py: the default (foreach) AdamW
    import contextlib  # sft.py adds bf16 autocast on CUDA; tapo.py relies on FSDP2's param_dtype alone
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and kind == "sft" else contextlib.nullcontext
    model.train()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.train_steps + 1):  # the first step warms up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast():
            if kind == "sft":
                loss = -(token_logprobs(model, batch) * mask).sum() / n_tok
            else:
                with torch.no_grad():
                    old = token_logprobs(model, batch)
                adv = torch.randn(args.micro, 1, device=dev)
                ratio = torch.exp(token_logprobs(model, batch) - old)
                pg = -torch.minimum(ratio * adv, ratio.clamp(1 - 0.2, 1 + 0.28) * adv)
                loss = (pg * mask).sum() / n_tok
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model.eval()
    del opt
    dt = statistics.median(times[1:])
    return dict(step_s=dt, tflops=flops / dt / 1e12, mfu=flops / dt / args.peak_flops if args.peak_flops else None,
                seq=int(batch["input_ids"].shape[1]), peak=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0)


def bench_gpu(args):
    """Each shape: build a random model, FSDP2-wrap it (world 1, bf16 compute, fp32 master weights: the TAPO
    set-up), then rollout ours vs HF, an SFT step and a TAPO update, side by side."""
    import distributed
    from policy import count_params, load_policy
    from transformers import Qwen2_5_VLForConditionalGeneration
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    if not torch.distributed.is_initialized():  # FSDP2 needs a process group, even of one
        store = torch.distributed.TCPStore("127.0.0.1", 0, 1, True)  # port 0: the OS picks a free one
        torch.distributed.init_process_group("nccl" if cuda else "gloo", store=store, rank=0, world_size=1)
    dist = distributed.Dist(0, 1, 0, dev)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak, bw = next((v for k, v in GPUS.items() if k in name), (None, None))
    args.peak_flops = args.peak_flops or peak
    args.bandwidth = args.bandwidth or bw or _copy_bandwidth(dev)
    _, processor = load_policy("small")  # the tokenizer / image processor of the random shapes
    shapes = ["tiny", "small"] if args.small else ["0.5b", "3b"]
    print(f"gpu: {name}, bandwidth {args.bandwidth / 1e12:.2f} TB/s"
          f"{' (measured copy)' if not bw else ''}, bf16 peak "
          f"{f'{args.peak_flops / 1e12:.0f} TFLOP/s' if args.peak_flops else 'unknown (MFU n/a)'}; FSDP2 world 1, "
          f"bf16 compute, fp32 master; rollout: {args.prompts} prompts x (anchor + positive) x {args.n} samples, "
          f"{args.image_size}px images, {args.new_tokens} new tokens (EOS off), median of {args.rounds} rounds")
    out = {}
    for shape in shapes:
        t0 = time.time()
        if shape in ("tiny", "small"):
            model, processor = load_policy(shape)
        else:
            cfg = _half_b_config(processor.tokenizer) if shape == "0.5b" else _qwen3b_config(processor.tokenizer)
            if shape == "3b" and args.layers_3b:
                cfg.text_config.num_hidden_layers = args.layers_3b
            with torch.device(dev):
                model = Qwen2_5_VLForConditionalGeneration(cfg)
        model = distributed.wrap(model, "fsdp", dist, mixed_precision=True).eval()
        n_params = count_params(model)
        ro = _gpu_rollout(model, processor, args, dev, shape)
        sft = _gpu_train(model, processor, args, dev, "sft")
        tapo = _gpu_train(model, processor, args, dev, "tapo")
        out[shape] = dict(params=n_params, rollout=ro, sft=sft, tapo=tapo, seconds=time.time() - t0)
        del model
        if cuda:
            torch.cuda.empty_cache()

    def mfu(r):
        return f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
    print(f"  {'shape':6s} {'params':>7s} | {'rows':>4s} {'ours tok/s':>10s} {'HF tok/s':>9s} {'x HF':>5s} "
          f"{'ms/step':>7s} {'BW-limit':>9s} {'of limit':>8s} {'GiB ours/HF':>11s} | {'SFT s':>6s} {'TFLOP/s':>7s} "
          f"{'MFU':>5s} {'GiB':>5s} | {'TAPO s':>6s} {'TFLOP/s':>7s} {'MFU':>5s} {'GiB':>5s} | {'s':>4s}")
    for shape, o in out.items():
        r, s, t = o["rollout"], o["sft"], o["tapo"]
        size = f"{o['params'] / 1e9:.2f}B" if o["params"] >= 1e8 else f"{o['params'] / 1e6:.1f}M"
        print(f"  {shape:6s} {size:>7s} | {r['rows']:4d} {r['ours']:10.0f} {r['hf']:9.0f} "
              f"{r['ours'] / r['hf']:5.2f} {r['ms_step']:7.2f} {r['limit']:9.0f} {r['frac']:8.3f} "
              f"{r['peak_ours']:5.1f}/{r['peak_hf']:5.1f} | {s['step_s']:6.3f} {s['tflops']:7.1f} {mfu(s):>5s} "
              f"{s['peak']:5.1f} | {t['step_s']:6.3f} {t['tflops']:7.1f} {mfu(t):>5s} {t['peak']:5.1f} | "
              f"{o['seconds']:4.0f}")
    print(f"  (GiB: CUDA max_memory_allocated, 0 on CPU; rows = prompt rows x n; SFT: {args.micro} x {out[shapes[-1]]['sft']['seq']} tokens, TAPO update: "
          f"{args.micro} x {out[shapes[-1]]['tapo']['seq']} tokens per step, {shapes[-1]}; BW-limit: rows / "
          f"(bytes a decode step must read / bandwidth), bytes {out[shapes[-1]]['rollout']['step_gb']:.2f} GB at {shapes[-1]})")
    a, b = out[shapes[0]], out[shapes[-1]]
    print(f"gpu device={name.replace(' ', '_')} speedup_{shapes[0]}={a['rollout']['ours'] / a['rollout']['hf']:.2f} "
          f"speedup_{shapes[-1]}={b['rollout']['ours'] / b['rollout']['hf']:.2f} "
          f"bw_frac_{shapes[-1]}={b['rollout']['frac']:.3f} sft_mfu_{shapes[-1]}={mfu(b['sft'])} "
          f"tapo_mfu_{shapes[-1]}={mfu(b['tapo'])} peak_gib={max(max(o['rollout']['peak_ours'], o['sft']['peak'], o['tapo']['peak']) for o in out.values()):.1f}")
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# topp: the sampler's top-p filter, by a top-k prefix (rollout.filter_logits) vs one full sort per row

def bench_topp(args):
    """Microseconds per call of the top-p filter on (rows, V) logits, prefix vs full sort, from flat to peaked
    rows (logits ~ N(0, scale^2)); both keep the same tokens (checked here, and tests/test_rollout.py)."""
    import rollout
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    def us(f, z):
        f(z, 0, args.top_p)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            f(z, 0, args.top_p)
        return (time.perf_counter() - t0) / args.calls * 1e6

    print(f"top-p {args.top_p}, {args.rows} rows x {args.vocab} tokens, prefix {rollout.TOP_P_PREFIX}, "
          f"{args.calls} calls each")
    print(f"{'scale':>6} {'rows covered':>13} {'kept/row':>9} {'prefix us':>10} {'sort us':>9} {'ratio':>6}")
    ratios = []
    for scale in args.scales:
        z = torch.randn(args.rows, args.vocab, generator=g) * scale
        assert torch.equal(rollout.filter_logits(z, 0, args.top_p), rollout._filter_sorted(z, 0, args.top_p))
        covered = z.softmax(-1).topk(rollout.TOP_P_PREFIX, dim=-1).values.sum(-1) >= args.top_p
        kept = (rollout.filter_logits(z, 0, args.top_p) > float("-inf")).sum(-1).float().mean()
        a, b = us(rollout.filter_logits, z), us(rollout._filter_sorted, z)
        ratios.append(a / b)
        print(f"{scale:>6g} {covered.float().mean():>13.2f} {kept:>9.1f} {a:>10.0f} {b:>9.0f} {a / b:>6.2f}")
    print("topp time_ratio_prefix_vs_sort=" + ",".join(f"{r:.2f}" for r in ratios))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logprobs", help="peak memory: naive log-softmax gather vs chunked head")
    p.add_argument("--rows", type=int, default=2048, help="response tokens scored (default 2 x 1024)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (Qwen2.5-VL-3B: 2048)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5-VL: 151,936)")
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk (0: policy.default_chunk)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    r = sub.add_parser("rollout", help="TAPO rollout workload: rollout.generate vs HF generate")
    r.add_argument("--preset", default="small", help="policy preset (tokenizer, processor and, by default, model)")
    r.add_argument("--config", default="preset", choices=["preset", "big"],
                   help="preset: the preset's model; big: a ~0.8B random Qwen2.5-VL (for a GPU)")
    r.add_argument("--prompts", type=int, default=4, help="prompts, each with an anchor and a positive image")
    r.add_argument("--n", type=int, default=5, help="samples per (prompt, image) (paper: n1 = n2 = 5)")
    r.add_argument("--new-tokens", type=int, default=128, help="new tokens per sample (EOS disabled)")
    r.add_argument("--image-size", type=int, default=448, help="square image side (448: 256 visual tokens)")
    r.add_argument("--rounds", type=int, default=3, help="alternating ours / HF rounds; the median is reported")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    r.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    r.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads for both sides (default 1: on a shared, oversubscribed machine "
                        "multithreaded small ops spin-wait and the timings become noise)")
    s = sub.add_parser("sft", help="SFT step: tokens/s 1 process vs 2-rank DDP, padding, MFU on CUDA")
    s.add_argument("--preset", default="small", help="policy preset trained on CPU")
    s.add_argument("--world", default="out/world", help="embedded world folder (generated in a temp dir if absent)")
    s.add_argument("--batch", type=int, default=16, help="global batch (CoT samples) per step")
    s.add_argument("--micro", type=int, default=8, help="micro-batch per rank (8: a realistic CPU micro-batch)")
    s.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up); the median is reported")
    s.add_argument("--threads", type=int, default=0, help="CPU threads in all (default: all cores)")
    s.add_argument("--mfu-micro", type=int, default=4, help="CUDA: micro-batch of the 3B-shaped FSDP2 step")
    s.add_argument("--grad-checkpointing", action="store_true", help="CUDA: activation checkpointing in the MFU step")
    t = sub.add_parser("_sft_step", help=argparse.SUPPRESS)
    for a in ("--world", "--preset"):
        t.add_argument(a)
    t.add_argument("--source", default="cot_sft", choices=["cot_sft", "pretrain"])
    for a in ("--batch", "--micro", "--steps"):
        t.add_argument(a, type=int)
    t.add_argument("--pack", action="store_true")
    m = sub.add_parser("_sft_mfu", help=argparse.SUPPRESS)
    m.add_argument("--shape", default="3b", choices=["3b", "small"])
    m.add_argument("--micro", type=int, default=4)
    m.add_argument("--steps", type=int, default=5)
    m.add_argument("--image-size", type=int, default=448)
    m.add_argument("--response-words", type=int, default=600)
    m.add_argument("--grad-checkpointing", action="store_true")
    tp = sub.add_parser("topp", help="top-p filter per decode step: top-k prefix vs full sort, flat to peaked rows")
    tp.add_argument("--rows", type=int, default=160, help="rows per decode step (world TAPO, 1 rank: 16 groups x 10)")
    tp.add_argument("--vocab", type=int, default=1024, help="vocabulary (the presets: 1024; Qwen2.5-VL: 151,936)")
    tp.add_argument("--top-p", type=float, default=0.99, help="nucleus mass (release: 0.99)")
    tp.add_argument("--scales", type=float, nargs="+", default=[1, 3, 6, 10],
                    help="std of the random logits, flat (1: the prefix rarely holds top-p) to peaked (10)")
    tp.add_argument("--calls", type=int, default=200, help="timed calls per side and scale")
    tp.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    sub.add_parser("collectives", help="collectives per decode step on 2 ranks: sharded vs gathered vs DDP")
    g = sub.add_parser("gpu", help="GPU: rollout ours vs HF at ~0.5B and 3B shapes, bandwidth fraction, SFT / TAPO MFU")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (or cpu with --small)")
    g.add_argument("--small", action="store_true", help="the tiny and small presets and a tiny workload (CPU check)")
    g.add_argument("--prompts", type=int, default=16, help="prompts, each with an anchor and a positive image")
    g.add_argument("--n", type=int, default=5, help="samples per (prompt, image) (paper: n1 = n2 = 5)")
    g.add_argument("--new-tokens", type=int, default=256, help="new tokens per sample (EOS disabled)")
    g.add_argument("--image-size", type=int, default=448, help="square image side (448: 256 visual tokens)")
    g.add_argument("--rounds", type=int, default=2, help="timed rounds after one warm-up; the median is reported")
    g.add_argument("--micro", type=int, default=4, help="rows per training micro-batch (SFT step, TAPO update)")
    g.add_argument("--sft-words", type=int, default=600, help="response words of the SFT micro-batch (CoT length)")
    g.add_argument("--tapo-words", type=int, default=1000, help="response words of the TAPO micro-batch (rollouts)")
    g.add_argument("--train-steps", type=int, default=3, help="timed training steps after one warm-up")
    g.add_argument("--layers-3b", type=int, default=0, help="text layers of the 3B shape (0: all 36)")
    g.add_argument("--bandwidth", type=float, default=0, help="memory bandwidth, bytes/s (default: by GPU name)")
    g.add_argument("--peak-flops", type=float, default=0, help="bf16 dense peak, FLOP/s (default: by GPU name)")
    g.add_argument("--threads", type=int, default=2, help="CPU threads (cpu only)")
    q = sub.add_parser("_logprobs_variant", help=argparse.SUPPRESS)
    for a in ("--rows", "--hidden", "--vocab", "--chunk"):
        q.add_argument(a, type=int)
    q.add_argument("--variant")
    q.add_argument("--device")
    q.add_argument("--backward", action="store_true")
    args = ap.parse_args()
    if args.cmd == "rollout" and args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.cmd == "gpu" and args.small:  # a workload that runs in about a minute on 2 CPU cores
        args.prompts, args.new_tokens, args.image_size, args.rounds = 1, 8, 112, 1
        args.micro, args.sft_words, args.tapo_words, args.train_steps = 2, 20, 30, 1
    {"gpu": bench_gpu, "collectives": bench_collectives, "topp": bench_topp, "logprobs": bench_logprobs, "rollout": bench_rollout, "_logprobs_variant": _logprobs_variant,
     "sft": bench_sft, "_sft_step": _sft_step, "_sft_mfu": _sft_mfu}[args.cmd](args)


if __name__ == "__main__":
    main()
