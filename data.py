"""Data layer: the release's three file formats, the ONE prompt / chat construction, batching, real-data builders.

Formats (REFERENCE.md section 4, samples in shared/formats/), read with a clear error naming the file and the
line (JSONL, 1-based) or record index (JSON), or the image path, for any malformed record:

    load_stage1(path)  Stage-1 SFT JSON list of {"messages": [system?, user, assistant], "images": [path]}
                       -> [SFTSample]   (also the world's pretraining corpus; text-only samples have no image)
    load_stage2(path)  Stage-2 RL JSONL {"images", "problem", "answer", "image_noisy" (positive),
                       "image_aug" (negative)} -> [RLRow]
    load_eval(path)    eval JSONL {"image_path", "question", "options", "ground_truth"}, one file per
                       "{dataset}_{seen|unseen}.jsonl" -> [EvalItem]
Relative image paths resolve against `image_root`, by default the data file's folder.

Prompts and chat, shared by sft.py, tapo.py / rollout.py and eval.py:

    rl_prompt(problem)            problem + RL_SUFFIX (the release's RL format prompt, cls_thinking.jinja)
    closed_prompt(q, options)     the release's closed-world eval prompt ({Options} is str(list))
    open_prompt(q)                the release's open-world eval prompt
    chat_messages(text, has_image, system=None) -> Qwen chat messages (image first, then text)
    encode_prompts(processor, images, texts)    -> left-padded generation batch
    encode_responses / join_prompt_response / encode_pairs -> [prompt | response] batch with response_mask

Builders: `build_from_image_folder(root, out_dir, ...)` turns a one-folder-per-class dataset into a seen /
unseen split, a k-shot TAPO triplet file and closed-world eval files, with hard negatives / distractors from
the loaded policy's mean-pooled vision-tower features (policy.image_embeddings). CLI:

    python data.py check out/world/*.json*                                 # parse + check images, counts
    python data.py build /data/cub/images --out data/cub --policy tiny     # image folder -> release files

Deliberate choices
------------------
1. System prompt (REFERENCE.md Δ14): the release's SFT used SYSTEM_PROMPT_R1, its RL and eval used none (so
   the Qwen template inserted "You are a helpful assistant."). Here every stage builds its chat with
   `chat_messages(..., system=None)` by default, i.e. the RL / eval prompt, so that SFT trains on exactly
   the conversation the model later sees; stages offer `--system-prompt r1` to pass SYSTEM_PROMPT_R1 (the
   release's SFT). A Stage-1 file's own system message is reported in `SFTSample.system` but not applied.
2. RL_SUFFIX is the release's `cls_thinking.jinja`: the problem (trimmed), a blank line, then the instruction.
3. One image per sample / row (the release never uses more); a second image is a DataError.
4. The builder writes paths relative to `out_dir` and does not copy images: a triplet's positive and negative
   are resized to the anchor's size at load time (`load_triplet`), as the release's RL requires.
"""
import argparse
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

# ----------------------------------------------------------------------------------------------------------
# Prompts (the release's strings, verbatim)

