"""Checkpoints: ordinary HF folders plus resume state, crash-safe at every instant, verified before use, no pickle.

    save_checkpoint(run / "step_40", model, processor, state={...}, rank=dist.rank,
                    optimizer_state=optimizer_state(model, opt))   # collective; every rank calls both
    resume = resume_checkpoint("auto", run)                        # collective: newest complete one, or None
    ts = load_trainer_state(resume)                                # {"state": {...}, "optimizer": {...} | None}
    load_optimizer_state(model, opt, ts["optimizer"])

A checkpoint folder (`step_N` or `final` under the run folder):

    config.json, generation_config.json, model.safetensors   the HF model (from_pretrained works on the folder)
    tokenizer*, *_config.json, chat_template.jinja           the processor
    trainer_state.json          loop state (step, args, data position, RNG) and the optimizer's hyper-parameters;
                                every tensor in it is a reference {"__tensor__": key} into
    trainer_state.safetensors   optimizer moments, RNG states
    manifest.json               written last: the step and every file's size and sha256

Loading reads JSON and safetensors only, so a checkpoint folder from anyone can be resumed without running
code from it (a `torch.load` of a pickle can). Tuples, numpy arrays and dicts with non-string keys (the
optimizer's integer parameter ids) are written as tagged JSON objects and rebuilt as plain data.

Save protocol (rank 0), for a target P:
  1. write everything into P.tmp, fsync each file, write manifest.json, fsync it and the folder;
  2. if P exists, rename P -> P.old; rename P.tmp -> P; fsync the run folder; delete P.old.
At every instant a complete checkpoint is on disk under a name the resume picks: P until step 2, then
P.old (also a candidate, see `newest_checkpoint`), then the new P. P.tmp is never picked, so a save killed
or out of disk half way leaves nothing half-written where `--resume` looks. A checkpoint counts only when
its manifest matches the files (sizes; sha256 too for the one a resume is about to use).

note: before the first optimizer step there are no moments, and torch's `get_optimizer_state_dict` would
make some (a zero-gradient `step()` at lr 0, which moves AdamW's step count and breaks exact resume; under
FSDP2 after a forward without backward it dies with a KeyError). `optimizer_state` returns None then and
the resumed run starts with a fresh optimizer, exactly as the uninterrupted run continues.
"""
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import distributed

MANIFEST = "manifest.json"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
FORMAT = 1
NAME = re.compile(r"^(?:step_(\d+)|final)(\.old)?$")


class CheckpointError(RuntimeError):
    pass


def _warn(msg):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# RNG, model and optimizer state

def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dict(model):
    """Full (unsharded) CPU state dict, collectively on every rank; works for plain, DDP and FSDP2 models."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    model = distributed.unwrap(model)
    if distributed.uses_fsdp(model):
        # collective: every rank must call this (all-gathers each shard), rank 0 receives the tensors
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(model, optimizer):
    """The optimizer's full state dict, or None before its first step (collective under FSDP2).

    note: "no step yet" is the same on every rank (steps are taken in lockstep), so either every rank
    skips the collective or none does.
    """
    if not optimizer.state:
        return None
    model = distributed.unwrap(model)
    if distributed.uses_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        for m in model.modules():  # a forward without backward leaves FSDP2 units unsharded
            if hasattr(m, "reshard"):
                m.reshard()
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state):
    """Inverse of `optimizer_state`; None leaves the fresh optimizer (the save came before any step).
    Under FSDP2 every rank passes the full dict and keeps its shard."""
    if state is None:
        return
    model = distributed.unwrap(model)
    if distributed.uses_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------
# Trainer state as JSON + safetensors

def _encode(obj, tensors, key):
    """A JSON-able copy of obj; tensors / arrays go to `tensors` under `key` and leave a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        for k in obj:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"trainer state {key}: dict key {k!r} is not a JSON value")
        return {"__items__": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    raise TypeError(f"trainer state {key}: cannot store a {type(obj).__name__} without pickle")


def _decode(obj, tensors):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def write_trainer_state(folder, state, optimizer_state=None):
    """trainer_state.json + trainer_state.safetensors in `folder` (not fsynced; save_checkpoint does that)."""
    tensors = {}
    doc = {"format": FORMAT, "state": _encode(state, tensors, "state"),
           "optimizer": _encode(optimizer_state, tensors, "optimizer")}
    save_file(tensors, str(Path(folder) / STATE_TENSORS))
    (Path(folder) / STATE_JSON).write_text(json.dumps(doc))


def load_trainer_state(ckpt_dir):
    """{"state": ..., "optimizer": ...} as saved; reads JSON and safetensors only, never unpickles."""
    d = Path(ckpt_dir)
    f = d / STATE_JSON
    if not f.exists():
        if (d / "trainer_state.pt").exists():
            raise CheckpointError(f"{d}/trainer_state.pt: a pickled resume state (written before checkpoint.py); "
                                  "not loaded, because unpickling a file can run any code it carries")
        raise FileNotFoundError(f"{f}: no resume state in this checkpoint (was it written by sft.py / tapo.py?)")
    doc = json.loads(f.read_text())
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{f}: trainer state format {doc.get('format')!r}, expected {FORMAT}")
    tensors = load_file(str(d / STATE_TENSORS))
    return {"state": _decode(doc["state"], tensors), "optimizer": _decode(doc["optimizer"], tensors)}


# ----------------------------------------------------------------------------------------------------------
# Manifest and verification

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path, hashes=False):
    """None if the folder matches its manifest (every file present, same size; same sha256 with `hashes`),
    else a sentence saying what is wrong."""
    path = Path(path)
    try:
        man = json.loads((path / MANIFEST).read_text())
        files = man["files"]
    except FileNotFoundError:
        return f"{path}: no {MANIFEST} (an interrupted save, a partial copy, or written before checkpoint.py)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}/{MANIFEST} unreadable ({type(e).__name__}: {e})"
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"{f}: missing (listed in {MANIFEST})"
        size = f.stat().st_size
        if size != rec["bytes"]:
            return f"{f}: {size} bytes, {MANIFEST} says {rec['bytes']} (truncated or changed)"
        if hashes and _sha256(f) != rec["sha256"]:
            return f"{f}: sha256 differs from {MANIFEST} (corrupted or changed)"
    return None


