"""checkpoint.py: no pickle on load, saves that survive SIGKILL at any point or a full disk, verified resume."""
import builtins
import errno
import json
import os
import pickle
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
from checkpoint import (CheckpointError, load_trainer_state, newest_checkpoint, resume_checkpoint, rng_state,
                        save_checkpoint, set_rng_state, verify_checkpoint)
from launch import Ranks


def trained_optimizer():
    """An AdamW with moments after one step (integer param ids, tuple betas, tensor step)."""
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    return opt


def perturbed(model, delta):
    """A copy of the model's weights with `delta` added to one tensor (to tell two saves apart)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    k = next(iter(sd))
    sd[k] += delta
    return sd


def save(run, name, model, proc, step, sd=None):
    """save_checkpoint of model (or of weights `sd`) with a small resume state at `step`."""
    if sd is not None:
        orig = checkpoint.full_state_dict
        checkpoint.full_state_dict = lambda m: sd
    try:
        save_checkpoint(Path(run) / name, model, proc, state={"step": step, "rng": [rng_state()]},
                        optimizer_state=trained_optimizer().state_dict())
    finally:
        if sd is not None:
            checkpoint.full_state_dict = orig


def test_trainer_state_round_trip_is_exact(tiny, tmp_path):
    """Optimizer moments, RNG streams and loop state come back exactly from JSON + safetensors."""
    model, proc = tiny
    opt = trained_optimizer()
    state = {"step": 3, "args": {"lr": 1e-3, "betas": [0.9, 0.95], "out": None}, "prompts": [{"epoch": 1}],
             "rng": [rng_state()], "elapsed": 0.1 + 0.2}
    save_checkpoint(tmp_path / "final", model, proc, state=state, optimizer_state=opt.state_dict())
    assert not list(tmp_path.glob("final/*.pt")) and (tmp_path / "final" / "trainer_state.safetensors").exists()
    ts = load_trainer_state(tmp_path / "final")
    assert {k: v for k, v in ts["state"].items() if k != "rng"} == {k: v for k, v in state.items() if k != "rng"}
    ref = opt.state_dict()
    assert ts["optimizer"]["param_groups"] == ref["param_groups"]
    for pid, s in ref["state"].items():
        assert all(torch.equal(ts["optimizer"]["state"][pid][k], v) for k, v in s.items())
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(ts["optimizer"])  # integer ids and tuples restored: torch accepts it as is
    set_rng_state(ts["state"]["rng"][0])
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_rng_state(state["rng"][0])
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


class Payload:
    """Unpickling this creates the file `marker`: the stand-in for arbitrary code in a shared checkpoint."""
    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_never_executed(tiny, tmp_path):
    """A trainer_state.pt carrying a code payload is never unpickled: not beside a valid state, not alone."""
    model, proc = tiny
    Payload.marker = str(tmp_path / "pwned")
    blob = pickle.dumps({"state": Payload(), "optimizer": None})
    pickle.loads(blob)  # the payload does work when unpickled ...
    assert (tmp_path / "pwned").exists()
    (tmp_path / "pwned").unlink()
    save(tmp_path / "run", "final", model, proc, step=1)
    (tmp_path / "run" / "final" / "trainer_state.pt").write_bytes(blob)
    assert load_trainer_state(tmp_path / "run" / "final")["state"]["step"] == 1
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "run" / "final", legacy)
    for f in ("trainer_state.json", "trainer_state.safetensors"):
        (legacy / f).unlink()
    with pytest.raises(CheckpointError, match="pickled resume state"):
        load_trainer_state(legacy)
    assert not (tmp_path / "pwned").exists()  # ... and never ran here


# ----------------------------------------------------------------------------------------------------------
# SIGKILL at every filesystem operation of a save

OPS = [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "mkdir"), (os, "unlink"), (os, "rmdir"),
       (shutil, "rmtree")]


def count_ops(kill_at, log):
    """Wrap the filesystem mutations (and every open for writing) so that the kill_at-th one SIGKILLs us."""
    def hook(name, fn):
        def wrapped(*a, **k):
            mode = a[1] if len(a) > 1 else k.get("mode", "r")
            if name != "open" or any(c in str(mode) for c in "wax+"):
                log.append(f"{name} {Path(str(a[0])).name if a and not isinstance(a[0], int) else ''}")
                if len(log) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapped
    for mod, name in OPS:
        setattr(mod, name, hook(name, getattr(mod, name)))
    builtins.open = hook("open", builtins.open)
    Path.open = lambda self, *a, **k: builtins.open(self, *a, **k)  # noqa: E731 (write_text goes through it)


def test_save_killed_at_every_filesystem_operation(tiny, tmp_path):
    """SIGKILL before each of the N filesystem operations of a save over an existing `final` (and after the
    last): a complete checkpoint, the previous or the new one, is always picked, and the next save cleans up."""
    model, proc = tiny
    old_sd, new_sd = perturbed(model, 0.0), perturbed(model, 1.0)
    base = tmp_path / "base"
    save(base, "final", model, proc, step=1, sd=old_sd)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # dry run: count the operations
        log = []
        count_ops(0, log)
        save(tmp_path / "dry", "final", model, proc, step=2, sd=new_sd)
        os.write(w, json.dumps(log).encode())
        os._exit(0)
    shutil.copytree(base, tmp_path / "dry")
    os.waitpid(pid, 0)
    ops = json.loads(os.read(r, 1 << 20))
    assert any(o.startswith("replace final") for o in ops) and len(ops) > 20
    picked = {}
    for n in range(1, len(ops) + 2):
        run = tmp_path / f"k{n}"
        shutil.copytree(base, run)
        pid = os.fork()
        if pid == 0:
            count_ops(n, [])
            save(run, "final", model, proc, step=2, sd=new_sd)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL) == (n <= len(ops)), n
        ck = newest_checkpoint(run, hashes=True)
        assert ck is not None, f"nothing complete after a kill before op {n} ({ops[n - 1]})"
        step = load_trainer_state(ck)["state"]["step"]
        expect = tmp_path / "dry" / "final" if step == 2 else base / "final"
        assert (ck / "model.safetensors").read_bytes() == (expect / "model.safetensors").read_bytes(), n
        picked[n] = (ck.name, step)
        save(run, "final", model, proc, step=3)  # the next save succeeds and leaves only `final`
        assert sorted(p.name for p in run.iterdir()) == ["final"], n
        shutil.rmtree(run)
    steps = [s for _, s in picked.values()]
    print(f"{len(ops)} kill points: previous picked {steps.count(1)}x, new {steps.count(2)}x, "
          f"via final.old {sum(name == 'final.old' for name, _ in picked.values())}x")
    assert steps[0] == 1 and steps[-1] == 2 and "final.old" in {name for name, _ in picked.values()}


# ----------------------------------------------------------------------------------------------------------
# Disk full, damaged checkpoints

@pytest.mark.parametrize("where", ["fsync", "model"])
def test_disk_full_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch, where):
    """ENOSPC while saving (at fsync, or half way through the model file): a clear error, the previous
    checkpoint intact and picked, nothing left under a name --resume looks at."""
    model, proc = tiny
    run = tmp_path / "run"
    save(run, "final", model, proc, step=1)
    before = {f.name: f.read_bytes() for f in (run / "final").iterdir()}
    if where == "fsync":
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", full)
    else:
        import transformers.modeling_utils as mu

        def full(sd, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 1000)  # a torn file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(CheckpointError, match=r"saving .*final failed: OSError: No space left on device; "
                                              r"the previous checkpoint .*final is intact"):
        save(run, "final", model, proc, step=2)
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == ["final"]
    assert {f.name: f.read_bytes() for f in (run / "final").iterdir()} == before
    assert newest_checkpoint(run, hashes=True) == run / "final"


def test_damaged_newest_falls_back_with_a_warning(tiny, tmp_path, capsys):
    """A truncated or bit-flipped newest checkpoint is skipped with a warning naming the file; --resume auto
    takes the previous complete one and an explicit --resume of the damaged one is an error."""
    model, proc = tiny
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save(run, f"step_{step}", model, proc, step=step)
    shutil.copytree(run / "step_3", run / "step_3.tmp")  # a stray temp folder is never a candidate
    (run / "step_3" / "manifest.json").unlink()  # e.g. a half-copied folder
    f = run / "step_2" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1  # same size: only the hash sees it
    f.write_bytes(bytes(data))
    assert newest_checkpoint(run) == run / "step_2"  # sizes only
    assert resume_checkpoint("auto", run) == run / "step_1"
    err = capsys.readouterr().err
    assert "step_3: no manifest.json" in err and "step_2/model.safetensors: sha256 differs" in err
    with pytest.raises(CheckpointError, match="step_2/model.safetensors: sha256 differs"):
        resume_checkpoint(str(run / "step_2"), run)
    with open(run / "step_1" / "trainer_state.safetensors", "r+b") as g:
        g.truncate(10)
    assert "trainer_state.safetensors: 10 bytes" in verify_checkpoint(run / "step_1")
    assert resume_checkpoint("auto", run) is None


# ----------------------------------------------------------------------------------------------------------
# 2-rank runs (gloo): FSDP2 before the first step, SIGKILL at a random moment, determinism

FAST = ["--model", "tiny", "--max-new-tokens", "12", "--rollout-batch", "2", "--update-batch", "2",
        "--n1", "2", "--n2", "2", "--max-retries", "1", "--micro-batch", "4", "--lr", "1e-3",
        "--min-pixels", "0", "--max-pixels", "0"]


def two_ranks(args):
    """2 ranks; in TAPO runs every rank's groups survive (tests/tapo_worker.py)."""
    return Ranks(args, env_extra={"FAKE_REWARD": "all-alternate"})


