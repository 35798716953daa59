"""tapo.py end to end in subprocesses: smoke run, exact resume, and 2-rank lockstep when one rank's groups die."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import run
from policy import load_policy

FAST = ["--model", "tiny", "--max-new-tokens", "12", "--rollout-batch", "2", "--update-batch", "1",
        "--n1", "2", "--n2", "2", "--max-retries", "1", "--micro-batch", "4", "--lr", "1e-3",
        "--min-pixels", "0", "--max-pixels", "0"]
REPLAY = ["--replay", "replay.json:0.2,analysis_replay.json:0.2", "--replay-coef", "0.5", "--replay-batch", "3"]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_tapo_smoke_two_steps(tiny_world, tmp_path):
    """`python tapo.py` runs 2 steps on the tiny preset and the embedded world, logs, and writes a checkpoint."""
    r = run(["tapo.py", "--data", str(tiny_world), "--out", str(tmp_path / "run"), "--max-steps", "2"] + FAST)
    assert "step 2/2" in r.stdout + r.stderr
    assert len(metrics(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("replay", [False, True])
def test_resume_continues_exactly(tiny_world, tmp_path, replay):
    """2 steps straight give the same weights as 1 step, --resume auto, then 1 more step (updates happen); with
    the replay term as well (its batches follow the step count)."""
    common = ["tests/tapo_worker.py", "--data", str(tiny_world), "--save-every", "1"] + FAST
    common += REPLAY if replay else []
    run(common + ["--out", str(tmp_path / "a"), "--max-steps", "2"], env_extra={"FAKE_REWARD": "all-alternate"})
    run(common + ["--out", str(tmp_path / "b"), "--max-steps", "1"], env_extra={"FAKE_REWARD": "all-alternate"})
    run(common + ["--out", str(tmp_path / "b"), "--max-steps", "2", "--resume", "auto"],
        env_extra={"FAKE_REWARD": "all-alternate"})
    assert all(m["updates"] > 0 for m in metrics(tmp_path / "a"))
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2]
    assert all((m["replay_nll"] is not None) == replay for m in metrics(tmp_path / "a"))


def test_replay_needs_its_coefficient_and_names_a_missing_file(tiny_world, tmp_path):
    """--replay without --replay-coef is refused at start; a replay file that does not exist is named."""
    base = ["tapo.py", "--data", tiny_world, "--out", tmp_path / "x", "--max-steps", "1"] + FAST
    r = run(base + ["--replay", "replay.json"], ok=False)
    assert r.returncode != 0 and "--replay FILES and --replay-coef > 0 go together" in r.stderr
    r = run(base + ["--replay", "nowhere.json", "--replay-coef", "1"], ok=False)
    assert r.returncode != 0 and "nowhere.json" in r.stdout + r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("replay", [False, True])
def test_two_ranks_one_rank_all_filtered_does_not_hang(tiny_world, tmp_path, replay):
    """Under torchrun (gloo, 2 ranks), rank 1's groups are all filtered, rank 0's survive: the run completes (with
    the replay term too, whose text-only micro-batches must keep FSDP2's gathers in step)."""
    out = tmp_path / "dist"
    run(["tests/tapo_worker.py", "--data", str(tiny_world), "--out", str(out), "--max-steps", "2",
         "--parallel", "fsdp"] + FAST + ["--update-batch", "2"] + (REPLAY if replay else []), nproc=2)
    ms = metrics(out)
    assert len(ms) == 2 and all(m["updates"] >= 1 and m["kept"] >= 1 for m in ms)


@pytest.mark.parametrize("keep", [False, True])
def test_retries_draw_full_batches_and_keep_unfiltered_quirk(tiny_world, tmp_path, keep):
    """Every try draws a full rollout batch; with nothing surviving, --keep-unfiltered keeps the tries (release)."""
    out = tmp_path / "run"
    run(["tests/tapo_worker.py", "--data", str(tiny_world), "--out", str(out), "--max-steps", "1"] + FAST
        + (["--keep-unfiltered"] if keep else []), env_extra={"FAKE_REWARD": "all-wrong"})
    m = metrics(out)[0]
    # without the flag: (max_retries 1 + 1) tries x a full rollout batch of 2; with it the first try is kept whole
    assert (m["drawn"], m["kept"], m["updates"] > 0) == ((2, 2, True) if keep else (4, 0, False))


def test_batch_not_divisible_by_ranks_is_refused(tiny_world, tmp_path):
    """A rollout batch that cannot split over the ranks stops at start with a message naming the flag."""
    r = run(["tapo.py", "--data", tiny_world, "--out", tmp_path / "x", "--max-steps", "1"] + FAST[:4] +
            ["--rollout-batch", "3", "--update-batch", "3"] + FAST[8:], nproc=2, ok=False)
    assert r.returncode != 0 and "--rollout-batch 3 is not a multiple of the 2 ranks" in r.stdout + r.stderr


def test_freeze_language_updates_only_the_vision_side(tiny_world, tmp_path):
    """`tapo.py --freeze language`: after an update step every language-side weight equals the starting one bit
    for bit and the vision side moved."""
    start = tmp_path / "start"
    model, processor = load_policy("tiny", seed=0)
    model.save_pretrained(start)
    processor.save_pretrained(start)
    run(["tests/tapo_worker.py", "--data", str(tiny_world), "--out", str(tmp_path / "run"), "--max-steps", "1"]
        + FAST + ["--model", str(start), "--freeze", "language"], env_extra={"FAKE_REWARD": "all-alternate"})
    assert metrics(tmp_path / "run")[0]["updates"] > 0
    w0, w1 = load_file(start / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    moved = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert moved and all(k.startswith(("visual.", "model.visual.")) for k in moved)


def test_sampler_log_probs_as_pi_old_give_the_recomputed_step(tiny_world, tmp_path):
    """--old-logprobs sampler (the world's): pi_old taken from the sampler instead of a teacher-forced forward gives
    the recomputed run's step (the same rollouts and rewards; loss terms within 1e-5) and logs no lp_gap, while the
    recompute logs the gap between the two (< 1e-4 nats in fp32)."""
    for mode in ("recompute", "sampler"):
        run(["tests/tapo_worker.py", "--data", str(tiny_world), "--out", str(tmp_path / mode), "--max-steps", "1",
             "--old-logprobs", mode] + FAST, env_extra={"FAKE_REWARD": "all-alternate"})
    a, b = metrics(tmp_path / "recompute")[0], metrics(tmp_path / "sampler")[0]
    assert a["updates"] > 0 and a["updates"] == b["updates"]
    assert a["lp_gap"] < 1e-4 and b["lp_gap"] is None
    assert all(a[k] == b[k] for k in ("reward", "acc", "len", "kept", "drawn"))
    for k in ("loss", "pg", "kl_neg", "entropy", "clip_frac"):
        assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])


