"""Closed-world and open-world evaluation on seen and unseen classes (Fine-R1 paper, Tables 1 and 2).

The release's protocol (README "Release facts", eval/evaluation.py of the release): one prompt per image,
greedy decoding, the answer parsed from <answer>...</answer> and scored by text inclusion.

    python eval.py --unseen                                   # newest checkpoint of out/tapo | out/sft_cot | out/base
    python eval.py --model out/sft_cot/final --tag "CoT SFT"  # a checkpoint folder (or a run dir, or a preset)
    python eval.py --model /ckpt/Fine-R1-3B --data /data/eval/bird_seen.jsonl,/data/eval/bird_unseen.jsonl \\
        --image-root /data --siglip /ckpt/siglip
    torchrun --nproc_per_node 8 eval.py --model /ckpt/Fine-R1-7B --data /data/eval --image-root /data
    python eval.py --model out/tapo/final --samples 8 --temperature 1.0  # + avg@8 / pass@8 (PAPO's protocol)
    python eval.py --table out/eval/sft_cot:"CoT SFT" out/eval/tapo:"+ TAPO" --table-out out/results  # side by side

Closed world: "Given the question: ..., based on the options provided in [4 labels] ..." (data.closed_prompt).
    acc        release rule: normalised ground truth (lower, "_" -> " ") is a substring of the <answer> text;
               no <answer> tag is wrong (the release's whole-output fallback is in its open world only)
    exact      the answer block names the ground truth and nothing else (reward.strict_accuracy)
    format     <think>...</think> <answer>...</answer> and nothing else (reward.format_reward)
    no_option  the parsed answer contains none of the options (a missing answer counts)
Open world: "Given the question: .... This is a fine-grained question. ..." (data.open_prompt), no options.
    ti         text inclusion, release rule: ground truth substring of the answer (the whole output when the
               <answer> tag is missing); for cars only make + model (the label's last two words dropped)
    exact      as above
    ss_rel     max(0, (cos(pred, gt) - cos(super, gt)) / (1 - cos(super, gt))), SigLIP text embeddings
               (release: google/siglip-base-patch16-256), super = the super-category word ("bird", "car")
    avg@K      --samples K: mean acc (closed) / ti (open) of K answers sampled at --temperature; pass@K: share of
               items with a correct one among its K. Greedy figures are unchanged by --samples.
All figures are percentages, each with a 95% bootstrap interval over items (report.py). Averages are means
over datasets (as the paper); "overall" is the arithmetic mean of the seen and unseen averages (README
"Release facts": 74.68 = (77.43 + 71.94) / 2), not a harmonic mean.

Outputs in --out (default out/eval/<model name>):
    items.jsonl (items.rank{r}.jsonl under torchrun)   one line per item and mode, appended as batches finish:
        key, source (file:line), dataset, split, mode, order, options (as shown), ground_truth, super, prompt,
        output, finish, n_tokens, answer (parsed), correct, exact, format, no_option (closed) / ss_rel (open);
        sampled answers also sample, temperature (key "...|sample{k}@t{T}")
    summary.json   {"model", "tag", "settings", "closed": {"seen": {DATASET: {acc, exact, format, no_option,
                   truncated, [avg@K, pass@K,] n, ci: {metric: [lo, hi]}}, ..., "avg": {...}}, "unseen": {...},
                   "overall": {...}}, "open": {... ti, exact, ss_rel, format, truncated ...}}; ss_rel is null
                   without --siglip. A partial evaluation (--unseen, --mode, --limit, --samples, ...) writes
                   summary_<selection>.json (and report_<selection>.html) instead
    report.html    one self-contained page: tables, confusions, sampled items with image and response (report.py)
    run.json       what the outputs depend on (model weights, max_new_tokens, system prompt); resuming needs a match
A rerun skips every (file, line, mode, options order[, sample]) already in items*.jsonl; results of another
setup are renamed *.stale and redone. `--table` prints finished evaluations side by side with paired-bootstrap
marks, writes --table-out PATH.md/.json/.html and refreshes the runs' curves.png (report.compare).

Deliberate deviations from the release
--------------------------------------
1. Options are shuffled per item with a fixed seed (--seed): in every released line the ground truth is
   options[0] and the release never shuffles, so "always answer the first option" scores 100% there.
   `--options-order release` keeps the files' order, for comparison with published numbers.
2. Closed-world acc keeps the release's inclusion rule, so an answer listing all four options counts as
   correct (README Δ10); `exact` and `no_option` are reported beside it to expose that.
3. The super-category word is given per dataset (SUPER_CATEGORY). The release derives it from substrings of
   the image path ("aircraft", "birds", "cars", "flower", else "object"): with the released paths
   ("bird_200/...", dogs, pets) bird, dog and pet all get "object", which usually lowers cos(super, gt)
   and so raises their SS_rel. `--super-category release` reproduces that rule on the path as written in the file.
   The cars TI rule follows the super-category ("car"), as in the release.
4. SigLIP is loaded only from a local folder (--siglip); without it ss_rel is null ("unavailable"), never
   approximated. The release's SigLIP class also sets config.max_position_embeddings = 64 (already 64 for
   siglip-base-patch16-256); here texts are padded / truncated to min(64, the model's limit).
5. The answer span is the release's greedy `<answer>(.*)</answer>` (first <answer> to last </answer>),
   found with find / rfind so that it is linear in the output length.
6. Items are sorted by estimated prompt length and batched (length grouping); the release batches in file
   order. Greedy decoding makes each output independent of its batch up to numerics (README: measured rate);
   sampled answers draw from a generator seeded by (--seed, item, sample), so they do not depend on the batch
   either.
7. Settings are the release's (2048 new tokens, generation_config's repetition penalty, every eos id of it as a
   stop id); `--defaults world` (the default without --model / --data) caps responses at 256 tokens.
8. Metrics are recomputed from the stored outputs on every run, so flags that only affect scoring
   (--super-category) never need regeneration; ss_rel is recomputed when the super-category changed.
9. Outputs are rollout.decode's text (stop token dropped, other special tokens kept); the release decodes
   with skip_special_tokens=True. bf16 on CUDA as the release, float32 on CPU.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

import distributed
import report
import rollout
from data import (SYSTEM_PROMPT_R1, DataError, EvalItem, closed_prompt, encode_prompts, eval_name, load_eval,
                  load_image, open_prompt, parse_data_spec)
from checkpoint import newest_checkpoint
from policy import PRESETS, load_policy, stop_token_ids
from report import MODES, SPLITS
from reward import format_reward, release_eval_answer, release_label, strict_accuracy

# ----------------------------------------------------------------------------------------------------------
# Constants

# Where the embedded pipeline leaves checkpoints, most trained first: with no --model, the newest checkpoint
# of the first run dir that has one is evaluated.
DEFAULT_RUNS = ("out/tapo", "out/sft_cot", "out/base")
DEFAULT_DATA = "out/world"
# The embedded world's values (--defaults world): its rationales are short, its 112 x 112 images stay as they are.
# 128 sequences per generate call (since stop 38): on the 2-core CPU 20.0 s against 26-30 s at 32 for a TAPO model's
# whole eval, outputs identical on all 768 prompts (32 against 8: 16 vs 29 s for a closed-world half, identical)
WORLD = dict(max_new_tokens=256, min_pixels=0, max_pixels=0, micro_batch=128)
# Super-category word per dataset (the embedded world's domains are bird, flower, aircraft).
SUPER_CATEGORY = {"aircraft": "aircraft", "bird": "bird", "car": "car", "dog": "dog", "flower": "flower",
                  "pet": "pet"}


# ----------------------------------------------------------------------------------------------------------
# Work units: one (item, mode) prompt

@dataclass
class Unit:
    key: str          # "file:line|mode|order": what a resumed run recognises as done
    item: EvalItem
    mode: str         # "closed" | "open"
    order: str        # "release" | "shuffled@SEED" (closed), "-" (open)
    options: list     # as shown in the prompt (closed), [] (open)
    prompt: str
    super: str        # super-category word (open world)
    sample: int = None       # None: the greedy answer; k: the k-th of --samples sampled answers
    temperature: float = 0.0
    seed: int = 0            # of a sampled answer: depends only on (--seed, key), never on the batch


def sampled_units(units, k, temperature, seed=0):
    """k sampled copies of every unit, keyed "...|sample{j}@t{T}": a rerun with the same T resumes them."""
    return [replace(u, key=f"{u.key}|sample{j}@t{temperature:g}", sample=j, temperature=temperature,
                    seed=zlib.crc32(f"{seed}/{u.key}/{j}".encode()))
            for u in units for j in range(k)]


def shuffled_options(item, seed):
    """The item's options in a seeded order that depends only on (seed, file:line); the gt stays among them."""
    opts = list(item.options)
    random.Random(f"{seed}/{item.source}").shuffle(opts)
    return opts