SYSTEM_PROMPT_R1 = (  # shared/formats/stage1_cot_sft.sample.json, system message
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>")
# TAPO/examples/format_prompt/cls_thinking.jinja: "{{ content | trim }}\n\nYou first think ..."
RL_SUFFIX = ("\n\nYou first think through the reasoning process as an internal monologue, enclosed within "
             "<think> </think> tags. Then, provide your final answer enclosed within <answer> </answer> tags.")
CLOSED_TEMPLATE = (  # eval/evaluation.py, eval_closedworld
    "Given the question: {Question}, based on the options provided in {Options}, output the thinking process "
    "in <think> </think> and final choice in <answer> </answer> tags. The response format should be: "
    "<think>...</think> <answer>choice</answer>.")
OPEN_TEMPLATE = (  # eval/evaluation.py, eval_openworld
    "Given the question: {Question}. This is a fine-grained question. Output reasoning in <think></think> and "
    "the final answer in <answer></answer>.")
IMAGE_TOKEN = "<image>"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def closed_prompt(question, options):
    return CLOSED_TEMPLATE.format(Question=question, Options=list(options))


def open_prompt(question):
    return OPEN_TEMPLATE.format(Question=question)


def rl_prompt(problem):
    return problem.replace(IMAGE_TOKEN, "").strip() + RL_SUFFIX


# ----------------------------------------------------------------------------------------------------------
# Records

class DataError(ValueError):
    """A malformed record or a bad image; the message names the file and line / record index, or the image."""


@dataclass
class SFTSample:
    image: str | None   # absolute path, None for a text-only sample
    question: str       # user text, "<image>" removed
    answer: str         # assistant text
    system: str | None  # the file's system prompt, or None (reported, not applied: see the docstring)
    source: str         # "file.json:#index"


@dataclass
class RLRow:
    image: str          # anchor x
    positive: str       # x_pos (release key "image_noisy")
    negative: str       # x_neg (release key "image_aug")
    problem: str        # "<image>" removed, stripped
    answer: str
    source: str         # "file.jsonl:line"


@dataclass
class EvalItem:
    image: str
    question: str
    options: list = field(default_factory=list)
    ground_truth: str = ""
    dataset: str = ""   # from the file name "{dataset}_{seen|unseen}.jsonl"
    split: str = ""     # "seen" / "unseen" ("" when the name does not say)
    source: str = ""


def normalise_label(s):
    """The release's label normalisation (eval/evaluation.py): lower case, "_" -> " "."""
    return str(s).lower().replace("_", " ").strip()


def load_image(path, size=None, where=None):
    """An RGB PIL image; DataError naming the row (`where`, e.g. "rl_train.jsonl:12") and the file when it is
    missing or unreadable; optional resize to (w, h).

    note: files are checked (header only) when the data is read; a file deleted or corrupted after that fails
    here, mid-run, and stops the run rather than being skipped: a skipped row would change the optimisation and
    break exact resume, and a vanished image usually means the whole image store went (an unmounted disk),
    which skipping would hide. The last checkpoint is untouched; fix the files and `--resume auto`.
    """
    row = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{row}image {path} not found (deleted or moved after the data was read?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{row}image {path} is unreadable ({type(e).__name__}: {e})") from None
    if size is not None and tuple(im.size) != tuple(size):
        im = im.resize(tuple(size), Image.BICUBIC)
    return im


def load_triplet(row):
    """(anchor, positive, negative) images of an RLRow, positive and negative resized to the anchor's size
    (prompt tokens and M-RoPE positions are computed once, from the anchor: REFERENCE.md section 4)."""
    anchor = load_image(row.image, where=row.source)
    return anchor, load_image(row.positive, anchor.size, row.source), load_image(row.negative, anchor.size, row.source)


def _image_path(value, root, where, check):
    """Resolve one image path against root; with `check`, it must exist and open as an image (header only)."""
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: image path must be a non-empty string, got {value!r}")
    path = value if os.path.isabs(value) else os.path.join(root, value)
    if check:
        if not os.path.isfile(path):
            raise DataError(f"{where}: image {path} not found")
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{where}: image {path} is unreadable ({type(e).__name__})") from None
    return path


def _one_image(value, where, key):
    """The release stores images as lists; accept one path or a one-element list."""
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"{where}: '{key}' must hold exactly one image, got {len(value)}")
        value = value[0]
    return value


def _str(rec, key, where, allow_empty=False):
    v = rec.get(key)
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {v!r}")
    return v


def _read_jsonl(path):
    """[(line number, dict)] of a JSONL file; blank lines are skipped."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        rows.append((n, rec))
    return rows


def load_stage1(path, image_root=None, check_images=True):
    """Stage-1 SFT samples (release JSON list of {"messages", "images"})."""
    root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        where = f"{path}:#{i}"
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise DataError(f"{where}: expected an object with a 'messages' list")
        msgs = rec["messages"]
        roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
        if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
            raise DataError(f"{where}: messages must be [system?, user, assistant], got roles {roles}")
        for m in msgs:
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: {m.get('role')} content must be a string")
        system = msgs[0]["content"] if roles[0] == "system" else None
        user, answer = msgs[-2]["content"], msgs[-1]["content"]
        if not answer.strip():
            raise DataError(f"{where}: empty assistant message")
        images = rec.get("images", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or len(images) > 1:
            raise DataError(f"{where}: 'images' must be a list of at most one image path")
        if user.count(IMAGE_TOKEN) != len(images):
            raise DataError(f"{where}: the user message has {user.count(IMAGE_TOKEN)} '<image>' tokens but the "
                            f"sample has {len(images)} images")
        image = _image_path(images[0], root, where, check_images) if images else None
        out.append(SFTSample(image=image, question=user.replace(IMAGE_TOKEN, "").strip(), answer=answer,
                             system=system, source=f"{os.path.basename(path)}:#{i}"))
    return out


def load_stage2(path, image_root=None, check_images=True):
    """Stage-2 RL rows (release JSONL with images / problem / answer / image_noisy / image_aug)."""
    root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    out = []
    for n, rec in _read_jsonl(path):
        where = f"{path}:{n}"
        missing = [k for k in ("images", "problem", "answer", "image_noisy", "image_aug") if k not in rec]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        img, pos, neg = (_image_path(_one_image(rec[k], where, k), root, where, check_images)
                         for k in ("images", "image_noisy", "image_aug"))
        problem = _str(rec, "problem", where)
        out.append(RLRow(image=img, positive=pos, negative=neg, problem=problem.replace(IMAGE_TOKEN, "").strip(),
                         answer=_str(rec, "answer", where), source=f"{os.path.basename(path)}:{n}"))
    return out


def eval_name(path):
    """(dataset, split) from a file name like 'bird_unseen.jsonl' or 'eval_bird_seen.sample.jsonl'."""
    m = re.fullmatch(r"(?:eval_)?(.+?)_(seen|unseen)(?:\.sample)?\.jsonl", os.path.basename(path))
    return (m.group(1), m.group(2)) if m else (Path(path).stem, "")


def load_eval(path, image_root=None, check_images=True):
    """Eval items (release JSONL with image_path / question / options / ground_truth)."""
    root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    dataset, split = eval_name(path)
    out = []
    for n, rec in _read_jsonl(path):
        where = f"{path}:{n}"
        missing = [k for k in ("image_path", "question", "options", "ground_truth") if k not in rec]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        options, gt = rec["options"], _str(rec, "ground_truth", where)
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise DataError(f"{where}: 'options' must be a list of at least 2 strings, got {options!r}")
        if normalise_label(gt) not in {normalise_label(o) for o in options}:
            raise DataError(f"{where}: ground truth {gt!r} is not among its options {options}")
        out.append(EvalItem(image=_image_path(rec["image_path"], root, where, check_images),
                            question=_str(rec, "question", where), options=list(options), ground_truth=gt,
                            dataset=dataset, split=split, source=f"{os.path.basename(path)}:{n}"))
    return out


# ----------------------------------------------------------------------------------------------------------
# Chat construction and batching (one for SFT, RL and eval)

def chat_messages(user_text, has_image, system=None):
    """Qwen chat messages for one user turn; system=None lets the chat template insert its default."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": user_text}]
    return msgs + [{"role": "user", "content": content}]


