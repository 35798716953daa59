"""Data layer: the release's three file formats, the ONE prompt / chat construction, batching.

Formats (README "Release facts"; samples in tests/fixtures/), read with a clear error naming the file and the
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
    stack_prompts(single_row_prompts, pad_id)   -> the same batch from prompts encoded earlier, one per row
    encode_responses / join_prompt_response / encode_pairs -> [prompt | response] batch with response_mask

Real image-folder datasets are turned into these files by imagefolder.py. CLI:

    python data.py out/world/*.json*          # parse + check images, counts

Layer: data -> reward (label normalisers); nothing else of this project.

Deliberate choices
------------------
1. System prompt (README Δ14): the release's SFT used SYSTEM_PROMPT_R1, its RL and eval used none (so
   the Qwen template inserted "You are a helpful assistant."). Here every stage builds its chat with
   `chat_messages(..., system=None)` by default, i.e. the RL / eval prompt, so that SFT trains on exactly
   the conversation the model later sees; stages offer `--system-prompt r1` to pass SYSTEM_PROMPT_R1 (the
   release's SFT). A Stage-1 file's own system message is reported in `SFTSample.system` but not applied.
2. RL_SUFFIX is the release's `cls_thinking.jinja`: the problem (trimmed), a blank line, then the instruction.
3. One image per sample / row (the release never uses more); a second image is a DataError.
4. A triplet's positive and negative are resized to the anchor's size at load time (`load_triplet`), as the
   release's RL requires.
"""
import argparse
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from reward import release_label

# ----------------------------------------------------------------------------------------------------------
# Prompts (the release's strings, verbatim)

