"""tests/launch.py, the harness every multi-rank test runs through: a failed or hung rank fails fast, with logs."""
import time

import pytest

from launch import Ranks, run

# rank 0 fails at once; rank 1 waits forever in a named function (the stack must show where)
FAIL_AND_HANG = """
import os, sys, time
def wait_for_rank_zero():
    while True:
        time.sleep(0.1)
if os.environ["RANK"] == "0":
    print("rank zero gives up", flush=True)
    sys.exit(3)
print("rank one waits", flush=True)
wait_for_rank_zero()
"""


def test_a_failed_rank_ends_the_run_with_every_log_and_the_waiting_stack():
    """When one rank exits non-zero and another hangs, finish() fails within its grace period (not the timeout),
    showing both ranks' output, the exit codes and the hung rank's Python stack."""
    t0 = time.time()
    with pytest.raises(pytest.fail.Exception) as e:
        Ranks(["-c", FAIL_AND_HANG]).finish(timeout=300, grace=1)
    assert time.time() - t0 < 60
    msg = str(e.value)
    assert "rank zero gives up" in msg and "rank one waits" in msg and "wait_for_rank_zero" in msg
    assert "exited with [3, " in msg


def test_ranks_share_a_store_the_harness_holds():
    """Both ranks rendezvous through the harness's store (MASTER_PORT, agent-store mode) and all-reduce."""
    code = ("import torch, torch.distributed as d; d.init_process_group('gloo'); t = torch.ones(1); "
            "d.all_reduce(t); assert t.item() == 2; d.destroy_process_group()")
    Ranks(["-c", code]).finish(timeout=120)


def test_a_run_past_its_timeout_fails_with_its_stack():
    """run() stops a process still running at its timeout and fails the test with the process's Python stack."""
    t0 = time.time()
    with pytest.raises(pytest.fail.Exception) as e:
        run(["-c", "import time\ndef stuck():\n    time.sleep(600)\nstuck()"], timeout=2)
    assert time.time() - t0 < 60 and "still running after 2 s" in str(e.value) and "stuck" in str(e.value)