def encode_prompts(processor, images, user_texts, system=None):
    """LEFT-padded generation batch: input_ids, attention_mask, mm_token_type_ids (B, T), plus pixel_values
    (N_patches, D) and image_grid_thw (N_img, 3) when any row has an image. images[i] may be None."""
    assert len(images) == len(user_texts), f"{len(images)} images for {len(user_texts)} prompts"
    texts = [processor.apply_chat_template(chat_messages(t, im is not None, system), tokenize=False,
                                           add_generation_prompt=True) for im, t in zip(images, user_texts)]
    imgs = [im for im in images if im is not None]
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = processor(text=texts, images=imgs or None, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    return dict(enc)


def encode_responses(tokenizer, responses, add_eos=True):
    """Token ids of each assistant text, + "<|im_end|>" (the template's end of turn, the eos of generation)."""
    ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [list(r) + [end] if add_eos else list(r) for r in ids]


def join_prompt_response(prompt_batch, response_ids, pad_id):
    """[left-padded prompt | right-padded response] batch; response_mask (B, T) marks the response tokens
    (incl. the final <|im_end|>), prompt_len is the padded prompt width P (responses start at column P)."""
    ids = prompt_batch["input_ids"]
    B, P = ids.shape
    assert len(response_ids) == B, f"{len(response_ids)} responses for {B} prompts"
    R = max((len(r) for r in response_ids), default=0)
    resp = torch.full((B, R), pad_id, dtype=ids.dtype)
    rmask = torch.zeros(B, R, dtype=torch.bool)
    for i, r in enumerate(response_ids):
        resp[i, :len(r)] = torch.as_tensor(r, dtype=ids.dtype)
        rmask[i, :len(r)] = True
    out = {k: v for k, v in prompt_batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    am = prompt_batch["attention_mask"]
    out["input_ids"] = torch.cat([ids, resp], 1)                                    # (B, P + R)
    out["attention_mask"] = torch.cat([am, rmask.to(am.dtype)], 1)
    mm = prompt_batch.get("mm_token_type_ids", torch.zeros_like(ids))
    out["mm_token_type_ids"] = torch.cat([mm, torch.zeros(B, R, dtype=mm.dtype)], 1)  # response: text tokens
    out["response_mask"] = torch.cat([torch.zeros(B, P, dtype=torch.bool), rmask], 1)
    out["prompt_len"] = P
    return out


def encode_pairs(processor, images, user_texts, responses, system=None, add_eos=True):
    """encode_prompts + encode_responses + join_prompt_response: a teacher-forcing batch (SFT, log-probs)."""
    prompts = encode_prompts(processor, images, user_texts, system)
    resp = encode_responses(processor.tokenizer, responses, add_eos)
    return join_prompt_response(prompts, resp, processor.tokenizer.pad_token_id)


def length_grouped_batches(lengths, batch_size, seed, shuffle=True, group_size_mult=50):
    """Batches of indices with similar lengths (HF LengthGroupedSampler style): shuffle, cut into megabatches
    of batch_size * group_size_mult, sort each by length (longest first), chunk, shuffle the batch order."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(idx)
    mega = batch_size * group_size_mult
    batches = []
    for s in range(0, len(idx), mega):
        group = sorted(idx[s:s + mega], key=lambda i: -lengths[i])
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------------------
# Real data: an image-folder dataset (one folder per class) -> split, k-shot triplets, closed-world options

def folder_label(name):
    """Class label from a folder name: a leading index ("001.") dropped, "_" -> " " (CUB style)."""
    return re.sub(r"^\d+[._-]", "", name).replace("_", " ").strip()


def _write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_from_image_folder(root, out_dir, model=None, processor=None, seed=0, seen_frac=0.6, shots=4,
                            n_options=4, test_per_class=None, dataset=None, noun="object", kind="kind",
                            embed_fn=None, batch_size=16):
    """Write {dataset}_rl_train.jsonl, {dataset}_seen.jsonl, {dataset}_unseen.jsonl and {dataset}_split.json.

    Split: a seeded `seen_frac` of the classes is seen. Seen classes give `shots` training images (the rest
    are seen test images); unseen classes give only test images (at most `test_per_class` per class).
    Similarity: cosine between class means of `embed_fn(images) -> (N, D)` features over `shots` images per
    class (default: policy.image_embeddings of `model` / `processor`, the mean-pooled vision tower).
    Triplets, one per training image: positive = another training image of the class, negative = the training
    image (closest to the anchor) of the most similar other SEEN class. Options: the ground truth first (as
    released) + the n_options - 1 most similar classes of the whole dataset. Returns {name: path}.
    """
    root, out = Path(root), Path(out_dir)
    dataset = dataset or root.name
    if embed_fn is None:
        if model is None or processor is None:
            raise ValueError("build_from_image_folder needs model and processor (or embed_fn) for similarities")
        from policy import image_embeddings
        embed_fn = lambda imgs: image_embeddings(model, processor, imgs, batch_size=batch_size)  # noqa: E731
    assert shots >= 2, "shots must be >= 2: a triplet's positive is another training image of the class"
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    files = {d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS) for d in folders}
    folders = [d for d in folders if files[d.name]]
    if len(folders) < n_options:
        raise DataError(f"{root}: {len(folders)} class folders with images, need at least {n_options}")
    rng = random.Random(seed)
    order = [d.name for d in folders]
    rng.shuffle(order)
    n_seen = round(seen_frac * len(order))
    seen, unseen = sorted(order[:n_seen]), sorted(order[n_seen:])
    if len(seen) < 2:
        raise DataError(f"{root}: only {len(seen)} seen classes; a triplet needs a negative class")
    imgs = {}
    for c in order:
        fs = list(files[c])
        rng.shuffle(fs)
        imgs[c] = fs
    for c in seen:
        if len(imgs[c]) < shots:
            raise DataError(f"{root / c}: {len(imgs[c])} images, need at least shots={shots}")

    # features: `shots` images per class (the training images of seen classes), unit norm
    classes = sorted(order)
    emb_files = [f for c in classes for f in imgs[c][:shots]]
    feats = embed_fn([load_image(f) for f in emb_files]).float()
    feats = torch.nn.functional.normalize(feats, dim=-1)                          # (N, D)
    owner = [c for c in classes for _ in imgs[c][:shots]]
    means = torch.stack([feats[[i for i, o in enumerate(owner) if o == c]].mean(0) for c in classes])
    means = torch.nn.functional.normalize(means, dim=-1)
    sim = means @ means.T                                                         # (C, C) class similarity
    cidx = {c: i for i, c in enumerate(classes)}
    feat_of = {f: feats[i] for i, f in enumerate(emb_files)}

    def most_similar(c, pool, k):
        others = [o for o in pool if o != c]
        return sorted(others, key=lambda o: (-float(sim[cidx[c], cidx[o]]), o))[:k]

    rel = lambda f: os.path.relpath(os.path.abspath(f), os.path.abspath(out))  # noqa: E731
    label = {c: folder_label(c) for c in classes}
    problem = f"<image> Based on this image, what {kind} of {noun} is shown?"
    rl, neg_class = [], {}
    for c in seen:
        train = imgs[c][:shots]
        neg_class[c] = most_similar(c, seen, 1)[0]
        negs = imgs[neg_class[c]][:shots]
        for i, a in enumerate(train):
            pos = rng.choice([p for j, p in enumerate(train) if j != i])
            neg = max(negs, key=lambda f: float(feat_of[f] @ feat_of[a]))
            rl.append({"images": [rel(a)], "problem": problem, "answer": label[c],
                       "image_noisy": [rel(pos)], "image_aug": [rel(neg)]})
    options = {c: [label[c]] + [label[o] for o in most_similar(c, classes, n_options - 1)] for c in classes}
    questions = [q.format(noun=noun) for q in ("What kind of {noun} is this?", "What is the {noun} shown in "
                 "the photo?", "What type of {noun} is shown in the image?", "Do you know what {noun} this is?")]
    evals = {"seen": [], "unseen": []}
    for split, group in (("seen", seen), ("unseen", unseen)):
        for c in group:
            test = imgs[c][shots:] if split == "seen" else imgs[c]
            for f in test[:test_per_class]:
                evals[split].append({"image_path": rel(f), "question": rng.choice(questions),
                                     "options": options[c], "ground_truth": label[c]})
    out.mkdir(parents=True, exist_ok=True)
    paths = {"rl_train": out / f"{dataset}_rl_train.jsonl", "seen": out / f"{dataset}_seen.jsonl",
             "unseen": out / f"{dataset}_unseen.jsonl", "split": out / f"{dataset}_split.json"}
    _write_jsonl(paths["rl_train"], rl)
    _write_jsonl(paths["seen"], evals["seen"])
    _write_jsonl(paths["unseen"], evals["unseen"])
    paths["split"].write_text(json.dumps({
        "root": str(root), "seed": seed, "seen_frac": seen_frac, "shots": shots,
        "seen": [label[c] for c in seen], "unseen": [label[c] for c in unseen],
        "negative_class": {label[c]: label[o] for c, o in neg_class.items()},
        "options": {label[c]: o for c, o in options.items()}}, indent=1, ensure_ascii=False) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------------------
# CLI

def check(paths, check_images=True):
    """Parse each file with the loader its name implies; print counts; raise DataError on the first problem."""
    for p in paths:
        name = os.path.basename(p)
        if name.endswith(".json") and name != "world.json" and not name.endswith("_split.json"):
            recs = load_stage1(p, check_images=check_images)
            print(f"{p}: {len(recs)} Stage-1 samples ({sum(r.image is None for r in recs)} text-only)")
        elif eval_name(p)[1]:
            recs = load_eval(p, check_images=check_images)
            print(f"{p}: {len(recs)} eval items ({recs[0].dataset if recs else '-'} {eval_name(p)[1]})")
        elif name.endswith(".jsonl"):
            print(f"{p}: {len(load_stage2(p, check_images=check_images))} Stage-2 rows")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="parse release-format files and check their images")
    c.add_argument("files", nargs="+", help="Stage-1 .json, Stage-2 .jsonl or eval {name}_{seen|unseen}.jsonl")
    c.add_argument("--no-images", action="store_true", help="do not check that images exist and open")
    b = sub.add_parser("build", help="image folder (one folder per class) -> release-format files")
    b.add_argument("root", help="dataset folder with one sub-folder of images per class")
    b.add_argument("--out", required=True, help="output folder (paths in the files are relative to it)")
    b.add_argument("--policy", default="tiny", help="policy preset or HF folder whose vision tower gives features")
    b.add_argument("--dataset", default=None, help="dataset name (file prefix); default: the root folder name")
    b.add_argument("--noun", default="object", help="super-category word used in questions (bird, car, ...)")
    b.add_argument("--kind", default="kind", help="RL question 'what {kind} of {noun} is shown?' (species, model)")
    b.add_argument("--seed", type=int, default=0, help="seed of the split, shots and choices")
    b.add_argument("--seen-frac", type=float, default=0.6, help="fraction of seen classes (paper: 60%%)")
    b.add_argument("--shots", type=int, default=4, help="training images per seen class (paper: 4)")
    b.add_argument("--test-per-class", type=int, default=None, help="cap on test images per class")
    args = p.parse_args()
    if args.cmd == "check":
        check(args.files, check_images=not args.no_images)
    else:
        torch.set_num_threads(min(4, os.cpu_count() or 1))
        from policy import load_policy
        model, processor = load_policy(args.policy)
        for k, v in build_from_image_folder(args.root, args.out, model, processor, seed=args.seed,
                                            seen_frac=args.seen_frac, shots=args.shots, noun=args.noun,
                                            kind=args.kind, test_per_class=args.test_per_class,
                                            dataset=args.dataset).items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
