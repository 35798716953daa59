"""How tests start ranks in subprocesses: `run` (plain python, or torchrun --standalone) and `Ranks` (torchrun's
environment without torchrun, for runs that a test SIGKILLs mid-step).

Both are race-free on ports and never hang a test run silently:
- the rendezvous store listens on a port the OS picks while the store binds it. Picking a free port, closing
  it and handing its number to rank 0 leaves a window in which another process can take it: rank 0 then dies
  with EADDRINUSE and rank 1 waits for it forever. That once cost CI a 300 s timeout with no log.
- a run past its timeout fails the test with each rank's Python stacks (PYTHONFAULTHANDLER: SIGABRT dumps
  every thread) and the tail of its output. A rank that fails while the others run ends the whole run.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore

ROOT = Path(__file__).resolve().parents[1]
TAIL = 3000  # characters of each stream shown when a run fails


def env_for_ranks(**extra):
    """One thread per process (2-core CI), the repo on PYTHONPATH, Python stacks on SIGABRT."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


def children(pid):
    """Pids whose parent is `pid` (Linux /proc; empty elsewhere)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d.name))
    return out


def abort(pids):
    """SIGABRT: with PYTHONFAULTHANDLER each process writes its threads' stacks to stderr, then dies."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGABRT)
        except ProcessLookupError:
            pass


def run(args, nproc=None, timeout=400, env_extra=None, ok=True):
    """`python ARGS` or, with nproc, `torchrun --standalone --nproc_per_node NPROC ARGS` (its rendezvous store
    binds port 0 and the workers share it), from the repo root. Returns the CompletedProcess; a run past
    `timeout`, or (with ok) a non-zero exit, fails the test with the tails of stdout and stderr."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                              if nproc else []) + [str(a) for a in args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env_for_ranks(**(env_extra or {})), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        abort(children(p.pid) if nproc else [p.pid])  # the workers' stacks; torchrun then ends on their failure
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        pytest.fail(f"still running after {timeout} s: {' '.join(cmd)}\n{out[-TAIL:]}\n{err[-TAIL:]}")
    assert p.returncode == 0 or not ok, out[-TAIL:] + err[-TAIL:]
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


class Ranks:
    """`nproc` ranks started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_PORT, ...), all in one
    process group, so that one SIGKILL reaches every rank at the same moment.
    note: not torchrun itself: it puts each worker in a session of its own, where killing torchrun's group
    would leave the workers running. Like torchrun's agent, this process hosts the rendezvous store
    (TORCHELASTIC_USE_AGENT_STORE): it binds port 0 itself, so no other process can take the port first."""

    def __init__(self, args, nproc=2, env_extra=None):
        self.store = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=300), wait_for_workers=False)
        env = env_for_ranks(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.store.port),
                            TORCHELASTIC_USE_AGENT_STORE="True", WORLD_SIZE=str(nproc),
                            LOCAL_WORLD_SIZE=str(nproc), **(env_extra or {}))
        self.args = args
        self.procs = []
        self.logs = [tempfile.TemporaryFile("w+") for _ in range(nproc)]
        for rank in range(nproc):
            pgid = self.procs[0].pid if self.procs else 0
            self.procs.append(subprocess.Popen(
                [sys.executable] + [str(a) for a in args], cwd=ROOT,
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                stdout=self.logs[rank], stderr=subprocess.STDOUT, text=True,
                process_group=pgid))  # rank 0 leads a new group, the others join it

    def running(self):
        return all(p.poll() is None for p in self.procs)

    def kill(self):
        try:
            os.killpg(self.procs[0].pid, signal.SIGKILL)
        except ProcessLookupError:  # every rank has exited already
            pass
        for p in self.procs:
            p.wait()

    def log(self, rank):
        self.logs[rank].seek(0)
        return self.logs[rank].read()

    def finish(self, timeout=300, grace=20):
        """Wait for every rank to exit 0. A run past `timeout`, or ranks still running `grace` s after one
        failed, are aborted (their stacks land in their logs) and the test fails with every rank's log."""
        deadline = time.time() + timeout
        while any(p.poll() is None for p in self.procs):
            if any(p.poll() not in (None, 0) for p in self.procs):
                deadline = min(deadline, time.time() + grace)
            if time.time() > deadline:
                abort([p.pid for p in self.procs if p.poll() is None])
                time.sleep(5)  # time to write the stacks
                self.kill()
                break
            time.sleep(0.05)
        codes = [p.returncode for p in self.procs]
        if codes != [0] * len(codes):
            pytest.fail(f"ranks exited with {codes} (negative: killed by that signal; timeout {timeout} s): "
                        f"{' '.join(map(str, self.args))}\n" +
                        "\n".join(f"--- rank {k}\n{self.log(k)[-TAIL:]}" for k in range(len(self.procs))))
