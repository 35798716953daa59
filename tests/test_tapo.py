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


def test_inter_class_kl_hand_values_and_clamps():
    """Eq. 3 (release): k = clamp(e^d - d - 1, -10, 10), d = clamp(neg - lp, -20, 20)."""
    lp = torch.tensor([-1.0, -2.0, 0.0, -1.0])
    neg = torch.tensor([-2.0, -1.0, -30.0, -1.0])
    k, clamped = inter_class_kl(lp, neg)
    expect = [math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1, 10.0, 0.0]
    torch.testing.assert_close(k, torch.tensor(expect), atol=1e-6, rtol=0)
    assert clamped.tolist() == [False, False, True, False]


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


def test_total_token_loss_combines_terms():
    """L = l_clip - gamma * k + eta1 * (-lp) + eta2 * (-neg), on one hand-computed token."""
    cfg = SimpleNamespace(eps_low=0.2, eps_high=0.28, dual_clip=3.0, gamma=0.01, eta1=0.03, eta2=0.03, kl_ref=0.0)
    lp, old, neg, adv = torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([0.5])
    loss, _ = tapo_token_loss(lp, old, neg, adv, cfg)
    expect = -0.5 * 1.0 - 0.01 * (math.exp(-1) + 1 - 1) + 0.03 * 1.0 + 0.03 * 2.0
    assert abs(loss.item() - expect) < 1e-6


def _fake_items(processor, n_groups=2, n=3):
    g_images = [(random_image(112, 112, 3 * i), random_image(112, 112, 3 * i + 1), random_image(112, 112, 3 * i + 2))
                for i in range(n_groups)]
    tok = processor.tokenizer
    items, adv = [], {}
    texts = ["<think> red head </think>\n\n<answer>Vesper Finch</answer>", "<think> blue </think><answer>Dusk Lily</answer>",
             "<answer>Kestrel</answer>"]
    for gi in range(n_groups):
        g = dict(images=g_images[gi], text="What species of bird is this?", rollouts=[])
        for j in range(n):
            ids = tok(texts[(gi + j) % 3], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
            ro = dict(side="anchor" if j < 2 else "positive", ids=ids)
            g["rollouts"].append(ro)
            items.append((g, ro))
            adv[id(ro)] = (-1.0) ** j * (0.5 + j)
    return items, adv


@pytest.mark.parametrize("split", [1, 2, 6])
def test_loss_gradients_independent_of_micro_batch(tiny, split):
    """The update's gradients are the same (1e-6) for micro-batches of 1, 2 or all 6 rollouts."""
    from tapo import score_batch, negative_image, update_image
    model, proc = tiny
    items, adv = _fake_items(proc)
    cfg = SimpleNamespace(eps_low=0.2, eps_high=0.28, dual_clip=3.0, gamma=0.01, eta1=0.03, eta2=0.03, kl_ref=0.0,
                          temperature=1.0, intra_condition="positive", micro_batch=split)
    # old log-probs slightly off the current ones so ratios are not all 1
    old = [o - 0.1 * (i % 2) for i, o in enumerate(score_batch(model, proc, items, None, 1.0, update_image(cfg)))]
    neg = score_batch(model, proc, items, None, 1.0, negative_image)
    n_tok = float(sum(len(ro["ids"]) for _, ro in items))
    grads = []
    for mb in (split, 6):
        cfg.micro_batch = mb
        model.zero_grad()
        sums = dict(loss=0.0, pg=0.0, clip=0.0, dual=0.0, k=0.0, k_clamped=0.0, ent=0.0, tokens=0.0)
        accumulate_grads(model, proc, items, list(range(6)), [1.0] * 6, old, neg, [], adv, cfg, None, n_tok,
                         math.ceil(6 / mb), 1, sums)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    for n in grads[1]:
        err = (grads[0][n] - grads[1][n]).abs().max().item()
        assert err <= 1e-6 * (1 + grads[1][n].abs().max().item()), (n, err)