def release_super_category(image_path):
    """The release's rule (eval_openworld): substrings of the image path as written in the eval file."""
    for sub, word in (("aircraft", "aircraft"), ("birds", "bird"), ("cars", "car"), ("flower", "flower")):
        if sub in image_path:
            return word
    return "object"


def super_category(dataset, image_path, rule="dataset"):
    if rule == "release":
        return release_super_category(image_path)
    d = dataset.lower()
    return SUPER_CATEGORY.get(d, SUPER_CATEGORY.get(d.rstrip("s"), "object"))


def make_units(items, modes=MODES, order="shuffled", seed=0, super_rule="dataset", raw_paths=None):
    """Units for every item and mode; raw_paths[i] is the image path as written in the file (release rule)."""
    units = []
    for i, it in enumerate(items):
        for mode in modes:
            if mode == "closed":
                opts = list(it.options) if order == "release" else shuffled_options(it, seed)
                tag = "release" if order == "release" else f"shuffled@{seed}"
                prompt = closed_prompt(it.question, opts)
            else:
                opts, tag, prompt = [], "-", open_prompt(it.question)
            raw = raw_paths[i] if raw_paths is not None else it.image
            units.append(Unit(f"{it.source}|{mode}|{tag}", it, mode, tag, opts, prompt,
                              super_category(it.dataset, raw, super_rule)))
    return units


