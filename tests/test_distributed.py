"""Data-parallel training equals single-process training: DDP and FSDP2 under torchrun (gloo, CPU)."""
import warnings

import pytest
import torch

import distributed
import presets
from launch import run

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "single.pt"
    run(["tests/dist_step.py", "--mode", "none", "--out", str(out)])
    return torch.load(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_rank_step_equals_single_process(mode, reference, tmp_path):
    """One optimizer step on 2 ranks (DDP or FSDP2, gloo) gives the same parameters as one process (1e-6)."""
    out = tmp_path / f"{mode}.pt"
    export = tmp_path / "export"
    run(["tests/dist_step.py", "--mode", mode, "--out", str(out)] +
        (["--export", str(export)] if mode == "fsdp" else []), nproc=2)
    got = torch.load(out)
    assert got.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], atol=1e-6, rtol=1e-5, msg=k)
    if mode == "fsdp":
        # the FSDP2 export is an ordinary HF folder holding the unsharded weights
        from transformers import Qwen2_5_VLForConditionalGeneration
        m = Qwen2_5_VLForConditionalGeneration.from_pretrained(export)
        sd = m.state_dict()
        for k in reference:
            torch.testing.assert_close(sd[k], got[k], atol=0, rtol=0, msg=k)


def test_gradient_checkpointing_gives_the_same_gradients_and_turns_off():
    """distributed.set_gradient_checkpointing recomputes in backward: same loss and gradients as without, no
    deprecation warning on transformers 5 (FutureWarning raised as an error), and off again when asked."""
    model, _ = presets.build_preset("tiny", seed=0)
    model.train()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        distributed.set_gradient_checkpointing(model, True)
        assert model.is_activation_checkpointing
        loss, got = grads()
        distributed.set_gradient_checkpointing(model, False)
    assert not model.is_activation_checkpointing
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)


EXIT_WORKER = """
import distributed
dist = distributed.setup("cpu")
print(f"rank {dist.rank} before teardown")
distributed.teardown(exit_process=True)
print(f"rank {dist.rank} after teardown")
"""


def test_teardown_exit_process_ends_every_rank(tmp_path):
    """teardown(exit_process=True) on 2 ranks: exit status 0, what was printed before is there, nothing after it
    runs (no destructor of main's locals can then hang a rank: distributed.teardown)."""
    worker = tmp_path / "worker.py"
    worker.write_text(EXIT_WORKER)  # the repo root is on PYTHONPATH (tests/launch.py)
    p = run([worker], nproc=2, timeout=120)
    assert "rank 0 before teardown" in p.stdout and "rank 1 before teardown" in p.stdout, p.stdout
    assert "after teardown" not in p.stdout, p.stdout
