"""TAPO's objective, term by term on hand-computed numbers, and the loss's invariance to how it is split."""
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import random_image

from tapo import (accumulate_grads, clipped_surrogate, entropy_terms, group_advantages, inter_class_kl,
                  tapo_token_loss)


def test_group_advantage_hand_values():
    """Eq. 2: (R - mean) / (unbiased std + 1e-6) over the n1 + n2 rollouts of each group."""
    R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.9, 0.1, 0.1, 0.1]])
    A = group_advantages(R)
    s0 = math.sqrt(4 * 0.25 / 3)
    assert torch.allclose(A[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s0 + 1e-6), atol=1e-6)
    m1 = 0.3
    s1 = math.sqrt(((0.6) ** 2 + 3 * 0.2 ** 2) / 3)
    assert torch.allclose(A[1], (torch.tensor([0.9, 0.1, 0.1, 0.1]) - m1) / (s1 + 1e-6), atol=1e-6)


def test_zero_variance_group_gives_zero_advantage():
    """A group whose rewards are all equal gets advantage exactly 0 and no NaN."""
    A = group_advantages(torch.full((2, 10), 0.9))
    assert torch.equal(A, torch.zeros(2, 10))


def test_clipped_surrogate_hand_values():
    """Eq. 1: clip-higher (0.2 / 0.28) on both sides, and dual-clip C = 3 for negative advantages."""
    old = torch.zeros(5)
    lp = torch.log(torch.tensor([1.5, 0.5, 5.0, 1.1, 0.5]))
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0, 1.0])
    loss, clipped, dual = clipped_surrogate(lp, old, adv, 0.2, 0.28, 3.0)
    # 1.5 > 1.28 with A > 0 -> -1.28 (clipped); 0.5 < 0.8 with A < 0 -> 0.8 (clipped);
    # 5.0 with A < 0 -> 5 capped at C = 3 (dual); 1.1 inside -> -2.2; 0.5 with A > 0 -> -0.5 (unclipped side)
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, 3.0, -2.2, -0.5]), atol=1e-6, rtol=0)
    assert clipped.tolist() == [True, True, False, False, False]
    assert dual.tolist() == [False, False, True, False, False]


def test_inter_class_kl_hand_values():
    """Eq. 3 (release): k = e^d - d - 1 with d = neg - lp, inside the clamps."""
    lp = torch.tensor([-1.0, -2.0, -1.0])
    neg = torch.tensor([-2.0, -1.0, -1.0])
    k, clamped = inter_class_kl(lp, neg)
    torch.testing.assert_close(k, torch.tensor([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1, 0.0]), atol=1e-6, rtol=0)
    assert not clamped.any()


def test_inter_class_kl_clamps_at_ten():
    """Eq. 3 (release): d is clamped to [-20, 20] and k to [-10, 10]; a clamped token is flagged."""
    k, clamped = inter_class_kl(torch.tensor([0.0]), torch.tensor([-30.0]))
    assert k.tolist() == [10.0] and clamped.tolist() == [True]


def test_reference_kl_uses_the_same_k3():
    """Δ5's reference KL adds beta * k3(lp, ref): the same estimator as Eq. 3, with the opposite sign."""
    lp, old, ref, adv = torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.5]), torch.tensor([0.0])
    with_ref, _ = tapo_token_loss(lp, old, None, adv, ref, **{**COEF, "beta": 0.1})
    without, _ = tapo_token_loss(lp, old, None, adv, None, **COEF)
    assert abs((with_ref - without).item() - 0.1 * inter_class_kl(lp, ref)[0].item()) < 1e-7


def test_inter_class_gradient_increases_kl_to_negative():
    """A gradient step on -gamma * k (the loss term) makes the KL estimate to the negative image larger."""
    lp = torch.tensor([-1.0, -0.5, -2.0], requires_grad=True)
    neg = torch.tensor([-1.5, -1.0, -1.0])
    k0 = inter_class_kl(lp, neg)[0].sum()
    (-0.01 * k0).backward()
    with torch.no_grad():
        k1 = inter_class_kl(lp - 10.0 * lp.grad, neg)[0].sum()
    assert k1 > k0


