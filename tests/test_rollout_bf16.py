"""bf16 on CPU, where the GPU path's numerics can be checked without a GPU: rollout vs HF generate (greedy,
many prompts), rollout vs teacher-forced log-probs (the lp_gap TAPO logs), one bf16 training step vs fp32.
Run with -s to see the measured rates and gaps (README "Benchmarks" quotes them)."""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollout  # noqa: E402
import rollout_worker as W  # noqa: E402
from conftest import padded_batch, random_image  # noqa: E402
from data import encode_prompts  # noqa: E402
from policy import load_policy, token_logprobs, vision_token_ids  # noqa: E402

N_PROMPTS, NEW = 16, 16


@pytest.fixture(scope="module")
def models():
    """The sharp test model (rollout_worker.sharp_tiny) in fp32 and a bf16 copy."""
    m32, proc = W.sharp_tiny()
    return m32.eval(), copy.deepcopy(m32).to(torch.bfloat16), proc


def prompts(proc, dtype):
    q = W.QUESTIONS
    b = encode_prompts(proc, [random_image(112 if i % 2 else 84, 112, seed=100 + i) for i in range(N_PROMPTS)],
                       [q[i % len(q)] for i in range(N_PROMPTS)])
    b["pixel_values"] = b["pixel_values"].to(dtype)
    return b


def scored(model, batch, tokens):
    """Teacher-forced log-probs (R, L) of fixed response tokens (no stop token, all L scored)."""
    R, L = tokens.shape
    ro = rollout.Rollout(tokens=tokens, logprobs=torch.zeros(R, L), mask=torch.ones(R, L, dtype=torch.bool),
                         lengths=torch.full((R,), L), finish=["length"] * R, prompt_index=torch.arange(R))
    tb = rollout.to_train_batch(batch, ro)
    with torch.no_grad():
        return token_logprobs(model, tb)[:, tb["prompt_len"]:]


def test_bf16_greedy_disagrees_with_hf_only_at_near_ties(models):
    """bf16 greedy rollouts equal HF generate's in bf16 up to near-ties: wherever a row first differs, the
    two tokens' fp32 log-probs are within 0.1 nats (bf16 rounding, not a wrong cache or position)."""
    m32, m16, proc = models
    sup, pad = vision_token_ids(proc.tokenizer), proc.tokenizer.pad_token_id
    b16 = prompts(proc, torch.bfloat16)
    hf = m16.generate(**b16, max_new_tokens=NEW, do_sample=False, eos_token_id=[], pad_token_id=pad,
                      suppress_tokens=sup)[:, b16["input_ids"].shape[1]:]
    ours = rollout.generate(m16, b16, n=1, max_new_tokens=NEW, greedy=True, pad_id=pad, suppress_ids=sup).tokens
    eq = ours == hf
    first = torch.where(eq.all(1), NEW, (~eq).float().argmax(1))                         # (R,) first mismatch
    rows = (~eq.all(1)).nonzero().squeeze(1)
    alt = hf.clone()
    alt[rows, first[rows]] = ours[rows, first[rows]]  # HF's prefix, then our token at the first mismatch
    b32 = prompts(proc, torch.float32)
    margin = (scored(m32, b32, hf) - scored(m32, b32, alt))[rows, first[rows]]
    print(f"\nbf16 greedy, {N_PROMPTS} prompts x {NEW} tokens: rows identical to HF generate "
          f"{float(eq.all(1).float().mean()):.3f}, tokens before the first mismatch {float(first.float().mean()) / NEW:.3f}, "
          f"fp32 margin at the mismatches {[round(float(m), 4) for m in margin]}")
    assert eq.all(1).float().mean() >= 0.25  # the std-0.1 random model is chaotic in bf16 (HF bf16 vs fp32: ~0.35)
    assert margin.abs().max() < 0.1 if len(rows) else True


def test_bf16_lp_gap(models):
    """bf16 rollout log-probs vs a bf16 teacher-forced forward (TAPO's lp_gap): max < 0.15, mean < 0.03 nats,
    and no larger than bf16's own error (teacher-forced bf16 vs fp32) times 2."""
    m32, m16, proc = models
    sup, pad = vision_token_ids(proc.tokenizer), proc.tokenizer.pad_token_id
    b16 = prompts(proc, torch.bfloat16)
    ro = rollout.generate(m16, b16, n=2, max_new_tokens=NEW, temperature=1.0, seeds=3, pad_id=pad, suppress_ids=sup)
    tb = rollout.to_train_batch(b16, ro)
    with torch.no_grad():
        tf16 = token_logprobs(m16, tb)[:, tb["prompt_len"]:][ro.mask]
        tb32 = dict(tb, pixel_values=tb["pixel_values"].float())
        tf32 = token_logprobs(m32, tb32)[:, tb["prompt_len"]:][ro.mask]
    gap, own = (ro.logprobs[ro.mask] - tf16).abs(), (tf16 - tf32).abs()
    ours32 = (ro.logprobs[ro.mask] - tf32).abs()
    print(f"\nbf16 lp_gap (rollout vs teacher-forced, both bf16) max {float(gap.max()):.4f} mean {float(gap.mean()):.4f}; "
          f"rollout bf16 vs fp32 max {float(ours32.max()):.4f} mean {float(ours32.mean()):.4f}; "
          f"teacher-forced bf16 vs fp32 max {float(own.max()):.4f} mean {float(own.mean()):.4f} "
          f"({int(ro.mask.sum())} tokens)")
    assert gap.max() < 0.15 and gap.mean() < 0.03
    assert gap.mean() <= 2 * own.mean()


def test_bf16_training_step_close_to_fp32():
    """One bf16-compute training step (FSDP2's MixedPrecisionPolicy: bf16 forward / backward, fp32 grads and
    AdamW on fp32 master weights) is within tolerance of fp32: loss rel. 1e-2, grad cosine > 0.99, the
    parameter update's relative error < 0.25 (AdamW's first step is ~lr * sign(g): small grads may flip)."""
    model, proc = load_policy("tiny")
    batch = padded_batch(proc)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    results = []
    for m, pix in ((model, batch["pixel_values"]), (m16, batch["pixel_values"].to(torch.bfloat16))):
        lp = token_logprobs(m, dict(batch, pixel_values=pix))
        loss = -(lp * batch["response_mask"]).sum() / batch["response_mask"].sum()  # token-level mean NLL
        loss.backward()
        g = torch.cat([p.grad.float().flatten() for p in m.parameters()])
        results.append((float(loss.detach()), g))
    (l32, g32), (l16, g16) = results
    cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    deltas = []
    for g in (g32, g16):  # the same fp32 master weights, one AdamW step with each gradient
        w = torch.cat([p.detach().flatten() for p in model.parameters()]).clone().requires_grad_()
        opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=1e-2)
        w.grad = g.clone()
        w0 = w.detach().clone()
        opt.step()
        deltas.append(w.detach() - w0)
    upd = float((deltas[1] - deltas[0]).norm() / deltas[0].norm())
    print(f"\nbf16 vs fp32 training step: loss {l16:.5f} vs {l32:.5f} (rel {abs(l16 - l32) / l32:.2e}), grad cosine "
          f"{cos:.5f}, grad rel. error {float((g16 - g32).norm() / g32.norm()):.3e}, AdamW update rel. error {upd:.3e}")
    assert abs(l16 - l32) / l32 < 1e-2
    assert cos > 0.99
    assert upd < 0.25