def _candidates(run_dir):
    """Checkpoint folders under run_dir, newest first: by saved step, then final before step_N, then P before
    P.old (P.old is the previous checkpoint while a save of P swaps folders)."""
    out = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = NAME.match(p.name)
        if not m or not p.is_dir():
            continue
        try:
            step = int(json.loads((p / MANIFEST).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = -1
        if step < 0 and m.group(1):
            step = int(m.group(1))
        out.append(((step, m.group(1) is None, m.group(2) is None), p))
    return [p for _, p in sorted(out, key=lambda t: t[0], reverse=True)]


def newest_checkpoint(run_dir, hashes=False):
    """The newest complete checkpoint folder under run_dir (step_N, final, or a P.old left by a killed save),
    or None. Newer folders that fail verification are skipped with a warning naming what is wrong."""
    for p in _candidates(run_dir):
        problem = verify_checkpoint(p, hashes)
        if problem is None:
            return p
        _warn(f"skipping checkpoint: {problem}")
    return None


def resume_checkpoint(resume, run_dir):
    """The checkpoint to resume from for `--resume` (None, 'auto' or a folder), verified with hashes.

    Collective: rank 0 verifies and every rank gets its answer. 'auto' falls back to older complete
    checkpoints (warning for each skipped one); an explicit folder that fails verification is an error.
    """
    if resume is None:
        return None
    pick, err = None, None
    if int(os.environ.get("RANK", "0")) == 0:
        if resume == "auto":
            pick = newest_checkpoint(run_dir, hashes=True)
        else:
            err = verify_checkpoint(resume, hashes=True)
            pick = None if err else Path(resume)
    pick, err = distributed.all_gather_objects((str(pick) if pick else None, err))[0]  # collective: rank 0's pick
    if err:
        raise CheckpointError(f"--resume {resume}: {err}")
    return Path(pick) if pick else None


# ----------------------------------------------------------------------------------------------------------
# Saving

def _write_folder(tmp, model, sd, processor, state, optimizer_state, step):
    tmp.mkdir(parents=True)
    distributed.unwrap(model).save_pretrained(tmp, state_dict=sd, safe_serialization=True)
    processor.save_pretrained(tmp)
    if state is not None or optimizer_state is not None:
        write_trainer_state(tmp, state, optimizer_state)
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(f)  # data on disk before the manifest can vouch for it
        files[str(f.relative_to(tmp))] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    man = tmp / MANIFEST
    man.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    _fsync(man)
    _fsync(tmp)


def _swap_in(tmp, out_dir):
    """Rename tmp to out_dir so that a complete checkpoint is picked at every instant (module docstring)."""
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        os.replace(out_dir, old)  # from here until the next rename, P.old is the newest complete checkpoint
        _fsync(out_dir.parent)
    os.replace(tmp, out_dir)
    _fsync(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)  # older than out_dir now; a leftover is cleared by the next save


def _clear_leftovers(out_dir):
    """Remove what a killed earlier save of out_dir left, keeping one complete copy: P.tmp always goes;
    P.old goes when P verifies, else the broken P goes and P.old stays the previous checkpoint."""
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    if old.exists():
        if out_dir.exists() and verify_checkpoint(out_dir) is None:
            shutil.rmtree(old)
        elif out_dir.exists():
            shutil.rmtree(out_dir)


def save_checkpoint(out_dir, model, processor, state=None, rank=0, optimizer_state=None):
    """Write an HF folder (config, safetensors, processor) plus the resume state and a manifest, crash-safely.

    Collective under FSDP2 (call on every rank: it gathers the weights). `state`: plain data needed to resume
    (step, config, data position, RNG; tensors and numpy arrays allowed); `optimizer_state`: from
    `optimizer_state()`. A failed write (disk full, ...) raises CheckpointError on rank 0, naming the cause,
    and leaves the previous checkpoint as it was.
    """
    sd = full_state_dict(model)  # collective under FSDP2
    out_dir = Path(out_dir)
    err = None
    if rank == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        step = state.get("step", -1) if isinstance(state, dict) else -1
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            _clear_leftovers(out_dir)
            _write_folder(tmp, model, sd, processor, state, optimizer_state, step)
            _swap_in(tmp, out_dir)
        except Exception as e:  # disk full, permissions, a serializer's own error type: report, keep the previous
            shutil.rmtree(tmp, ignore_errors=True)
            prev = [p for p in (out_dir, out_dir.with_name(out_dir.name + ".old")) if p.exists()]
            why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
            err = (f"saving {out_dir} failed: {type(e).__name__}: {why}; "
                   + (f"the previous checkpoint {prev[0]} is intact" if prev else "there was no previous checkpoint")
                   + f"; the partial {tmp.name} was removed")
    # note: no collective after the write. Rank 0 raising ends the job under torchrun (it stops the other
    # ranks); an extra gather here, right before teardown, hit a torch race: ProcessGroupGloo's destructor
    # (run with the GIL held when DDP's Reducer is freed) joins a gloo thread that still waits for the GIL to
    # free the gather's tensors (measured: 4 hangs in 17 two-rank TAPO runs).
    if err:
        raise CheckpointError(err)
