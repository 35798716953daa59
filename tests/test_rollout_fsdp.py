"""Rollouts on 2 ranks (gloo, one torchrun run shared by every test here): the FSDP2-sharded path (lockstep),
the gathered path (rollout.gathered: one all-gather per unit per phase) and DDP, against each other, against a
single process, and by the number of collectives each decode step makes (bench.CountCollectives)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollout_worker as W  # noqa: E402
from launch import run  # noqa: E402


@pytest.fixture(scope="module")
def sharp():
    return W.sharp_tiny()


@pytest.fixture(scope="module")
def got(sharp, tmp_path_factory):
    """Per rank: the worker's results (rows, and sharded / gathered / ddp rollouts with their collectives)."""
    model, proc = sharp
    stop_ids = [int(t) for t in W.run(model, proc, [0], W.LONG, []).tokens[0, 6:8]]  # fire mid-rollout
    out = tmp_path_factory.mktemp("fsdp") / "got.pt"
    run(["tests/rollout_worker.py", "--out", out, "--stop"] + stop_ids, nproc=2)
    return torch.load(out), stop_ids


def test_sharded_rank_finishing_early_equals_single_process(sharp, got):
    """Two-rank FSDP2 rollouts where rank 1 finishes first complete and equal single-process tokens."""
    model, proc = sharp
    got, stop_ids = got
    assert [g["rows"] for g in got] == [[0, 2], [1, 3]]
    for rank, g in enumerate(got):
        ref = W.run(model, proc, g["rows"], W.LONG if rank == 0 else W.SHORT, stop_ids, sync=False)
        assert torch.equal(g["sharded"]["tokens"], ref.tokens), rank
        assert g["sharded"]["finish"] == ref.finish
        torch.testing.assert_close(g["sharded"]["logprobs"], ref.logprobs, atol=1e-5, rtol=0)
    assert got[1]["sharded"]["tokens"].shape[1] <= W.SHORT < got[0]["sharded"]["tokens"].shape[1]


def test_gathered_equals_sharded(got):
    """Gathered rollouts are bit-identical to sharded ones for the same seeds: tokens, log-probs, finish."""
    for g in got[0]:
        assert torch.equal(g["gathered"]["tokens"], g["sharded"]["tokens"])
        assert torch.equal(g["gathered"]["logprobs"], g["sharded"]["logprobs"])
        assert g["gathered"]["finish"] == g["sharded"]["finish"]


def test_gathered_decode_steps_make_no_collectives(got):
    """Gathered: zero collectives per decode step (one all-gather per FSDP2 unit on entry); sharded: one
    all-gather per decoder layer plus the lockstep all-reduce, every step."""
    for rank, g in enumerate(got[0]):
        sh, ga = g["sharded"]["per_forward"], g["gathered"]["per_forward"]
        print(f"rank {rank}: collectives per decode step sharded {sh[1:]}, gathered {ga[1:]}; "
              f"gathered total {len(g['gathered']['calls'])} (entry all-gathers), sharded total {len(g['sharded']['calls'])}")
        assert all(c == 0 for c in ga)
        assert g["gathered"]["calls"] == ["all_gather_single"] * 4  # root, 2 decoder layers, vision tower
        assert all(c == 3 for c in sh[1:])  # 2 layer all-gathers (the root stays gathered) + 1 all_any
        assert g["sharded"]["calls"].count("all_reduce") == len(sh) + 1  # + the prefill's image check


def test_gathered_ranks_stop_independently(got):
    """Gathered, a rank runs only its own forwards (no lockstep dummies); sharded, both run the longest."""
    g0, g1 = got[0]
    assert len(g1["gathered"]["per_forward"]) == g1["gathered"]["tokens"].shape[1] <= W.SHORT
    assert len(g0["gathered"]["per_forward"]) == g0["gathered"]["tokens"].shape[1] == W.LONG
    assert len(g1["sharded"]["per_forward"]) == len(g0["sharded"]["per_forward"]) == W.LONG


def test_gathered_phase_is_undone(got):
    """After `gathered`, parameters are shards again and training (forward + backward) makes the same
    collectives and loss as on a model that never gathered (steady state: the second step)."""
    for g in got[0]:
        assert g["gathered"]["sharded_inside"] is False and g["gathered"]["sharded_after"] is True
        (l1s, _), (l2s, c2s) = g["sharded"]["train"]
        (l1g, _), (l2g, c2g) = g["gathered"]["train"]
        assert l1s == l1g and l2s == l2g
        assert c2s == c2g and c2s.count("reduce_scatter_single") == 4


def test_ddp_rollout_makes_no_collectives(got):
    """Under DDP, generate runs the unwrapped module: no collective at all (a DDP-wrapped forward would
    broadcast buffers every call), and the same tokens as FSDP2."""
    for g in got[0]:
        assert g["ddp"]["calls"] == []
        assert torch.equal(g["ddp"]["tokens"], g["sharded"]["tokens"])
        assert "_broadcast_coalesced" in g["ddp"]["wrapped_forward"]


def test_gathered_ranks_may_differ_in_images(got):
    """Gathered, one rank's prompts may have images while another's have none (sharded, that raises)."""
    assert [tuple(g["gathered"]["mixed_images"]) for g in got[0]] == [(1, 3), (1, 3)]
