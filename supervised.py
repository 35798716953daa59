"""The supervised loss on Stage-1 samples, shared by sft.py (the whole stage) and tapo.py (`--replay`).

A Stage-1 mixture -> exact token lengths -> global batches -> micro-batches, the same count on every rank ->
teacher-forced NLL, normalised over every scored token of the optimizer step (all micro-batches, all ranks):
    L = -(1 / N_step) * sum_{scored assistant tokens t of the step} log pi(y_t | image, prompt, y_<t)
sft.py documents the choices (batching, the lockstep filler, the optional `prefix` / `unscored` keys).

`Replay` is TAPO's optional replay term (a world deviation, README Δ): each optimizer step of the RL stage also
backpropagates coef x L on a batch of Stage-1 samples (the world: the base model's own corpus), the "pretraining
mix" of InstructGPT's PPO-ptx, so that RL on seen classes does not wear away what the small model knows.
"""
import contextlib
import math
import random
from pathlib import Path

import torch
from PIL import Image

from data import DataError, chat_messages, count_image_tokens, encode_prompts, encode_responses, \
    join_prompt_response, length_grouped_batches, load_image, load_stage1, parse_data_spec
from distributed import unwrap
from policy import rope_positions, token_logprobs, vision_token_ids

WORLD_FILES = {"cot": "cot_sft.json", "nocot": "sft_nocot.json", "pretrain": "pretrain.json"}


# ----------------------------------------------------------------------------------------------------------
# A mixture of Stage-1 sources -> token lengths -> batches

def parse_sources(spec, variant="cot"):
    """[(path, weight)] from --data (data.parse_data_spec); a world folder means its file for `variant`."""
    out = []
    for path, weight in parse_data_spec(spec):
        if Path(path).is_dir():
            if not (Path(path) / "world.json").exists():
                raise DataError(f"--data {path}: a folder must be an embedded world (world.json); give a JSON file")
            path = str(Path(path) / WORLD_FILES[variant])
        out.append((path, weight))
    return out


def load_mixture(spec, variant="cot", image_root=None, seed=0):
    """The run's samples: each source's Stage-1 records, repeated / subsampled after its weight."""
    rng = random.Random(f"{seed}/mixture")
    samples = []
    for path, weight in parse_sources(spec, variant):
        recs = load_stage1(path, image_root)  # DataError naming the file and record index
        whole, frac = int(weight), weight - int(weight)
        samples += recs * whole + rng.sample(recs, round(frac * len(recs)))
    return samples


def tokenize(samples, processor, system, max_length, pixels=(None, None)):
    """(prompt_lens, resp_ids): exact prompt lengths (image tokens after the pixel budget (min, max) included)
    and response ids + <|im_end|> (none for a `prefix` sample, whose answer is the start of a longer one),
    responses truncated so that prompt + response <= max_length (the release's cutoff_len). A prompt that alone
    reaches max_length is a DataError naming the sample."""
    tok = processor.tokenizer
    resp = encode_responses(tok, [s.answer for s in samples])
    resp = [r[:-1] if s.prefix else r for s, r in zip(samples, resp)]  # a prefix sample's answer goes on: no end
    cache, prompt_lens, truncated = {}, [], 0
    for i, s in enumerate(samples):
        key = (s.question, s.image is not None)
        if key not in cache:  # one chat template call per distinct question
            text = processor.apply_chat_template(chat_messages(s.question, s.image is not None, system),
                                                 tokenize=False, add_generation_prompt=True)
            cache[key] = len(tok(text, add_special_tokens=False)["input_ids"])
        n = cache[key] + (count_image_tokens(processor, s.image, *pixels) - 1 if s.image else 0)  # 1 pad -> n
        if n >= max_length:
            raise DataError(f"{s.source}: the prompt alone is {n} tokens (image {s.image}), --max-length is "
                            f"{max_length}; lower --max-pixels or raise --max-length")
        if n + len(resp[i]) > max_length:
            resp[i], truncated = resp[i][:max_length - n], truncated + 1
        prompt_lens.append(n)
    return prompt_lens, resp, truncated


