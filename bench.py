"""Benchmarks that print ratios side by side in one run (this machine is shared and noisy).

    python bench.py logprobs   # peak memory of the naive log-softmax gather vs the chunked head (policy.py)

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

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logprobs", help="peak memory: naive log-softmax gather vs chunked head")
    p.add_argument("--rows", type=int, default=2048, help="response tokens scored (default 2 x 1024)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (Qwen2.5-VL-3B: 2048)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5-VL: 151,936)")
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk (0: policy.default_chunk)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    q = sub.add_parser("_logprobs_variant", help=argparse.SUPPRESS)
    for a in ("--rows", "--hidden", "--vocab", "--chunk"):
        q.add_argument(a, type=int)
    q.add_argument("--variant")
    q.add_argument("--device")
    q.add_argument("--backward", action="store_true")
    args = ap.parse_args()
    {"logprobs": bench_logprobs, "_logprobs_variant": _logprobs_variant}[args.cmd](args)


if __name__ == "__main__":
    main()
