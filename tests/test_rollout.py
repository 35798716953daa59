"""The KV-cached sampler (rollout.py) against its oracles: HF generate (greedy), one teacher-forced forward
(log-probs), HF's logits warpers (filtering) and itself (seeds); 2-rank runs: test_rollout_fsdp.py."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollout  # noqa: E402
import rollout_worker as W  # noqa: E402
from policy import token_logprobs  # noqa: E402


@pytest.fixture(scope="module")
def sharp():
    return W.sharp_tiny()


@pytest.fixture(scope="module")
def batch(sharp):
    """Left-padded prompts, images of three sizes (16, 20 and 12 visual tokens)."""
    return W.prompts(sharp[1], [0, 1, 2])


def hf_greedy(model, batch, max_new, stop_ids, pad):
    out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, eos_token_id=list(stop_ids),
                         pad_token_id=pad)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_greedy_equals_hf_generate(sharp, batch, impl):
    """Greedy tokens equal HF generate's exactly; rows stop at different steps (left padding, 3 image sizes),
    with the model's prefill attention in either kernel convention (sdpa: bool mask, eager: additive)."""
    model, proc = sharp if impl == "sdpa" else W.sharp_tiny()
    model.set_attn_implementation(impl)
    pad = proc.tokenizer.pad_token_id
    free = hf_greedy(model, batch, 16, [], pad)
    assert len(set(free[0].tolist())) > 4, "the test model must not repeat one token"
    stop_ids = [int(free[0, 4]), int(free[1, 9])]  # row 0 stops by step 5, row 1 by step 10 (or earlier)
    ref = hf_greedy(model, batch, 16, stop_ids, pad)
    ro = rollout.generate(model, batch, n=1, max_new_tokens=16, greedy=True, stop_ids=stop_ids, pad_id=pad)
    assert ro.tokens.shape == ref.shape
    assert torch.equal(ro.tokens, ref)
    assert len(set(ro.lengths.tolist())) >= 2, ro.lengths
    for r in range(3):
        L = int(ro.lengths[r])
        assert ro.mask[r].sum() == L and ro.mask[r, :L].all()
        assert ro.finish[r] == ("stop" if int(ro.tokens[r, L - 1]) in stop_ids else "length")
    assert torch.all(ro.logprobs[~ro.mask] == 0)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_hf_generate(sharp, batch, penalty):
    """Greedy tokens with a repetition penalty equal HF generate's (RepetitionPenaltyLogitsProcessor), and
    differ from the unpenalised ones (the penalty takes effect)."""
    model, proc = sharp
    pad = proc.tokenizer.pad_token_id
    ref = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=pad,
                         repetition_penalty=penalty)[:, batch["input_ids"].shape[1]:]
    ro = rollout.generate(model, batch, n=1, max_new_tokens=16, greedy=True, pad_id=pad, repetition_penalty=penalty)
    plain = rollout.generate(model, batch, n=1, max_new_tokens=16, greedy=True, pad_id=pad)
    assert torch.equal(ro.tokens, ref)
    assert not torch.equal(ro.tokens, plain.tokens)