# ----------------------------------------------------------------------------------------------------------
# Metrics (the release's rules, eval/evaluation.py)

def closed_correct(output, ground_truth):
    """Release closed world: gt substring of the answer; a missing or empty <answer> is wrong."""
    ans = release_eval_answer(output)
    return bool(ans) and release_label(ground_truth) in release_label(ans)


def matches_no_option(output, options):
    """The parsed answer contains none of the options (normalised); a missing answer matches none."""
    ans = release_eval_answer(output)
    return not ans or not any(release_label(o) in release_label(ans) for o in options)


def open_text(output):
    """What the release scores in the open world: the answer, or the whole output if there is none."""
    ans = release_eval_answer(output)
    return ans if ans else (output or "")


def text_inclusion(output, ground_truth, super_word):
    """Release open-world TI; cars (super "car"): " ".join(gt.lower().split()[:-2]) in output.lower()."""
    text = open_text(output).lower()
    if super_word == "car":
        return " ".join(ground_truth.lower().split()[:-2]) in text  # make + model, body type and year dropped
    return ground_truth.lower().replace("_", " ") in text


def score(unit, output, finish=None, n_tokens=None):
    """The per-item record of one unit's output (ss_rel is filled in separately, it needs SigLIP)."""
    it = unit.item
    rec = {"key": unit.key, "source": it.source, "dataset": it.dataset, "split": it.split, "mode": unit.mode,
           "order": unit.order, "image": it.image, "question": it.question, "options": unit.options,
           "ground_truth": it.ground_truth, "super": unit.super, "prompt": unit.prompt, "output": output,
           "finish": finish, "n_tokens": n_tokens, "answer": release_eval_answer(output),
           "exact": bool(strict_accuracy(output, it.ground_truth)), "format": bool(format_reward(output))}
    if unit.mode == "closed":
        rec["correct"] = closed_correct(output, it.ground_truth)
        rec["no_option"] = matches_no_option(output, unit.options)
    else:
        rec["correct"] = text_inclusion(output, it.ground_truth, unit.super)
        rec["ss_rel"] = None
    if unit.sample is not None:
        rec.update(sample=unit.sample, temperature=unit.temperature)
    return rec