def weights(run):
    return load_file(Path(run) / "final" / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_at_random_moment(args, out, rng, spread):
    """Start a 2-rank run; once step_2 is saved, SIGKILL every rank at a random moment within the next
    `spread` step times (the time between the step_1 and step_2 saves), so anywhere in a step or a save."""
    p = two_ranks(args)
    t0, seen = time.time(), {}
    while len(seen) < 2:
        for k in (1, 2):
            if k not in seen and (Path(out) / f"step_{k}" / "manifest.json").exists():
                seen[k] = time.time()
        if not p.running() or time.time() - t0 > 300:
            p.finish(timeout=0)  # a failed or hung rank fails the test here, with every rank's log
            pytest.fail("the run ended before its step_2 checkpoint")
        time.sleep(0.01)
    delay = rng.uniform(0.0, spread * (seen[2] - seen[1]))
    time.sleep(delay)
    alive = p.running()
    p.kill()
    assert alive, f"the run finished within {delay:.2f} s of its step_2 checkpoint: nothing was interrupted"
    return delay, sorted(q.name for q in Path(out).iterdir())


def test_fsdp2_saves_before_the_first_step_and_resumes_exactly(tmp_path):
    """FSDP2 on 2 ranks: a save after a forward with no optimizer step works, and resuming from it or from a
    mid-run save gives weights bit-identical to the uninterrupted run."""
    two_ranks(["tests/ckpt_worker.py", "--out", str(tmp_path)]).finish()
    assert json.loads((tmp_path / "result.json").read_text()) == {
        "step_0": {"optimizer_saved": False, "identical": True}, "step_2": {"optimizer_saved": True, "identical": True}}


def tapo_args(world_dir, out, *extra):
    return ["tests/tapo_worker.py", "--data", str(world_dir), "--out", str(out), "--max-steps", "5",
            "--save-every", "1"] + FAST + list(extra)


@pytest.fixture(scope="module")
def tapo_reference(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("tapo_ref")
    two_ranks(tapo_args(tiny_world, out)).finish()
    return out


def test_two_identical_tapo_runs_give_identical_weights(tiny_world, tapo_reference, tmp_path):
    """Two identical 2-rank TAPO runs (5 steps, updates on every step) end with bit-identical weights."""
    two_ranks(tapo_args(tiny_world, tmp_path)).finish()
    ms = [json.loads(x) for x in (tapo_reference / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5] and all(m["updates"] > 0 for m in ms)
    assert same(weights(tmp_path), weights(tapo_reference))


def test_two_rank_tapo_killed_at_a_random_moment_resumes_exactly(tiny_world, tapo_reference, tmp_path):
    """A 2-rank TAPO run SIGKILLed at a random moment, then `--resume auto`, ends bit-identical to the
    uninterrupted run."""
    rng = random.Random()
    delay, left = kill_at_random_moment(tapo_args(tiny_world, tmp_path), tmp_path, rng, spread=1.5)
    print(f"tapo killed {delay:.2f} s after its step_2 checkpoint; left {left}")
    two_ranks(tapo_args(tiny_world, tmp_path, "--resume", "auto")).finish()
    assert same(weights(tmp_path), weights(tapo_reference)), f"killed {delay:.2f} s in, left {left}"


def sft_args(data, out, *extra):
    return ["sft.py", "--model", "tiny", "--data", str(data), "--out", str(out), "--max-steps", "8",
            "--save-every", "1", "--batch-size", "4", "--micro-batch", "2", "--lr", "1e-3",
            "--warmup-steps", "1"] + list(extra)


def test_two_rank_sft_killed_at_a_random_moment_resumes_exactly(tmp_path):
    """A 2-rank CoT-SFT run SIGKILLed at a random moment, then `--resume auto`, ends bit-identical to the
    uninterrupted run."""
    from test_sft import stage1_records
    data = tmp_path / "data" / "train.json"
    data.parent.mkdir()
    data.write_text(json.dumps(stage1_records(data.parent)))
    ref = two_ranks(sft_args(data, tmp_path / "ref"))
    rng = random.Random()
    delay, left = kill_at_random_moment(sft_args(data, tmp_path / "run"), tmp_path / "run", rng, spread=3.0)
    ref.finish()
    print(f"sft killed {delay:.2f} s after its step_2 checkpoint; left {left}")
    two_ranks(sft_args(data, tmp_path / "run", "--resume", "auto")).finish()
    assert same(weights(tmp_path / "run"), weights(tmp_path / "ref")), f"killed {delay:.2f} s in, left {left}"


# ----------------------------------------------------------------------------------------------------------
# Images that vanish or break after the data was read

def test_image_deleted_or_corrupted_after_reading_names_row_and_file(tmp_path):
    """load_triplet: a deleted positive or a truncated negative raises DataError naming the row and the file."""
    import data
    from conftest import random_image
    for name in ("a", "p", "n"):
        random_image(56, 56, seed=0).save(tmp_path / f"{name}.png")
    row = data.RLRow(image=str(tmp_path / "a.png"), positive=str(tmp_path / "p.png"),
                     negative=str(tmp_path / "n.png"), problem="q", answer="x", source="rl_train.jsonl:7")
    assert len(data.load_triplet(row)) == 3
    (tmp_path / "p.png").unlink()
    with pytest.raises(data.DataError, match=r"^rl_train\.jsonl:7: image .*p\.png not found"):
        data.load_triplet(row)
    random_image(56, 56, seed=0).save(tmp_path / "p.png")
    (tmp_path / "n.png").write_bytes((tmp_path / "n.png").read_bytes()[:100])  # header intact, pixels gone
    with pytest.raises(data.DataError, match=r"^rl_train\.jsonl:7: image .*n\.png is unreadable"):
        data.load_triplet(row)


def test_image_corrupted_mid_run_stops_sft_and_keeps_checkpoints(tmp_path):
    """An SFT run whose images are truncated after 2 steps (headers intact, so the start check passes) stops
    at its next step with an error naming the row and the file; its checkpoints stay complete and resumable."""
    import sft
    from test_sft import stage1_records
    data_file = tmp_path / "data" / "train.json"
    data_file.parent.mkdir()
    data_file.write_text(json.dumps(stage1_records(data_file.parent)))
    args = ["--model", "tiny", "--data", str(data_file), "--out", str(tmp_path / "run"), "--save-every", "1",
            "--batch-size", "4", "--micro-batch", "2", "--lr", "1e-3"]
    sft.main(args + ["--max-steps", "2"])
    for f in data_file.parent.glob("*.png"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(sft.DataError, match=r"train\.json:#\d+: image .*img\d+\.png is unreadable"):
        sft.main(args + ["--max-steps", "4", "--resume", "auto"])
    assert newest_checkpoint(tmp_path / "run", hashes=True) == tmp_path / "run" / "final"
    assert load_trainer_state(tmp_path / "run" / "final")["state"]["step"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["curves.png", "final", "metrics.jsonl", "step_1"]