def test_greedy_samples_identical(sharp, batch):
    """Greedy with n > 1: the n rows of a prompt are identical and equal the n = 1 rollout."""
    model, proc = sharp
    one = rollout.generate(model, batch, n=1, max_new_tokens=6, greedy=True)
    three = rollout.generate(model, batch, n=3, max_new_tokens=6, greedy=True)
    assert torch.equal(three.tokens, one.tokens.repeat_interleave(3, 0))
    assert torch.equal(three.prompt_index, torch.arange(9) // 3)


def test_logprobs_equal_teacher_forced(tiny):
    """Sampled log-probs equal one teacher-forced forward (policy.token_logprobs) within 1e-5, fp32, with
    rows stopping at different steps (cache compaction) and top-p / top-k on (log-probs are unfiltered)."""
    # note: the tiny preset as initialised; the std-0.1 test model is ill-conditioned enough that even the
    # teacher-forced fp32 forward is ~8e-6 away from a float64 one.
    model, proc = tiny
    batch = W.prompts(proc, [0, 1, 2])
    T = 0.7
    kw = dict(n=3, max_new_tokens=24, temperature=T, top_p=0.9, top_k=100, pad_id=proc.tokenizer.pad_token_id,
              seeds=7)
    free = rollout.generate(model, batch, **kw)
    # stop on tokens the seeded rows draw at steps 3 and 10 (same seeds, same draws): rows stop at scattered steps
    stop_ids = [int(free.tokens[0, 2]), int(free.tokens[4, 9])]
    ro = rollout.generate(model, batch, stop_ids=stop_ids, **kw)
    assert len(set(ro.lengths.tolist())) >= 3, ro.lengths
    tb = rollout.to_train_batch(batch, ro)
    lp = token_logprobs(model, tb, temperature=T)[:, tb["prompt_len"]:]
    assert torch.equal(tb["response_mask"][:, tb["prompt_len"]:], ro.mask)
    torch.testing.assert_close(lp[ro.mask], ro.logprobs[ro.mask], atol=1e-5, rtol=0)
    assert torch.all(ro.logprobs[ro.mask] < 0) and torch.all(ro.logprobs[~ro.mask] == 0)
    texts = rollout.decode(proc.tokenizer, ro)
    r = ro.finish.index("stop")
    assert texts[r] == proc.tokenizer.decode(ro.tokens[r, :int(ro.lengths[r]) - 1].tolist())


def test_to_train_batch_repeats_images(sharp, batch):
    """to_train_batch repeats each prompt's patch block and grid row n times, in row order."""
    ro = rollout.generate(sharp[0], batch, n=2, max_new_tokens=2)
    tb = rollout.to_train_batch(batch, ro)
    grid, pix = batch["image_grid_thw"], batch["pixel_values"]
    assert torch.equal(tb["image_grid_thw"], grid.repeat_interleave(2, 0))
    blocks = torch.split(pix, grid.prod(-1).tolist())
    assert torch.equal(tb["pixel_values"], torch.cat([b for b in blocks for _ in range(2)]))
    assert torch.equal(tb["input_ids"][:, :batch["input_ids"].shape[1]], batch["input_ids"].repeat_interleave(2, 0))


def test_prefill_once_per_prompt_and_compaction(sharp, batch):
    """Each distinct prompt row is prefilled once (B rows, not B * n), and finished rows leave the batch."""
    model, proc = sharp
    shapes = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        ro = rollout.generate(model, batch, n=5, max_new_tokens=20, stop_ids=list(range(100, 200)), seeds=1)
    finally:
        hook.remove()
    assert shapes[0] == (3, batch["input_ids"].shape[1])  # one prefill of the 3 prompt rows
    assert all(s[1] == 1 for s in shapes[1:])  # then one token per row per step
    assert len(shapes) == int(ro.lengths.max())  # one forward per generated position
    rows = [s[0] for s in shapes[1:]]
    assert rows[0] <= 15 and rows[-1] < rows[0], rows  # compaction shrank the decode batch


def test_filtering_matches_hf_warpers():
    """Temperature, top-k, then top-p keep the same tokens as HF's logits warpers, on random logits."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    for T, k, p in [(1.0, 0, 0.9), (0.7, 10, 1.0), (1.3, 20, 0.8), (0.5, 5, 0.3), (1.0, 3, 0.0)]:
        z = logits / T
        ours = rollout.filter_logits(z, k, p) > float("-inf")
        ref = TemperatureLogitsWarper(T)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(max(p, 1e-9))(None, ref)
        assert torch.equal(ours, ref > float("-inf")), (T, k, p)
        assert ours.sum(1).min() >= 1


def test_top_p_by_prefix_equals_full_sort():
    """Top-p over the TOP_P_PREFIX most likely tokens keeps what one full sort keeps, in a batch that mixes
    peaked rows (the prefix holds top_p) with flat ones (it does not: those rows take the full sort)."""
    from transformers.generation.logits_process import TopPLogitsWarper
    g = torch.Generator().manual_seed(1)
    V = 4 * rollout.TOP_P_PREFIX
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 16.0]).repeat_interleave(8)[:, None]  # flat ... peaked
    z = torch.randn(len(scale), V, generator=g) * scale
    for p in [0.99, 0.9, 0.5, 0.0]:
        ours = rollout.filter_logits(z, 0, p)
        full = rollout._filter_sorted(z, 0, p)
        assert torch.equal(ours, full), p  # kept logits unchanged, removed ones -inf, at the same places
        ref = TopPLogitsWarper(max(p, 1e-9))(None, z.clone()) > float("-inf")
        assert torch.equal(ours > float("-inf"), ref), p
    mass = z.softmax(-1).topk(rollout.TOP_P_PREFIX, dim=-1).values.sum(-1)
    assert (mass < 0.99).any() and (mass >= 0.99).any()  # both paths were taken at top_p 0.99


def test_sampling_follows_filtered_distribution():
    """Inverse-CDF draws over evenly spaced uniforms reproduce softmax(z / T) restricted to the kept set."""
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 0.4, 0.3, 0.15, 0.1, 0.05
    z = probs.log()[None].repeat(4000, 1)
    u = (torch.arange(4000) + 0.5) / 4000

    def freq(T, k, p):
        return torch.bincount(rollout.sample(z / T, u, k, p), minlength=5).float() / 4000

    torch.testing.assert_close(freq(1.0, 0, 1.0), probs, atol=1e-3, rtol=0)
    torch.testing.assert_close(freq(1.0, 2, 1.0), torch.tensor([0, 4, 0, 3, 0]) / 7, atol=1e-3, rtol=0)
    torch.testing.assert_close(freq(1.0, 0, 0.6), torch.tensor([0, 4, 0, 3, 0]) / 7, atol=1e-3, rtol=0)
    torch.testing.assert_close(freq(1.0, 0, 0.75), torch.tensor([0, 40, 0, 30, 15]) / 85, atol=1e-3, rtol=0)
    torch.testing.assert_close(freq(1.0, 0, 0.01), torch.tensor([0., 1, 0, 0, 0]), atol=0, rtol=0)
    t2 = probs ** 0.5 / (probs ** 0.5).sum()  # temperature 2 flattens: p^(1/T), renormalised
    torch.testing.assert_close(freq(2.0, 0, 1.0), t2, atol=1e-3, rtol=0)
    t2k = torch.where(torch.tensor([0, 1, 0, 1, 1]).bool(), t2, 0)
    torch.testing.assert_close(freq(2.0, 3, 1.0), t2k / t2k.sum(), atol=1e-3, rtol=0)


def test_seeded_reproducibility(sharp, batch):
    """Same seeds -> same tokens; a row's tokens depend only on its seed and prompt, not on the other rows."""
    model, proc = sharp
    kw = dict(n=2, max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = rollout.generate(model, batch, seeds=5, **kw)
    b = rollout.generate(model, batch, seeds=5, **kw)
    c = rollout.generate(model, batch, seeds=6, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    # row 3 of the full batch = prompt 1, sample 1, seed 5 * 1_000_003 + 3; replay it alone
    alone = rollout.generate(model, W.prompts(proc, [1]), n=1, max_new_tokens=10, top_p=0.95,
                             seeds=[5 * 1_000_003 + 3])
    assert torch.equal(alone.tokens[0], a.tokens[3])


def test_suppressed_tokens_are_never_sampled(tiny):
    """suppress_ids (the vision placeholders) never appear in sampled or greedy outputs; log-probs stay unfiltered."""
    from conftest import random_image
    from data import encode_prompts
    from policy import vision_token_ids
    from rollout import generate, to_train_batch
    model, proc = tiny
    batch = encode_prompts(proc, [random_image(112, 112, 0)], ["What species of bird is this?"])
    # the three most likely first tokens are suppressed: they must be avoided, whatever the draw
    first = generate(model, batch, n=1, max_new_tokens=1, greedy=True, pad_id=0)
    plain = generate(model, batch, n=8, max_new_tokens=6, temperature=2.0, seeds=3, pad_id=0)
    banned = sorted(set(vision_token_ids(proc.tokenizer)) | set(first.tokens[:, 0].tolist())
                    | set(plain.tokens[:, 0].tolist()))
    for greedy in (True, False):
        ro = generate(model, batch, n=8, max_new_tokens=6, temperature=2.0, greedy=greedy, seeds=3, pad_id=0,
                      suppress_ids=banned)
        assert not torch.isin(ro.tokens[ro.mask], torch.tensor(banned)).any()
        lp = token_logprobs(model, to_train_batch(batch, ro), temperature=1.0 if greedy else 2.0)
        P = lp.shape[1] - ro.tokens.shape[1]
        torch.testing.assert_close(lp[:, P:][ro.mask], ro.logprobs[ro.mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_prompt_logprobs_equal_the_unshared_batch(tiny, impl):
    """shared_prompt_logprobs (each distinct prompt run once, its K/V shared by its responses) gives the log-probs
    and the gradient of one teacher-forced forward over [prompt | response] per row (1e-5; each parameter's
    gradient to 1e-5 of its largest entry): left-padded prompts with images of three sizes, prompts used by 3, 2 and 1 rows, out of order, and
    responses of different lengths (one of a single token)."""
    model, proc = tiny
    model.set_attn_implementation(impl)
    pad = proc.tokenizer.pad_token_id
    prompts = W.prompts(proc, [0, 1, 2])
    index = [1, 0, 1, 2, 0, 1]
    g = torch.Generator().manual_seed(3)
    responses = [torch.randint(20, 200, (n,), generator=g).tolist() for n in (5, 9, 1, 7, 12, 3)]
    full = rollout.to_train_batch(prompts, _as_rollout(responses, index, pad))
    P = full["prompt_len"]
    weights = torch.randn(len(index), max(map(len, responses)), generator=g)
    grads = []
    try:
        model.train()
        for shared in (False, True):
            model.zero_grad()
            if shared:
                lp, mask = rollout.shared_prompt_logprobs(model, prompts, index, responses, pad, temperature=0.8)
            else:
                lp, mask = token_logprobs(model, full, temperature=0.8)[:, P:], full["response_mask"][:, P:]
            (lp * weights).sum().backward()
            grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, lp, mask))
    finally:
        model.zero_grad()
        model.eval()
        model.set_attn_implementation("sdpa")
    (g0, lp0, m0), (g1, lp1, m1) = grads
    assert torch.equal(m0, m1) and m1.sum() == sum(map(len, responses))
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    assert torch.all(lp1[~m1] == 0)
    assert g0.keys() == g1.keys() and any(k.startswith(("visual.", "model.visual.")) for k in g1)
    for k in g0:  # relative to each parameter's own gradient (1e-12: one that is zero stays zero)
        assert (g1[k] - g0[k]).abs().max() <= 1e-5 * g0[k].abs().max() + 1e-12, k


def _as_rollout(responses, index, pad):
    """A Rollout holding the given responses (right-padded), row r answering prompt index[r]."""
    L = max(map(len, responses))
    tokens = torch.full((len(responses), L), pad)
    mask = torch.zeros(len(responses), L, dtype=torch.bool)
    for r, ids in enumerate(responses):
        tokens[r, :len(ids)], mask[r, :len(ids)] = torch.tensor(ids), True
    return rollout.Rollout(tokens=tokens, logprobs=torch.zeros(tokens.shape), mask=mask, lengths=mask.sum(1),
                           finish=["stop"] * len(responses), prompt_index=torch.tensor(index))