def ss_rel(cos_pred_gt, cos_super_gt):
    """SS_rel = max(0, (cos(pred, gt) - cos(super, gt)) / (1 - cos(super, gt))) (paper section 5, release).
    note: a label identical to its super-category word (cos = 1) would divide by zero; it gets 0 here."""
    return ((cos_pred_gt - cos_super_gt) / (1 - cos_super_gt).clamp(min=1e-6)).clamp(min=0)


class SiglipText:
    """SigLIP text embeddings from a local SiglipModel folder only; `scorer(preds, gts, supers) -> [ss_rel]`."""

    def __init__(self, path, device="cpu"):
        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"--siglip {path}: not a local model folder (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except ImportError as e:  # SiglipTokenizer is sentencepiece-based
            raise ImportError(f"--siglip {path}: its tokenizer needs `pip install sentencepiece protobuf` ({e})") from e
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_length = min(64, cfg.max_position_embeddings)  # release: padding="max_length", 64 tokens
        self.device = device

    @torch.no_grad()
    def embed(self, texts):
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        f = self.model.get_text_features(**enc)
        f = f if torch.is_tensor(f) else f.pooler_output  # transformers 5 returns a model output
        return F.normalize(f.float(), dim=-1)  # (N, D)

    def __call__(self, preds, gts, supers):
        pred, gt, sup = self.embed(preds), self.embed(gts), self.embed(supers)
        return ss_rel((pred * gt).sum(-1), (sup * gt).sum(-1)).tolist()


def fill_ss(records, scorer, batch_size=64):
    """Compute ss_rel in place for open-world records that lack it."""
    todo = [r for r in records if r["mode"] == "open" and r.get("ss_rel") is None]
    for s in range(0, len(todo), batch_size):
        rs = todo[s:s + batch_size]
        vals = scorer([open_text(r["output"]) for r in rs], [r["ground_truth"] for r in rs], [r["super"] for r in rs])
        for r, v in zip(rs, vals):
            r["ss_rel"] = float(v)


# ----------------------------------------------------------------------------------------------------------
# Generation and the sharded, resumable loop

def make_responder(model, processor, max_new_tokens, system=None, generate=None, decode=None,
                   repetition_penalty=1.0):
    """respond(images, prompts, temperature=None, seeds=None) -> [{"output", "finish", "n_tokens"}]: greedy
    rollout.generate (sampled at `temperature` from per-prompt `seeds` if given), stopping at every eos id of
    the generation config, with HF's repetition penalty. `generate` / `decode` default to rollout.py's."""
    generate, decode = generate or rollout.generate, decode or rollout.decode
    tok = processor.tokenizer
    stop_ids = stop_token_ids(model, tok)  # every eos of generation_config, as HF generate in the release
    param = next(model.parameters())

    @torch.no_grad()
    def respond(images, prompts, temperature=None, seeds=None):
        batch = encode_prompts(processor, images, prompts, system)  # left-padded
        batch = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
                 if torch.is_tensor(v) else v for k, v in batch.items()}
        ro = generate(model, batch, n=1, max_new_tokens=max_new_tokens, greedy=temperature is None,
                      temperature=temperature or 1.0, seeds=seeds, stop_ids=stop_ids, pad_id=tok.pad_token_id,
                      repetition_penalty=repetition_penalty)
        rows = [None] * len(prompts)
        for r, (i, text) in enumerate(zip(ro.prompt_index.tolist(), decode(tok, ro))):
            rows[i] = {"output": text, "finish": ro.finish[r], "n_tokens": int(ro.lengths[r])}
        return rows
    return respond