def test_two_ranks_with_shared_prompts_give_the_unshared_step(tiny_world, tmp_path):
    """--share-prompt under 2-rank DDP (gloo): the same rollouts, rewards, loss terms and all-reduced gradient norm
    (1e-5) as --no-share-prompt: the shared prompt's gradient reaches DDP's all-reduce, whose reducer only the second
    of its two forwards arms (a forward around DDP: each rank clips and steps on its own gradient). The weights are
    not compared: Adam's first step is about lr x sign(g), so float rounding in near-zero gradient entries moves a
    few elements by a visible part of lr (measured: the tiny preset, one step on the seed-0 world, 22 of its 0.7M
    elements, at most 1.6e-5 at lr 1e-3)."""
    for mode, shared in (("share-prompt", True), ("no-share-prompt", False)):
        r = run(["tests/tapo_worker.py", "--data", str(tiny_world), "--out", str(tmp_path / mode), "--max-steps", "1",
                 "--parallel", "ddp", f"--{mode}"] + FAST + ["--update-batch", "2"],
                nproc=2, env_extra={"FAKE_REWARD": "all-alternate"})
        assert f"shared prompts {shared}" in r.stdout  # the run did what the flag asked
    a, b = metrics(tmp_path / "share-prompt")[0], metrics(tmp_path / "no-share-prompt")[0]
    assert a["updates"] > 0 and a["updates"] == b["updates"]
    assert all(a[k] == b[k] for k in ("reward", "acc", "len", "kept", "drawn"))
    for k in ("loss", "pg", "kl_neg", "entropy", "clip_frac", "grad_norm"):
        assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