SYSTEM_PROMPT_R1 = (  # tests/fixtures/stage1_cot_sft.sample.json, system message
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
    """The RL user text the release builds from a Stage-2 `problem` ("<image> Based on this image, ..."): the
    template trims the whole problem, then EasyR1 splits it at "<image>", so the text after the image keeps its
    leading space (" Based on this image, ..."); then the instruction."""
    return problem.strip().replace(IMAGE_TOKEN, "") + RL_SUFFIX


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
    prefix: bool = False  # record key "prefix": the assistant text is the start of a longer answer, scored
                          # without the closing <|im_end|> (the world's analysis_replay.json: only a visual analysis)
    unscored: tuple = ()  # record key "unscored": [[start, end], ...] character spans of the assistant text whose
                          # tokens carry no loss (there: a pattern word the pretraining corpus never stated)


@dataclass
class RLRow:
    image: str          # anchor x
    positive: str       # x_pos (release key "image_noisy")
    negative: str       # x_neg (release key "image_aug")
    problem: str        # as written in the file, "<image>" included (data.rl_prompt builds the user text)
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


def pixel_budget_size(width, height, min_pixels=None, max_pixels=None):
    """(w, h) after the release's pixel budget (EasyR1 process_image, LLaMA-Factory _preprocess_image): scale by
    sqrt(max / (w h)) when above max_pixels, then by sqrt(min / (w h)) when below min_pixels, truncating each
    side to an int. None or 0 = no bound. The processor's own smart_resize (multiples of 28) follows."""
    if max_pixels and width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if min_pixels and width * height < min_pixels:
        f = math.sqrt(min_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    return width, height


def load_image(path, size=None, min_pixels=None, max_pixels=None, where=None):
    """An RGB PIL image; DataError naming the row (`where`, e.g. "rl_train.jsonl:12") and the file when it is
    missing or unreadable. Resized to (w, h) = `size` if given, else into the pixel budget [min_pixels,
    max_pixels] the way the release does (pixel_budget_size).

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
    if size is None:
        size = pixel_budget_size(*im.size, min_pixels, max_pixels)
    if tuple(im.size) != tuple(size):
        im = im.resize(tuple(size), Image.BICUBIC)  # PIL's default resample, as the release's im.resize
    return im


def load_triplet(row, min_pixels=None, max_pixels=None):
    """(anchor, positive, negative) images of an RLRow: the anchor in the pixel budget, positive and negative
    resized to the anchor's size (prompt tokens and M-RoPE positions are computed once, from the anchor)."""
    anchor = load_image(row.image, None, min_pixels, max_pixels, where=row.source)
    return anchor, load_image(row.positive, anchor.size, where=row.source), \
        load_image(row.negative, anchor.size, where=row.source)


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


def parse_data_spec(spec, flag="--data"):
    """[(path, weight)] from the one `--data` syntax every stage shares: comma-separated PATH[:WEIGHT].

    PATH is a file, or a folder that the stage resolves to its own file(s) in it (an embedded world). WEIGHT
    (default 1, > 0) only means something to sft.py's mixtures; the other stages refuse one."""
    out = []
    for part in filter(None, (s.strip() for s in str(spec).split(","))):
        path, weight = part, 1.0
        head, _, tail = part.rpartition(":")
        if head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        if weight <= 0:
            raise DataError(f"{flag} {part}: weight must be > 0")
        out.append((path, weight))
    if not out:
        raise DataError(f"{flag} {spec!r}: no source")
    return out


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
        prefix, unscored = rec.get("prefix", False), rec.get("unscored", [])
        if not isinstance(prefix, bool):
            raise DataError(f"{where}: 'prefix' must be true or false, got {prefix!r}")
        if not isinstance(unscored, list) or not all(
                isinstance(sp, list) and len(sp) == 2 and all(type(x) is int for x in sp)
                and 0 <= sp[0] < sp[1] <= len(answer) for sp in unscored):
            raise DataError(f"{where}: 'unscored' must be a list of [start, end] character spans inside the "
                            f"assistant text (length {len(answer)}), got {unscored!r}")
        out.append(SFTSample(image=image, question=user.replace(IMAGE_TOKEN, "").strip(), answer=answer,
                             system=system, source=f"{os.path.basename(path)}:#{i}", prefix=prefix,
                             unscored=tuple(tuple(sp) for sp in unscored)))
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
        out.append(RLRow(image=img, positive=pos, negative=neg, problem=problem,
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
        if release_label(gt).strip() not in {release_label(o).strip() for o in options}:
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


def stack_prompts(prompts, pad_id):
    """One LEFT-padded batch from single-row `encode_prompts` outputs, without running the processor again
    (TAPO encodes each group's prompt once per image and reuses it for rollouts and every scoring pass).
    Rows keep their order; pixel_values / image_grid_thw are concatenated in row order, as the processor does."""
    P = max(p["input_ids"].shape[1] for p in prompts)

    def left(t, fill):  # (1, T) -> (1, P)
        return torch.cat([t.new_full((1, P - t.shape[1]), fill), t], 1)
    out = {"input_ids": torch.cat([left(p["input_ids"], pad_id) for p in prompts]),
           "attention_mask": torch.cat([left(p["attention_mask"], 0) for p in prompts]),
           "mm_token_type_ids": torch.cat([left(p["mm_token_type_ids"], 0) for p in prompts])}
    if any(p.get("pixel_values") is not None for p in prompts):
        out["pixel_values"] = torch.cat([p["pixel_values"] for p in prompts if p.get("pixel_values") is not None])
        out["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in prompts if p.get("pixel_values") is not None])
    return out


def count_image_tokens(processor, path, min_pixels=None, max_pixels=None):
    """LLM tokens of an image after the pixel budget, Qwen2.5-VL's resize and its 2x2 merge (header read only)."""
    ip = processor.image_processor
    try:
        with Image.open(path) as im:
            w, h = pixel_budget_size(*im.size, min_pixels, max_pixels)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    return ip.get_number_of_image_patches(h, w) // ip.merge_size ** 2


def prompt_length(processor, user_text, image_path=None, system=None, min_pixels=None, max_pixels=None):
    """Tokens of the chat prompt (generation header included) of one sample, image tokens counted exactly."""
    text = processor.apply_chat_template(chat_messages(user_text, image_path is not None, system), tokenize=False,
                                         add_generation_prompt=True)
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return n + (count_image_tokens(processor, image_path, min_pixels, max_pixels) - 1 if image_path else 0)


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


class RowStream:
    """An endless, resumable stream of this rank's rows (TAPO's prompts): epoch e uses permutation(seed, e), rank r
    takes every world-th row from r (sharding by stride)."""

    def __init__(self, rows, seed, rank, world):
        self.rows, self.seed, self.rank, self.world = rows, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _epoch_order(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(len(self.rows), generator=g).tolist()
        return perm[self.rank::self.world]

    def take(self, k):
        out = []
        while len(out) < k:
            if self._order is None:
                self._order = self._epoch_order()
            if self.cursor >= len(self._order):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
                continue
            out.append(self.rows[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, s):
        self.epoch, self.cursor, self._order = s["epoch"], s["cursor"], None


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
    p = argparse.ArgumentParser(description="Parse release-format files and check their images (file:line errors).")
    p.add_argument("files", nargs="+", help="Stage-1 .json, Stage-2 .jsonl or eval {name}_{seen|unseen}.jsonl")
    p.add_argument("--no-images", action="store_true", help="do not check that images exist and open")
    args = p.parse_args()
    try:
        check(args.files, check_images=not args.no_images)
    except DataError as e:
        raise SystemExit(f"data.py: {e}")


if __name__ == "__main__":
    main()