def shared_prefix_len(samples, processor, system):
    """Number of leading prompt tokens that every sample's prompt has (the system turn and "<|im_start|>user\n":
    15 tokens with the default system prompt), stopping before any image token and short of the shortest prompt,
    so that each sample keeps at least one prompt token of its own: what `--share-prefix` holds once per packed
    row (encode_packed_micro_batch). Exact: the distinct chat-template prompts are tokenized and compared."""
    tok = processor.tokenizer
    texts = sorted({processor.apply_chat_template(chat_messages(s.question, s.image is not None, system),
                                                  tokenize=False, add_generation_prompt=True) for s in samples})
    if not texts:
        return 0
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    n, stop = min(len(x) for x in ids) - 1, set(vision_token_ids(tok))
    first = ids[0]
    for x in ids[1:]:
        n = next((k for k in range(n) if x[k] != first[k]), n)
    return next((k for k in range(n) if first[k] in stop), max(n, 0))


def unscored_positions(tokenizer, samples, resp_ids):
    """{sample index: response positions whose token overlaps one of the sample's `unscored` character spans}
    (only samples that have spans; positions past a truncation dropped). These tokens stay in the input (teacher
    forcing) but carry no loss and do not count in the step's token total."""
    out = {}
    for i, s in enumerate(samples):
        if s.unscored:
            offs = tokenizer(s.answer, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            out[i] = [j for j, (a, b) in enumerate(offs[:len(resp_ids[i])])
                      if any(a < end and start < b for start, end in s.unscored)]
    return out


def grouping_keys(prompt_lens, resp_ids):
    """Sort keys for length grouping. A micro-batch [left-padded prompt | right-padded response] is max P + max R
    wide, so sorting by P + R (HF) leaves padding where P and R vary in opposite ways (text-only vs image
    samples). Lexicographic on the length that varies more, then the other: on the world's pretraining mix
    the padding of 8-sample micro-batches drops from 12% (total length) to 0.6%; on Qwen-like CoT data
    (prompt 256-1280, response 150-450 tokens) from 13% to 8%."""
    resp_lens = [len(r) for r in resp_ids]
    spread = lambda xs: max(xs) - min(xs)  # noqa: E731
    first, second = (prompt_lens, resp_lens) if spread(prompt_lens) >= spread(resp_lens) else (resp_lens, prompt_lens)
    return [a * 1_000_000 + b for a, b in zip(first, second)]


def epoch_batches(keys, batch_size, seed, epoch, group=True):
    """Global batches (lists of sample indices) of one epoch; a pure function of (seed, epoch).

    group: HF-style length grouping (megabatches of 50 batches sorted by length, batch order shuffled);
    else a plain shuffle. The last batch may be partial; every epoch has the same number of batches.
    note: on a mixture whose sources differ in length (the world's pretraining corpus: attribute answers,
    captions, knowledge texts) grouped batches are single-task; measured on the tiny preset, 6 epochs at
    lr 3e-3: final-epoch loss 0.53 grouped vs 0.17 shuffled. Hence the default `--length-grouping micro`.
    """
    order_seed = seed * 100_003 + epoch
    if group:
        return length_grouped_batches(keys, batch_size, order_seed)
    idx = list(range(len(keys)))
    random.Random(order_seed).shuffle(idx)
    return [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]


def rank_micro_batches(batch, keys, micro, world, group=True):
    """Split one global batch into micro-batches dealt round-robin to ranks: [rank][j] -> list of indices.

    Every rank gets the same number of micro-batches, n / world with n = world * ceil(len / (world * micro)),
    of near-equal size (<= micro); with `group` the batch is sorted by length first so each micro-batch pads
    little. An empty list means "no sample left for this slot": the caller runs a zero-weight copy.
    """
    items = sorted(batch, key=lambda i: -keys[i]) if group else list(batch)
    n = world * math.ceil(len(items) / (world * micro))
    q, r = divmod(len(items), n)
    chunks, s = [], 0
    for j in range(n):
        chunks.append(items[s:s + q + (j < r)])
        s += q + (j < r)
    return [chunks[rank::world] for rank in range(world)]


def micro_batch_cost(idxs, prompt_lens, resp_ids):
    """(real tokens, padded tokens) of a [left-padded prompt | right-padded response] micro-batch."""
    if not idxs:
        return 0, 0
    real = sum(prompt_lens[i] + len(resp_ids[i]) for i in idxs)
    width = max(prompt_lens[i] for i in idxs) + max(len(resp_ids[i]) for i in idxs)
    return real, width * len(idxs)


def encode_micro_batch(processor, samples, prompt_lens, resp_ids, idxs, system, device, need_image=False,
                       pixels=(None, None), unscored=None):
    """Teacher-forcing batch of samples `idxs` (data.py's shared chat construction), on `device`.

    need_image: a micro-batch of text-only samples gets one extra row, a blank 56x56 image with an empty,
    unscored response, so that the vision tower runs inside the forward on every rank.
    note: FSDP2 all-gathers each unit when it runs and gloo / NCCL match collectives by order; a rank whose
    micro-batch is text-only would gather the vision tower after the decoder layers (policy's dummy vision
    forward) while a rank with images gathers it before them: a collective mismatch (measured: gloo abort).
    """
    images = [load_image(samples[i].image, None, *pixels, where=samples[i].source) if samples[i].image else None
              for i in idxs]
    texts, resp = [samples[i].question for i in idxs], [resp_ids[i] for i in idxs]
    if need_image and all(im is None for im in images):
        images, texts, resp = images + [Image.new("RGB", (56, 56))], texts + [""], resp + [[]]
    prompts = encode_prompts(processor, images, texts, system)
    for row, i in enumerate(idxs):
        assert int(prompts["attention_mask"][row].sum()) == prompt_lens[i], f"{samples[i].source}: prompt length"
    batch = join_prompt_response(prompts, resp, processor.tokenizer.pad_token_id)
    for row, i in enumerate(idxs):  # `unscored` (unscored_positions): teacher-forced, no loss
        for j in (unscored or {}).get(i, ()):
            batch["response_mask"][row, batch["prompt_len"] + j] = False
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def packed_micro_batches(batch, lengths, micro, world):
    """One global batch -> ([rank][j] -> rows, width): `--pack`'s plan. Each row is a list of sample indices whose
    lengths (prompt + response) sum to at most `width`, the batch's longest sample (first-fit decreasing); rows,
    fullest first, are dealt round-robin to ranks and cut into micro-batches of at most `micro` rows, the same
    count on every rank, of near-equal row counts (an empty list: no row left for this slot, the caller runs a
    zero-weight copy). A padded token costs what a real one does, so the plan evens rows, not samples: on the
    world's pretraining corpus (2 ranks, 16-sample steps, one epoch) the longest rank's tokens, padding included,
    drop to 0.69x those of `rank_micro_batches` (counted on the plans, stop 31)."""
    width = max(lengths[i] for i in batch)
    rows = []  # [fill, [indices]]
    for i in sorted(batch, key=lambda i: (-lengths[i], i)):
        row = next((r for r in rows if r[0] + lengths[i] <= width), None)
        if row is None:
            rows.append([lengths[i], [i]])
        else:
            row[0] += lengths[i]
            row[1].append(i)
    rows = [r for _, r in sorted(rows, key=lambda r: -r[0])]  # stable: ties keep creation order
    per_rank = [rows[r::world] for r in range(world)]
    n = max(1, math.ceil(max(len(p) for p in per_rank) / micro))  # micro-batches per rank, near-equal in rows
    return [[p[j * len(p) // n:(j + 1) * len(p) // n] for j in range(n)] for p in per_rank], width


def packed_cost(rows, lengths, share=0):
    """(real tokens, padded tokens) of a packed micro-batch: rows as wide as its fullest row (each row also holds
    the `share` prefix tokens once, `lengths` being the samples' other tokens)."""
    fills = [sum(lengths[i] for i in r) + share * bool(r) for r in rows]
    return sum(fills), max(fills, default=0) * len(rows)


class EncodeCache:
    """Encoded samples kept across steps for packed rows (sft.py, tapo.py's replay; `--encode-cache-mb`).

    A sample's prompt and response tokens, its image's patches and its M-RoPE positions depend on the sample alone
    (and on the run's processor, system prompt and pixel budget, fixed per run), so a sample met again in a later
    epoch is read back instead of reloading its image, re-running the processor and the rope index (encoding was 2.0
    of 20.5 s over 80 world base steps in one process, cProfile; under 2-rank DDP a rank meets each sample later and
    the saving was within this CPU host's noise, README "Stop 35"). The rows built from it are the same tensors bit
    for bit (tests/test_sft.py). Bounded: once `max_mb` MiB are held, samples not yet held are encoded each time. Keys
    are indices into the caller's sample list: one cache per list.
    """

    def __init__(self, max_mb):
        self.max_bytes, self.nbytes, self.pieces = int(max_mb * 2 ** 20), 0, {}
        self.hits = self.misses = 0

    def get(self, key):
        piece = self.pieces.get(key)
        self.hits, self.misses = self.hits + (piece is not None), self.misses + (piece is None)
        return piece

    def put(self, key, piece):
        size = sum(v.nbytes for v in piece.values() if torch.is_tensor(v))
        if self.nbytes + size <= self.max_bytes:  # own copies: a view would keep its whole batch alive
            self.pieces[key] = {k: v.clone() if torch.is_tensor(v) else v for k, v in piece.items()}
            self.nbytes += size


BLANK = "blank"  # the cache key of encode_micro_batch's blank image sample (need_image on a text-only micro-batch)


def sample_pieces(model, processor, samples, prompt_lens, resp_ids, idxs, system, pixels=(None, None),
                  unscored=None, blank=False, cache=None):
    """Each sample of `idxs` (and, with blank, the blank image sample) encoded alone: {input_ids, attention_mask,
    mm_token_type_ids, response_mask (n,): its n real tokens; pos3 (3, n): its M-RoPE positions; pixel_values,
    image_grid_thw: its image's patches and grid, or None}. Read from `cache` where held; the rest are encoded
    together as one padded batch (encode_micro_batch) and cut into samples, which leaves each sample's tokens,
    patches and positions as they are (padding gets no position, rope_positions)."""
    keys = list(idxs) + ([BLANK] if blank else [])
    got = {k: cache.get(k) if cache is not None else None for k in keys}
    todo = [k for k in keys if got[k] is None]
    if todo:
        enc = encode_micro_batch(processor, samples, prompt_lens, resp_ids, [k for k in todo if k != BLANK], system,
                                 "cpu", BLANK in todo, pixels, unscored)
        pos3 = rope_positions(model, enc)  # (3, B, T), on the CPU: index arithmetic, no weights
        real = enc["attention_mask"].bool()
        grid, image_id, start, g = enc.get("image_grid_thw"), unwrap(model).config.image_token_id, 0, 0
        for b, k in enumerate(todo):  # the blank sample, when asked for, is the batch's last row
            r = real[b]
            piece = {key: enc[key][b][r] for key in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                     "response_mask")}
            piece["pos3"], piece["pixel_values"], piece["image_grid_thw"] = pos3[:, b][:, r], None, None
            if bool((enc["input_ids"][b] == image_id).any()):  # the processor's patches come in row order
                n = int(grid[g].prod())
                piece["pixel_values"], piece["image_grid_thw"] = enc["pixel_values"][start:start + n], grid[g]
                start, g = start + n, g + 1
            got[k] = piece
            if cache is not None:
                cache.put(k, piece)
    return [got[k] for k in keys]


def encode_packed_micro_batch(model, processor, samples, prompt_lens, resp_ids, rows, system, device,
                              need_image=False, pixels=(None, None), unscored=None, cache=None, share=0):
    """`rows` (lists of sample indices) packed one after another into the rows of a teacher-forcing batch.

    Each sample keeps its own positions (M-RoPE, from `rope_positions` on the ordinary padded batch) and attends
    only to itself: `position_ids` is (4, R, T), text positions first, restarting at 0 at every sample, which
    HF's Qwen2.5-VL reads as packed sequences when no attention mask is given (block-diagonal causal mask on
    SDPA / eager; varlen on FlashAttention-2). `attention_mask` still marks the real tokens (for the score mask);
    token_logprobs does not pass it to the model. pixel_values / image_grid_thw come in the packed order, since
    the model fills image tokens row-major. A text-only micro-batch with need_image gets the blank image
    (encode_micro_batch) as one more short sample, in the row with room for it, else in a row of its own.
    Log-probs equal those of encode_micro_batch's padded batch to float rounding (tests/test_sft.py).
    cache: an EncodeCache (sample_pieces), or None to encode every sample now.

    share > 0 (`--share-prefix`): the first `share` tokens, the same in every sample (shared_prefix_len: text, no
    loss), are written once at the start of each row; every later sample of the row leaves them out and attends
    to that copy, its own tokens keeping their positions (share, share + 1, ...). The row's attention is then the
    4-D mask `packed_mask` (R, 1, T, T): causal, within a sample or onto the row's prefix; the keys and values a
    sample sees are those of its own unpacked prompt, so its log-probs are too (float rounding). Needs SDPA or
    eager attention (FlashAttention-2 reads packing from the positions alone).
    """
    idxs = [i for r in rows for i in r]
    blank = need_image and all(samples[i].image is None for i in idxs)
    pieces = sample_pieces(model, processor, samples, prompt_lens, resp_ids, idxs, system, pixels, unscored, blank,
                           cache)
    slots, k = [], 0  # the pieces of each packed row
    for r in rows:
        slots.append(pieces[k:k + len(r)])
        k += len(r)
    if share:
        prefix = pieces[0]["input_ids"][:share]
        for i, p in zip(idxs + [BLANK] * blank, pieces):
            if not (torch.equal(p["input_ids"][:share], prefix) and not p["response_mask"][:share].any()
                    and not p["mm_token_type_ids"][:share].any()):
                where = "the blank image sample" if i == BLANK else samples[i].source
                raise ValueError(f"{where}: its prompt does not start with the {share} shared prefix tokens "
                                 "(shared_prefix_len over another sample list?)")

    def row_len(sl):  # a row's tokens: the prefix once, then each sample without it
        return sum(len(p["input_ids"]) - share for p in sl) + share * bool(sl)

    if blank:
        fill = [row_len(sl) for sl in slots]
        width, n = max(fill, default=0), len(pieces[-1]["input_ids"]) - share
        room = [j for j in range(len(slots)) if fill[j] + n <= width]
        if room:
            slots[min(room, key=lambda j: fill[j])].append(pieces[-1])
        else:
            slots.append([pieces[-1]])
    T = max(row_len(sl) for sl in slots)
    R, pad, first = len(slots), processor.tokenizer.pad_token_id, pieces[0]
    out = {"input_ids": torch.full((R, T), pad, dtype=first["input_ids"].dtype),
           "attention_mask": torch.zeros(R, T, dtype=first["attention_mask"].dtype),
           "mm_token_type_ids": torch.zeros(R, T, dtype=first["mm_token_type_ids"].dtype),
           "response_mask": torch.zeros(R, T, dtype=torch.bool),
           "position_ids": torch.zeros(4, R, T, dtype=first["pos3"].dtype)}
    segment = torch.full((R, T), -1)  # share: each token's sample in its row (-1: padding)
    patches, grids = [], []
    for j, sl in enumerate(slots):
        t = 0
        for k, p in enumerate(sl):
            s0 = share if k else 0  # a later sample of the row leaves the prefix out
            n = len(p["input_ids"]) - s0
            for key in ("input_ids", "attention_mask", "mm_token_type_ids", "response_mask"):
                out[key][j, t:t + n] = p[key][s0:]
            out["position_ids"][0, j, t:t + n] = torch.arange(s0, s0 + n)
            out["position_ids"][1:, j, t:t + n] = p["pos3"][:, s0:]
            segment[j, t:t + n] = k
            if p["pixel_values"] is not None:
                patches.append(p["pixel_values"])
                grids.append(p["image_grid_thw"])
            t += n
        out["position_ids"][0, j, t:] = torch.arange(T - t) + (out["position_ids"][0, j, t - 1] + 1 if t else 0)
    if patches:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(patches), torch.stack(grids)
    if share and any(len(sl) > 1 for sl in slots):  # else every row holds one sample: HF's own causal mask
        # causal, and within one sample or onto the row's prefix (padding attends within padding)
        same = segment[:, :, None] == segment[:, None, :]
        onto_prefix = (torch.arange(T) < share)[None, None, :] & (segment[:, :, None] >= 0)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        out["packed_mask"] = ((same | onto_prefix) & causal)[:, None]
    return {key: v.to(device) for key, v in out.items()}


def step_micro_batches(model, processor, samples, prompt_lens, resp_ids, keys, batch, micro, rank, world, *,
                       pack=False, group=True, system=None, device="cpu", need_image=False, pixels=(None, None),
                       unscored=None, weight=1.0, cache=None, share=0):
    """One optimizer step's global `batch` -> (this rank's [(encoded micro-batch, weight)], (real, padded) tokens
    of the whole step). Every rank plans the whole step (no communication) and gets the same number of micro-
    batches; a slot with nothing left runs a zero-weight copy of the batch's first sample (lockstep forwards).
    pack: rows of several samples (packed_micro_batches), else padded micro-batches (rank_micro_batches).
    cache: an EncodeCache for packed rows (encode_packed_micro_batch); padded micro-batches encode every time.
    share: with pack, the prompt tokens every sample starts with (shared_prefix_len), held once per row: the plan
    packs each sample's other tokens into the width left after them."""
    if pack:
        lengths = {i: prompt_lens[i] + len(resp_ids[i]) - share for i in batch}
        plan, _ = packed_micro_batches(batch, lengths, micro, world)
        cost = [packed_cost(mb, lengths, share) for r in plan for mb in r]
        encode, empty = (lambda *a, **k: encode_packed_micro_batch(model, *a, cache=cache, share=share, **k)), \
            [batch[:1]]
    else:
        plan = rank_micro_batches(batch, keys, micro, world, group)
        cost = [micro_batch_cost(mb, prompt_lens, resp_ids) for r in plan for mb in r]
        encode, empty = encode_micro_batch, batch[:1]
    mine = [(encode(processor, samples, prompt_lens, resp_ids, mb or empty, system, device, need_image=need_image,
                    pixels=pixels, unscored=unscored), weight if mb else 0.0)
            for mb in plan[rank]]
    return mine, tuple(map(sum, zip(*cost)))


# ----------------------------------------------------------------------------------------------------------
# The loss

def sft_loss(lp, response_mask, n_step, world):
    """This micro-batch's share of the step loss L = -(1 / N_step) sum_{assistant tokens of the step} log pi.

    lp (b, T): token log-probs, 0 off the response; n_step: assistant tokens of the whole optimizer step (every
    micro-batch of every rank). Token-level normalisation over the GLOBAL step; x world because DDP and FSDP2
    average gradients over ranks. Returns (loss to backward, sum of -lp on this micro-batch for logging).
    """
    nll = -(lp * response_mask).sum()
    return nll / n_step * world, nll.detach()


def forward_backward(model, micro_batches, n_step, world, autocast=contextlib.nullcontext):
    """Accumulate the step's gradient over this rank's micro-batches [(batch, weight)]; returns the summed NLL.

    note: DDP all-reduces only on the last micro-batch (no_sync before); FSDP2 reduce-scatters after every
    micro-batch, which keeps gradients sharded (ZeRO-3 memory) at the price of one reduce-scatter each.
    """
    nll_sum = torch.zeros((), dtype=torch.float64)
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for j, (batch, weight) in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        with (model.no_sync() if is_ddp and not last else contextlib.nullcontext()), autocast():
            lp = token_logprobs(model, batch)  # (b, T), log pi(y_t | ...) on assistant tokens, 0 elsewhere
            loss, nll = sft_loss(lp, batch["response_mask"], n_step, world)
            (loss * weight).backward()  # weight 0: a padding forward that keeps ranks in lockstep
        nll_sum += nll.double().cpu() * weight
    return nll_sum




# ----------------------------------------------------------------------------------------------------------
# TAPO's replay term

class Replay:
    """Stage-1 samples replayed beside RL: `batch` samples (all ranks together) per optimizer step, trained with
    coef x the step-normalised NLL above.

    The k-th replay batch is a pure function of (seed, k): epoch k // n_batches of a seeded plain shuffle, so a
    resumed run that passes the same k (tapo.py: RL step x mini-batches per step + mini-batch) replays exactly
    what the uninterrupted run did, with no state to save. Every rank plans the whole batch (no communication)
    and runs the same number of micro-batches (zero-weight copies where a rank has none).
    """

    def __init__(self, spec, processor, system, *, coef, batch, micro, max_length, pixels=(None, None),
                 image_root=None, seed=0, images_only=False, pack=False, cache_mb=0, share_prefix=False):
        self.samples = load_mixture(spec, "cot", image_root, seed)  # DataError naming the file and record
        if images_only:  # --freeze language: a text-only sample would reach no trainable parameter (as sft.py)
            self.samples = [x for x in self.samples if x.image is not None]
        if not self.samples:
            raise DataError(f"--replay {spec}: no sample" + (" with an image" if images_only else ""))
        self.processor, self.system, self.pixels = processor, system, pixels
        self.coef, self.batch, self.micro, self.seed = coef, min(batch, len(self.samples)), micro, seed
        self.pack = pack  # samples packed in rows (step_micro_batches), their encodings kept (EncodeCache)
        self.cache = EncodeCache(cache_mb) if pack and cache_mb > 0 else None
        self.prompt_lens, self.resp_ids, self.truncated = tokenize(self.samples, processor, system, max_length, pixels)
        self.unscored = unscored_positions(processor.tokenizer, self.samples, self.resp_ids)
        self.keys = grouping_keys(self.prompt_lens, self.resp_ids)
        self.share = shared_prefix_len(self.samples, processor, system) if pack and share_prefix else 0
        self.n_batches = len(epoch_batches(self.keys, self.batch, seed, 0, group=False))
        self._epoch = (None, None)

    def indices(self, k):
        """Sample indices of the k-th replay batch (k >= 0)."""
        epoch, b = divmod(k, self.n_batches)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.keys, self.batch, self.seed, epoch, group=False))
        return self._epoch[1][b]

    def backward(self, model, k, device, rank, world, need_image=False):
        """Accumulate coef x L of the k-th replay batch into the gradients. -> (this rank's summed NLL, N_step)."""
        batch = self.indices(k)
        n_step = max(1, sum(len(self.resp_ids[i]) - len(self.unscored.get(i, ())) for i in batch))
        mine, _ = step_micro_batches(model, self.processor, self.samples, self.prompt_lens, self.resp_ids, self.keys,
                                     batch, self.micro, rank, world, pack=self.pack, system=self.system,
                                     device=device, need_image=need_image, pixels=self.pixels,
                                     unscored=self.unscored, weight=self.coef, cache=self.cache, share=self.share)
        return float(forward_backward(model, mine, n_step, world)) / self.coef, n_step