def test_entropy_terms_gradients():
    """eta1's term has gradient -eta1 per token; eta2's term carries no gradient (release, Δ3/Δ4)."""
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    neg = torch.tensor([-3.0, -4.0], requires_grad=True)
    t = entropy_terms(lp, neg, 0.03, 0.03)
    torch.testing.assert_close(t, torch.tensor([0.03 * 1 + 0.03 * 3, 0.03 * 2 + 0.03 * 4]))
    t.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-0.03, -0.03]))
    assert neg.grad is None or torch.equal(neg.grad, torch.zeros(2))


COEF = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, gamma=0.01, eta1=0.03, eta2=0.03, beta=0.0)


def test_total_token_loss_combines_terms():
    """L = l_clip - gamma * k + eta1 * (-lp) + eta2 * (-neg), on one hand-computed token."""
    lp, old, neg, adv = torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([0.5])
    loss, _ = tapo_token_loss(lp, old, neg, adv, **COEF)
    expect = -0.5 * 1.0 - 0.01 * (math.exp(-1) + 1 - 1) + 0.03 * 1.0 + 0.03 * 2.0
    assert abs(loss.item() - expect) < 1e-6


def _fake_samples(processor, n_groups=2, n=3):
    """n_groups groups of n rollouts (the last one of each on the positive image), advantages +-(0.5 + j)."""
    from tapo import Group, Sample
    from data import encode_prompts
    tok = processor.tokenizer
    texts = ["<think> red head </think>\n\n<answer>Vesper Finch</answer>", "<think> blue </think><answer>Dusk Lily</answer>",
             "<answer>Kestrel</answer>"]
    samples = []
    for gi in range(n_groups):
        images = [random_image(112, 112, 3 * gi + k) for k in range(3)]
        g = Group(row=None, prompts={side: encode_prompts(processor, [im], ["What species of bird is this?"])
                                     for side, im in zip(("anchor", "positive", "negative"), images)})
        for j in range(n):
            ids = tok(texts[(gi + j) % 3], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
            s = Sample(g, "anchor" if j < 2 else "positive", ids, "", "stop", torch.zeros(len(ids)), 0.0, 0.0, 0.0,
                       adv=(-1.0) ** j * (0.5 + j))
            g.samples.append(s)
            samples.append(s)
    return samples


@pytest.mark.parametrize("split", [1, 2, 4])
def test_loss_gradients_independent_of_micro_batch(tiny, split):
    """The update's gradients for micro-batches of `split` rollouts equal (1e-6) those of one micro-batch of all 6."""
    from tapo import response_logprobs, update_side
    model, proc = tiny
    pad = proc.tokenizer.pad_token_id
    samples = _fake_samples(proc)
    cfg = SimpleNamespace(temperature=1.0, intra_condition="positive", share_prompt=False, micro_batch=split)
    upd = [update_side(s, "positive") for s in samples]
    # old log-probs slightly off the current ones so ratios are not all 1
    for i, (s, lp) in enumerate(zip(samples, response_logprobs(model, samples, upd, pad, 1.0, 6))):
        s.old = lp - 0.1 * (i % 2)
    for s, lp in zip(samples, response_logprobs(model, samples, ["negative"] * 6, pad, 1.0, 6)):
        s.neg = lp
    n_tok = float(sum(len(s.ids) for s in samples))
    grads = []
    for mb in (split, 6):
        cfg.micro_batch = mb
        model.zero_grad()
        accumulate_grads(model, samples, math.ceil(6 / mb), n_tok, COEF, cfg, pad, 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    for n in grads[1]:
        err = (grads[0][n] - grads[1][n]).abs().max().item()
        assert err <= 1e-6 * (1 + grads[1][n].abs().max().item()), (n, err)


def test_shared_prompt_update_gives_the_unshared_gradient(tiny):
    """--share-prompt: the update (accumulate_grads) with each (group, image) prompt run once for its responses
    has the gradient (each parameter's to 1e-5 of its largest entry) and the logged sums (1e-5) of the per-sample
    [prompt | response] batch;
    the pi_old / negative log-probs (response_logprobs) agree within 1e-5."""
    from tapo import response_logprobs, update_side
    model, proc = tiny
    pad = proc.tokenizer.pad_token_id
    samples = _fake_samples(proc)
    upd = [update_side(s, "positive") for s in samples]
    lps = {share: (response_logprobs(model, samples, upd, pad, 1.0, 4, share),
                   response_logprobs(model, samples, ["negative"] * 6, pad, 1.0, 4, share)) for share in (False, True)}
    for a, b in zip(lps[False][0] + lps[False][1], lps[True][0] + lps[True][1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for i, (s, old, neg) in enumerate(zip(samples, *lps[False])):
        s.old, s.neg = old - 0.1 * (i % 2), neg
    n_tok = float(sum(len(s.ids) for s in samples))
    out = []
    for share in (False, True):
        cfg = SimpleNamespace(temperature=1.0, intra_condition="positive", share_prompt=share, micro_batch=4)
        model.zero_grad()
        sums = accumulate_grads(model, samples, 2, n_tok, COEF, cfg, pad, 1)
        out.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sums))
    model.zero_grad()
    (g0, s0), (g1, s1) = out
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:  # relative to each parameter's own gradient (1e-12: one that is zero stays zero)
        err = (g1[n] - g0[n]).abs().max().item()
        assert err <= 1e-5 * g0[n].abs().max().item() + 1e-12, (n, err)


def test_filler_micro_batches_add_no_gradient(tiny):
    """Weight-0 lockstep filler rows (and extra empty micro-batches) leave the gradients unchanged."""
    from dataclasses import replace
    from tapo import response_logprobs, update_side
    model, proc = tiny
    pad = proc.tokenizer.pad_token_id
    samples = _fake_samples(proc, n_groups=1)
    upd = [update_side(s, "positive") for s in samples]
    for s, lp in zip(samples, response_logprobs(model, samples, upd, pad, 1.0, 6)):
        s.old, s.neg = lp - 0.05, lp - 0.3
    cfg = SimpleNamespace(temperature=1.0, intra_condition="positive", share_prompt=False, micro_batch=2)
    n_tok = float(sum(len(s.ids) for s in samples))
    grads = []
    for batch, n_micro in ((samples, 2), (samples + [replace(samples[0], weight=0.0)], 4)):
        model.zero_grad()
        accumulate_grads(model, batch, n_micro, n_tok, COEF, cfg, pad, 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    # the two runs split the rows into other micro-batches, so floats are summed in another order: equal up to that
    # (1e-6 of the gradient's scale, as above; on an AMD EPYC host 1.3e-7 absolute). A filler row of weight 1e-3
    # instead of 0 moves them ~65x past this bound, weight 1 ~65,000x.
    for n in grads[0]:
        err = (grads[0][n] - grads[1][n]).abs().max().item()
        assert err <= 1e-6 * (1 + grads[0][n].abs().max().item()), (n, err)


def test_log_ratio_is_clamped_before_exp():
    """A token with lp - old = 100 (ratio e^100) gives a finite loss and finite gradients: the release's clamp."""
    lp = torch.tensor([100.0, -1.0], requires_grad=True)
    loss, _, _ = clipped_surrogate(lp, torch.zeros(2), torch.tensor([0.0, 1.0]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(lp.grad).all()


def test_non_finite_gradient_norm_skips_the_step(tiny, monkeypatch):
    """update() skips the optimizer step (and counts it) when the gradient norm is not finite."""
    import tapo
    from tapo import response_logprobs, update, update_side
    model, proc = tiny
    pad = proc.tokenizer.pad_token_id
    samples = _fake_samples(proc, n_groups=1)
    upd = [update_side(s, "positive") for s in samples]
    for s, lp in zip(samples, response_logprobs(model, samples, upd, pad, 1.0, 6)):
        s.old, s.neg = lp, lp - 0.3
    args = SimpleNamespace(temperature=1.0, intra_condition="positive", share_prompt=False, micro_batch=3, rollout_batch=1,
                           update_batch=1, n1=2, n2=1, grad_clip=1.0, **{k: v for k, v in COEF.items() if k != "beta"},
                           kl_ref=0.0, rl_coef=1.0)
    dist = SimpleNamespace(world=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monkeypatch.setattr(tapo.training, "clip_grad_norm", lambda model, max_norm: float("nan"))
    _, _, updates, skipped, _ = update(model, opt, samples, args, dist, pad)
    model.zero_grad(set_to_none=True)
    assert (updates, skipped) == (0, 1)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("rows, update, rollout, epochs, steps", [
    (1808, 128, 384, 10, 40), (1808, 64, 192, 5, 45), (100, 128, 384, 10, 1), (116, 8, 16, 10, 70)])
def test_release_run_length(rows, update, rollout, epochs, steps):
    """Steps = floor(floor(N / update) * update / rollout) * epochs (EasyR1), at least 1."""
    from tapo import release_steps
    assert release_steps(rows, update, rollout, epochs) == steps


def test_overlong_prompts_are_skipped_and_counted(tiny, tmp_path):
    """Rows whose RL prompt exceeds --max-prompt-length are dropped at start and counted."""
    from data import RLRow
    from tapo import within_prompt_cap
    _, proc = tiny
    for name, side in (("small.png", 56), ("big.png", 448)):
        random_image(side, side, 0).save(tmp_path / name)
    rows = [RLRow(str(tmp_path / f), str(tmp_path / f), str(tmp_path / f), "<image> What bird is this?", "x", f)
            for f in ("small.png", "big.png")]
    args = SimpleNamespace(min_pixels=0, max_pixels=0, max_prompt_length=200)
    keep, skipped = within_prompt_cap(rows, proc, None, args)
    assert [r.image for r in keep] == [str(tmp_path / "small.png")] and skipped == 1


def test_rl_coef_zero_leaves_no_gradient_and_the_same_log(tiny):
    """--rl-coef 0 (the replay-only control): the objective backpropagates nothing, and its logged sums are those
    of the full objective (the run logs what its policy's rollouts would have been trained on)."""
    from tapo import response_logprobs, update_side
    model, proc = tiny
    pad = proc.tokenizer.pad_token_id
    samples = _fake_samples(proc)
    upd = [update_side(s, "positive") for s in samples]
    for s, lp in zip(samples, response_logprobs(model, samples, upd, pad, 1.0, 6)):
        s.old, s.neg = lp - 0.05, lp - 0.3
    cfg = SimpleNamespace(temperature=1.0, intra_condition="positive", share_prompt=False, micro_batch=3)
    n_tok = float(sum(len(s.ids) for s in samples))
    out = {}
    for scale in (1.0, 0.0):
        model.zero_grad(set_to_none=True)
        sums = accumulate_grads(model, samples, 2, n_tok, COEF, cfg, pad, 1, scale=scale)
        grad = sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None)
        out[scale] = (sums, grad)
    model.zero_grad(set_to_none=True)
    assert out[1.0][1] > 0 and out[0.0][1] == 0.0
    assert torch.equal(out[1.0][0], out[0.0][0])


def test_rl_coef_zero_needs_a_replay(tmp_path):
    """The replay-only control without a replay would train nothing: a clear error, as a negative weight."""
    from tapo import get_args
    for name in ("replay.json", "analysis_replay.json"):
        (tmp_path / name).write_text("[]")
    common = ["--model", "tiny", "--data", str(tmp_path), "--defaults", "world"]
    assert get_args(common + ["--rl-coef", "0"]).rl_coef == 0.0
    for bad in (["--rl-coef", "0", "--replay", "none"], ["--rl-coef", "-1"]):
        with pytest.raises(SystemExit):
            get_args(common + bad)


def test_replay_none_turns_off_the_world_profiles_replay(tmp_path):
    """`--defaults world` replays the world's corpus (files read from the --data folder); `--replay none` turns
    it off whatever the profile's weight, and the release profile has none."""
    from tapo import get_args
    for name in ("replay.json", "analysis_replay.json"):
        (tmp_path / name).write_text("[]")
    common = ["--model", "tiny", "--data", str(tmp_path), "--defaults"]
    world = get_args(common + ["world"])
    assert world.replay_coef > 0 and world.replay.startswith(str(tmp_path / "replay.json") + ":")
    off = get_args(common + ["world", "--replay", "none"])
    assert (off.replay, off.replay_coef) == (None, 0.0)
    release = get_args(common + ["release"])
    assert (release.replay, release.replay_coef) == (None, 0.0)


def test_logged_push_is_each_terms_gradient_on_log_pi(tiny):
    """The log's push_pg / push_inter are |d term / d log pi| summed over tokens: with old = current log-probs (ratio
    1, nothing clipped) and pi_neg = pi e^-0.3 on every token, sum |A| and gamma |1 - e^-0.3| per token."""
    from tapo import LOSS_STATS, response_logprobs, update_side
    model, proc = tiny
    pad = proc.tokenizer.pad_token_id
    samples = _fake_samples(proc)
    upd = [update_side(s, "positive") for s in samples]
    for s, lp in zip(samples, response_logprobs(model, samples, upd, pad, 1.0, 6)):
        s.old, s.neg = lp.clone(), lp - 0.3
    cfg = SimpleNamespace(temperature=1.0, intra_condition="positive", share_prompt=False, micro_batch=3)
    n_tok = float(sum(len(s.ids) for s in samples))
    sums = dict(zip(LOSS_STATS, accumulate_grads(model, samples, 2, n_tok, COEF, cfg, pad, 1).tolist()))
    model.zero_grad()
    assert sums["tokens"] == n_tok
    assert sums["push_pg"] == pytest.approx(sum(abs(s.adv) * len(s.ids) for s in samples), rel=1e-4)
    assert sums["push_inter"] == pytest.approx(COEF["gamma"] * (1 - math.exp(-0.3)) * n_tok, rel=1e-4)


def test_one_generate_call_for_both_images_gives_the_rollouts_of_two(tiny, tiny_world):
    """With n1 == n2 the anchor and positive rollouts are sampled in one batched call; every rollout is the one
    the image's own call gives (each rollout has its own seeded generator), in the same order."""
    from data import load_stage2
    from tapo import sample_groups
    model, proc = tiny
    rows = load_stage2(str(tiny_world / "rl_train.jsonl"), None)[:3]
    common = dict(max_new_tokens=12, temperature=1.0, top_p=0.99, min_pixels=0, max_pixels=0, reward="strict",
                  acc_weight=0.9, fmt_weight=0.1)
    def rollouts(n1, n2):
        groups, _ = sample_groups(model, proc, rows, SimpleNamespace(n1=n1, n2=n2, **common), None, 777)
        return [[(s.side, s.ids) for s in g.samples] for g in groups]
    both = rollouts(2, 2)
    anchor, positive = rollouts(2, 0), rollouts(0, 2)
    assert both == [a + p for a, p in zip(anchor, positive)]
    assert {side for g in both for side, _ in g} == {"anchor", "positive"}


def test_world_update_batch_takes_one_group_per_rank_when_ranks_outnumber_it(tmp_path, monkeypatch):
    """The world profile's 2 groups per optimizer step become one per rank on more ranks (8 GPUs: 8, a divisor of
    the 16-group RL step); on 2 ranks, or when --update-batch is given, the value stands."""
    from tapo import get_args
    common = ["--model", "tiny", "--data", str(tmp_path), "--defaults", "world", "--replay", "none"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert get_args(common).update_batch == 8
    assert get_args(common + ["--update-batch", "16"]).update_batch == 16
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert get_args(common).update_batch == 2


def test_a_negative_encode_cache_size_is_a_cli_error(tmp_path):
    """--encode-cache-mb takes MiB >= 0 (0 = off): a negative size stops both trainers at parsing, before any work."""
    import sft
    from tapo import get_args
    for name in ("replay.json", "analysis_replay.json"):
        (tmp_path / name).write_text("[]")
    args = {get_args: ["--model", "tiny", "--data", str(tmp_path), "--defaults", "world"],
            sft.get_args: ["--model", "tiny", "--data", str(tmp_path / "replay.json"), "--defaults", "world"]}
    for parse, common in args.items():
        assert parse(common + ["--encode-cache-mb", "0"]).encode_cache_mb == 0  # the same flags parse without it
        with pytest.raises(SystemExit):
            parse(common + ["--encode-cache-mb", "-1"])