def _as_row(x):
    return {"output": x, "finish": None, "n_tokens": None} if isinstance(x, str) else x


def _length(unit):
    """Estimated prompt tokens: ~4 characters per token + one token per 28x28 pixels (Qwen2.5-VL merge).
    Opens the image header only: a missing image fails here, naming it."""
    path = unit.item.image
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"{unit.item.source}: image {path} not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{unit.item.source}: image {path} is unreadable ({type(e).__name__})") from None
    return len(unit.prompt) // 4 + (w * h) // (28 * 28)


def evaluate(units, respond, out, dist=None, batch_size=8, ss_scorer=None, progress=True, pixels=(None, None)):
    """Generate every unit not yet in out/items*.jsonl, append results, return all records (rank 0; [] else).

    Sharded by stride over ranks; each rank runs the same number of respond() calls (short ranks repeat a
    unit whose result is discarded), as FSDP / rollout's sync require. Greedy units are batched first, then
    sampled ones (respond(..., temperature, seeds)), never mixed. Records are re-scored from outputs."""
    dist = dist or distributed.Dist(0, 1, 0, torch.device("cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = report.load_records(out)
    keys = [u.key for u in units]
    assert len(set(keys)) == len(keys), "duplicate eval items (two files with the same name?)"
    pending = [u for u in units if u.key not in done]
    # collective: every rank has read the files before any rank appends to them; all must agree on the work
    counts = distributed.all_gather_objects(len(pending))
    assert len(set(counts)) == 1, f"ranks disagree on the pending work: {counts}"
    batches = []  # (this rank's units, a unit to repeat when it has none left)
    for phase in ([u for u in pending if u.sample is None], [u for u in pending if u.sample is not None]):
        mine = phase[dist.rank::dist.world]
        lengths = {u.key: _length(u) for u in mine}
        mine.sort(key=lambda u: -lengths[u.key])  # length grouping: longest first, so memory peaks early
        n = math.ceil(math.ceil(len(phase) / dist.world) / batch_size) if phase else 0
        batches += [(mine[b * batch_size:(b + 1) * batch_size], phase[0]) for b in range(n)]
    n_batches = len(batches)
    dist.print(f"eval: {len(units)} prompts, {len(units) - len(pending)} done, {len(pending)} to generate on "
               f"{dist.world} rank(s), {n_batches} batches of {batch_size} | {out}")
    path = out / ("items.jsonl" if dist.world == 1 else f"items.rank{dist.rank}.jsonl")
    new = []
    bar = None
    if progress and dist.master and n_batches:
        bar = tqdm(total=n_batches, desc=f"eval ({batch_size} x {dist.world} prompts per batch)", unit="batch",
                   dynamic_ncols=True)
    with open(path, "a+b") as f:  # binary: check the last byte
        if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            f.write(b"\n")  # end the line an interrupted run left half-written
        for batch, spare in batches:
            # ---- batch (a short rank repeats a unit: every rank makes n_batches respond() calls)
            real = len(batch)
            batch = batch or [spare]
            # ---- generation: greedy, or sampled from per-unit seeds (independent of the batch)
            images = [load_image(u.item.image, None, *pixels) for u in batch]  # the pixel budget, if any
            prompts = [u.prompt for u in batch]
            rows = respond(images, prompts) if batch[0].sample is None else \
                respond(images, prompts, temperature=batch[0].temperature, seeds=[u.seed for u in batch])
            rows = [_as_row(x) for x in rows]
            assert len(rows) == len(batch), f"respond() gave {len(rows)} outputs for {len(batch)} prompts"
            # ---- score, append (the padding unit's result is dropped)
            recs = [score(u, r["output"], r.get("finish"), r.get("n_tokens")) for u, r in zip(batch, rows)]
            if ss_scorer is not None:
                fill_ss(recs, ss_scorer)
            for rec in recs[:real]:
                f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            new += recs[:real]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    gathered = distributed.all_gather_objects(new)  # collective: rank 0 receives every rank's new records
    if not dist.master:
        return []
    done.update({r["key"]: r for rs in gathered for r in rs})
    records = []
    for u in units:  # re-score stored outputs with today's rules; keep ss_rel if its super-category held
        old = done[u.key]
        rec = score(u, old["output"], old.get("finish"), old.get("n_tokens"))
        if u.mode == "open" and old.get("super") == u.super:
            rec["ss_rel"] = old.get("ss_rel")
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------------------
# Model, data and outputs

def resolve_model(name):
    """(checkpoint path or preset, why): --model as given, a run dir's newest checkpoint, or DEFAULT_RUNS."""
    if name is None:
        for run in DEFAULT_RUNS:
            ckpt = newest_checkpoint(run)
            if ckpt is not None:
                return str(ckpt), f"newest checkpoint of {run}"
        sys.exit(f"eval.py: no --model given and no checkpoint in {', '.join(DEFAULT_RUNS)}; run `bash run.sh` "
                 "(or `python sft.py` / `python tapo.py`) first, or pass --model PRESET|FOLDER")
    if name in PRESETS:
        return name, "preset"
    p = Path(name)
    if not (p / "config.json").exists() and newest_checkpoint(p) is not None:
        return str(newest_checkpoint(p)), f"newest checkpoint of {p}"
    return name, "--model"


def model_label(path):
    """A short name: "tiny", "Fine-R1-3B", "tapo" for out/tapo/final, "tapo_step_40" for out/tapo/step_40."""
    p = Path(str(path).rstrip("/"))
    return p.parent.name if p.name == "final" else f"{p.parent.name}_{p.name}" if p.name.startswith("step_") else p.name


def summary_name(args):
    """summary.json for the full default evaluation, else e.g. summary_unseen.json, summary_closed_limit8.json,
    so that a partial rerun never overwrites the full summary (run.sh's table reads summary.json)."""
    parts = [args.mode] if args.mode != "both" else []
    parts += [s for s in SPLITS if getattr(args, s)] if args.seen != args.unseen else []
    parts += ["release-order"] if args.options_order == "release" else []
    parts += [f"seed{args.seed}"] if args.seed else []
    parts += ["release-super"] if args.super_category == "release" else []
    parts += [f"limit{args.limit}"] if args.limit else []
    parts += [f"samples{args.samples}-t{args.temperature:g}"] if args.samples else []
    return "_".join(["summary"] + parts) + ".json"


def weights_fingerprint(path):
    """Sizes and mtimes of a folder's config and weights (a retrained checkpoint at the same path differs)."""
    p = Path(path)
    if not p.is_dir():
        return str(path)
    files = sorted(f for f in p.iterdir() if f.name == "config.json" or f.suffix in (".safetensors", ".bin"))
    return hashlib.sha1(json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()
                        ).hexdigest()[:16]


def find_eval_files(paths, splits):
    """Eval files named {dataset}_{seen|unseen}.jsonl: given directly, or every such file in a folder."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.glob("*.jsonl") if eval_name(f)[1])
            if not found:
                raise DataError(f"{p}: no *_seen.jsonl / *_unseen.jsonl eval files"
                                + (" (run `python world.py --out out/world`)" if str(p) == DEFAULT_DATA else ""))
            files += found
        elif p.is_file():
            if not eval_name(p)[1]:
                raise DataError(f"{p}: cannot tell seen / unseen; name eval files {{dataset}}_{{seen|unseen}}.jsonl")
            files.append(p)
        else:
            raise DataError(f"{p}: no such eval file or folder"
                            + (" (run `python world.py --out out/world`)" if str(p) == DEFAULT_DATA else ""))
    names = [f.name for f in files]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DataError(f"two eval files with the same name {sorted(dup)}: results are keyed by file name")
    return [f for f in files if eval_name(f)[1] in splits]


def load_items(files, image_root=None, limit=None):
    """(items, raw image paths as written in the files) of every file, at most `limit` per file."""
    items, raw = [], []
    for f in files:
        root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(f))
        its = load_eval(f, image_root=image_root, check_images=False)[:limit]  # images checked when batched
        items += its
        raw += [i.image[len(root) + 1:] if i.image.startswith(root + os.sep) else i.image for i in its]
    return items, raw


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--model", default=None, help="preset, HF folder or run dir; default: newest checkpoint of "
                   + " | ".join(DEFAULT_RUNS))
    p.add_argument("--tag", default=None, help="row label in the table (e.g. 'CoT SFT'); default: model name")
    p.add_argument("--system-prompt", choices=("default", "r1"), default="default",
                   help="default: no system message (Qwen's default, as the release's eval); r1: data.SYSTEM_PROMPT_R1")
    p.add_argument("--defaults", choices=("release", "world"), default=None,
                   help="values of the flags marked 'world:': release (the defaults shown) or world (WORLD at the "
                   "top of eval.py). Default: world when neither --model nor --data is given, else release")
    # Data
    p.add_argument("--data", default=None, help="comma-separated eval JSONL files {dataset}_{seen|unseen}.jsonl "
                   f"or folders holding them (default {DEFAULT_DATA})")
    p.add_argument("--image-root", default=None, help="root of relative image paths; default: each file's folder")
    p.add_argument("--seen", action="store_true", help="seen-class files only (default: seen and unseen)")
    p.add_argument("--unseen", action="store_true", help="unseen-class files only (default: seen and unseen)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per file (quick checks)")
    p.add_argument("--min-pixels", type=int, default=0, help="pre-resize images smaller than this up (0 = off: "
                   "the checkpoint's processor limits, as the release's eval; world: 0)")
    p.add_argument("--max-pixels", type=int, default=0, help="pre-resize images larger than this down (0 = off; "
                   "world: 0)")
    # Protocol
    p.add_argument("--mode", choices=("closed", "open", "both"), default="both",
                   help="closed world, open world or both (default)")
    p.add_argument("--options-order", choices=("shuffled", "release"), default="shuffled",
                   help="shuffled (default): seeded per item; release: the files' order (gt always first there)")
    p.add_argument("--seed", type=int, default=0, help="seed of the option shuffling and of sampled answers")
    p.add_argument("--super-category", choices=("dataset", "release"), default="dataset",
                   help="dataset (default): SUPER_CATEGORY word; release: path substrings (bird/dog/pet -> 'object')")
    p.add_argument("--siglip", default=None, help="local SigLIP folder (google/siglip-base-patch16-256) for SS_rel")
    # Generation
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward pass (generate call) per "
                   "rank (release: 8; world: 128); results do not depend on it")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="response length cap (release: 2048; world: 256)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="HF repetition penalty of greedy "
                   "decoding (default: the checkpoint's generation_config, as the release's HF generate; 1 = off)")
    p.add_argument("--samples", type=int, default=0,
                   help="K > 0: also K sampled answers per prompt, scored as avg@K and pass@K (PAPO: avg@8)")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled answers (default 1.0, PAPO)")
    # Output
    p.add_argument("--out", default=None, help="results folder; default out/eval/<model name>. A rerun resumes: "
                   "items already in it are not generated again")
    p.add_argument("--table", nargs="+", default=None, metavar="DIR[:TAG]",
                   help="only print finished evaluations (DIR/summary.json or a summary*.json) side by side")
    p.add_argument("--table-out", default=None, help="with --table: also write PATH.md, PATH.json, PATH.html")
    pre, _ = p.parse_known_args(argv)
    profile = pre.defaults or ("world" if pre.model is None and pre.data is None else "release")
    if profile == "world":
        p.set_defaults(**WORLD)
    args = p.parse_args(argv)
    args.defaults = profile
    try:
        args.data = [path for path, w in parse_data_spec(args.data or DEFAULT_DATA)]
    except DataError as err:
        p.error(str(err))
    if args.micro_batch < 1:
        p.error("--micro-batch must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.samples < 0 or args.temperature <= 0:
        p.error("--samples must be >= 0 and --temperature > 0")
    return args


def main(argv=None, respond=None):
    """CLI entry; `respond(images, prompts) -> [str | {"output", ...}]` replaces the model (tests)."""
    args = parse_args(argv)
    if args.table:
        return report.compare(args.table, args.table_out)
    dist = distributed.setup()
    splits = tuple(s for s in SPLITS if getattr(args, s)) or SPLITS
    modes = MODES if args.mode == "both" else (args.mode,)
    try:
        files = find_eval_files(args.data, splits)
        items, raw = load_items(files, args.image_root, args.limit)
    except DataError as err:
        raise SystemExit(f"eval.py: bad data: {err}") from None
    units = make_units(items, modes, args.options_order, args.seed, args.super_category, raw)
    units += sampled_units(units, args.samples, args.temperature, args.seed)

    # ---- model
    max_new, penalty = args.max_new_tokens, args.repetition_penalty or 1.0
    if respond is None:
        model_path, why = resolve_model(args.model)
        dist.print(f"model: {model_path} ({why})")
        dtype = torch.bfloat16 if dist.device.type == "cuda" else torch.float32  # release eval: bf16
        model, processor = load_policy(model_path, dtype=dtype, device=dist.device)
        if args.repetition_penalty is None:  # the release's HF generate applies generation_config's
            penalty = float(getattr(model.generation_config, "repetition_penalty", None) or 1.0)
        respond = make_responder(model, processor, max_new, SYSTEM_PROMPT_R1 if args.system_prompt == "r1" else None,
                                 repetition_penalty=penalty)
        fingerprint = weights_fingerprint(model_path)
    else:
        model_path, fingerprint = args.model or "injected", "injected"
    label = model_label(model_path)
    out, tag = Path(args.out or Path("out/eval") / label), args.tag or label
    scorer = SiglipText(args.siglip, dist.device) if args.siglip else None
    settings = {"model": os.path.abspath(model_path) if os.path.isdir(model_path) else str(model_path),
                "weights": fingerprint, "max_new_tokens": max_new, "system_prompt": args.system_prompt,
                "repetition_penalty": penalty, "pixels": [args.min_pixels, args.max_pixels]}
    dist.print("config: " + json.dumps({**vars(args), "out": str(out), "tag": tag, "max_new_tokens": max_new,
                                        "files": [str(f) for f in files]}))

    # ---- resume only what this setup generated; anything else is set aside
    if dist.master:
        out.mkdir(parents=True, exist_ok=True)
        run_file = out / "run.json"
        old = json.loads(run_file.read_text()) if run_file.exists() else settings
        if old != settings:
            print(f"eval: {out} holds results of another setup ({old}); renamed to *.stale, starting fresh")
        for p in out.glob("items*.jsonl"):
            if old != settings:
                p.rename(p.with_name(p.name + ".stale"))
        run_file.write_text(json.dumps(settings, indent=1) + "\n")
    distributed.all_gather_objects(None)  # collective: other ranks wait until stale files are set aside

    records = evaluate(units, respond, out, dist, args.micro_batch, scorer, pixels=(args.min_pixels, args.max_pixels))
    if dist.master:
        if scorer is not None:
            fill_ss(records, scorer)  # resumed records from a run without --siglip
        summary = report.summarise(records, model=str(model_path), tag=tag,
                                   settings={**settings, "options_order": args.options_order, "seed": args.seed,
                                             "super_category": args.super_category, "siglip": args.siglip,
                                             "files": [str(f) for f in files], "limit": args.limit,
                                             "samples": args.samples, "temperature": args.temperature})
        name = summary_name(args)
        (out / name).write_text(json.dumps(summary, indent=1) + "\n")
        report.print_tables(summary, tag)
        report.write_html(out / name.replace("summary", "report").replace(".json", ".html"), {tag: (summary, records)})
        print(f"\nwrote {out / name}, {out / name.replace('summary', 'report').replace('.json', '.html')}")
    distributed.teardown()  # no DDP model here, so no Reducer to race with (distributed.teardown)
    return summary if dist.master else None


if __name__ == "__main__":
    main()
