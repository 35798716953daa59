"""Rollouts: a batched, KV-cached sampler for Qwen2.5-VL in plain PyTorch (TAPO's sampling step, eval decoding).

    ro = generate(model, prompt_batch, n=5, max_new_tokens=2048, temperature=1.0, top_p=0.99,
                  stop_ids=[im_end], pad_id=pad, seeds=step)       # R = B * n rows, row r = prompt r // n
    texts = decode(processor.tokenizer, ro)                          # for the reward
    lp = token_logprobs(model, to_train_batch(prompt_batch, ro))     # == ro.logprobs on ro.mask (fp32)

The paper's TAPO samples n1 = n2 = 5 responses per (prompt, anchor) and (prompt, positive) (README
"Release facts"); the release samples with vLLM, Visual-RFT / VLM-R1 with HF `generate`. This file is the loop a
reader can follow line by line; `python bench.py rollout` times it against HF `generate` on TAPO's workload.

What it implements
1. Shared prefix: each distinct prompt row (prompt + image) is prefilled once, with `logits_to_keep=1`: a
   5 + 5 TAPO group costs 2 prefills, not 10. Its K/V is then kept ONCE for its n samples (`KVCache`): the
   n rows share it, which is the issue's "expand the cache to n samples" without the n copies.
2. Shared-prefix attention (`shared_prefix_attention`, registered as an HF attention implementation for
   the decode steps only): attention over [prompt | generated] is split in two exact partial softmaxes, the
   prompt part batched per prompt over its n samples (each prompt's K/V read once per step, not n times),
   merged with their log-sum-exps (the cascade / flash-decoding identity).
3. Preallocated cache: the generated tokens' K/V live in one (rows, kv_heads, max_new_tokens, head_dim)
   buffer per layer; step t writes slot t in place and attention reads the view [:t + 1]. Nothing is
   concatenated, so a step costs O(current length), never a copy of the cache.
4. Compaction: finished rows (and prompts whose samples all finished) are dropped from the cache once at
   least a quarter of the cache rows are finished: each compaction copies the live cache once, so the
   copies add up to a few full-cache copies while finished rows stop costing compute.
5. M-RoPE: prompt positions (3, B, P) come from `get_rope_index` (policy.rope_positions: left padding,
   images of any size); new token t of a row gets position max(prompt positions) + 1 + t on all 3 axes,
   exactly what HF's rope deltas give. The prefill gets an explicit 4-D mask (causal, left padding off).
6. Sampling as HF's logits processors: logits / temperature -> top-k -> top-p (smallest set with
   cumulative probability >= top_p, at least one token) -> one draw. The returned log-prob is the
   UNfiltered log softmax(logits / temperature)[token], the quantity `policy.token_logprobs` computes.
7. Reproducible: row r draws its uniforms from its own `torch.Generator` seeded with seeds[r] (an int s
   means seeds[r] = s * 1_000_003 + r), all max_new_tokens of them up front, and samples by inverse CDF in
   token-id order, so a row's tokens depend only on its seed, its prompt and the model, not on the other
   rows of the batch (up to float rounding at an interval edge).
8. Gather once per rollout phase (`gathered`): under FSDP2 the TAPO loop runs its rollouts inside
   `with rollout.gathered(model):`, which all-gathers every FSDP unit once (FSDP2's own `unshard`, in its
   `param_dtype`: bf16 on GPU) and turns off reshard-after-forward until the phase ends, so decode steps make
   no collective at all (verl's / EasyR1's "hybrid engine" without the second engine). Memory: README
   "Rollout memory".
9. Distributed lockstep, only where it is still needed: with `sync` (default: distributed AND some
   parameter is still an FSDP2 shard, i.e. outside `gathered`) every rank all-reduces a "still decoding"
   flag once per step and keeps calling forward (on a one-row dummy) until no rank has work left, because
   a sharded forward all-gathers parameters: a rank that stopped early would leave the others waiting in a
   collective forever. Gathered (or DDP: `generate` runs the unwrapped module, whose forward has no
   collective, not DDP's, which would broadcast buffers every call) each rank stops on its own.
10. The update's teacher forcing reuses idea 1 (`shared_prompt_logprobs`, tapo.py --share-prompt): each distinct
   prompt is run once with its K/V and autograd graph kept, and its responses attend to [that K/V | their own],
   so a 5 + 5 group's forward + backward computes two prompts, not ten (projections, MLPs, vision tower; the
   prompt's K/V are still gathered per response row for attention): 0.6x the time on the world, same gradient.

Deviations / limits
1. Prefill runs the model's own "sdpa" or "eager" attention (with our mask); flash-attention is not wired.
   Decode steps always use `shared_prefix_attention` (matmuls + softmax in float32; bf16 models included).
2. Padded prompt slots keep their K/V in the cache (masked out), as in HF `generate`.
3. Under `sync` (sharded), either every rank's prompts have images or none do (FSDP2 gathers the vision
   tower only when it runs); a mixed call raises instead of hanging. Gathered, any mix works.
4. The decode step is eager PyTorch (no CUDA graphs / torch.compile): on a GPU a small model is bound by
   kernel launches, not by the work saved here.
5. `gathered` uses only FSDP2's public `set_reshard_after_forward`: on exit it sets each unit back to
   `distributed.wrap`'s setting (distributed.RESHARD_AFTER_FORWARD), so a model sharded with other settings
   comes out of a rollout phase with wrap's (tested: training after a phase makes the same collectives).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AttentionInterface

from distributed import RESHARD_AFTER_FORWARD, all_any, all_sum, unwrap
from policy import kernel_mask, logprob_head, rope_positions

COMPACT_FRACTION = 4  # compact once >= 1/4 of the cache rows are finished
ATTN = "rollout_shared_prefix"  # attention implementation of decode steps (registered below)


@dataclass
class Rollout:
    tokens: torch.LongTensor        # (R, L) sampled ids, right-padded with pad_id; row r = prompt r // n
    logprobs: torch.FloatTensor     # (R, L) log softmax(logits / T)[token], unfiltered; 0 on padding
    mask: torch.BoolTensor          # (R, L) True on generated tokens, incl. the stop token
    lengths: torch.LongTensor       # (R,) generated tokens, incl. the stop token
    finish: list                    # "stop" | "length" per row
    prompt_index: torch.LongTensor  # (R,) = arange(R) // n


class KVCache:
    """Per layer: the prompt K/V (G, kv_heads, P, head_dim), ONE copy per prompt shared by its n samples, and
    a preallocated (rows, kv_heads, max_new_tokens, head_dim) buffer for the generated tokens' K/V.

    The model calls `update(k, v, layer_idx)` from inside each attention layer (HF's Cache protocol). At
    prefill (`t is None`) it keeps the prompt K/V; at decode it writes generated slot t in place and returns
    the views [:t + 1], which `shared_prefix_attention` combines with the prompt part.
    """

    def __init__(self, n_layers):
        self.pk, self.pv = [None] * n_layers, [None] * n_layers  # prompt K/V, (G, h, P, d)
        self.sk, self.sv = [None] * n_layers, [None] * n_layers  # generated K/V, (rows, h, max_new, d)
        self.t = None

    def update(self, k, v, layer_idx, *args, **kwargs):  # k, v: (rows, kv_heads, q_len, head_dim)
        if self.t is None:  # note: contiguous, or every decode matmul would copy the (transposed) prompt K/V
            self.pk[layer_idx], self.pv[layer_idx] = k.contiguous(), v.contiguous()
            return k, v
        K, V = self.sk[layer_idx], self.sv[layer_idx]
        K[:, :, self.t] = k[:, :, 0]
        V[:, :, self.t] = v[:, :, 0]
        return K[:, :, :self.t + 1], V[:, :, :self.t + 1]

    def allocate(self, rows, max_new):
        for i, k in enumerate(self.pk):
            self.sk[i] = k.new_empty(rows, k.shape[1], max_new, k.shape[3])
            self.sv[i] = k.new_empty(rows, k.shape[1], max_new, k.shape[3])

    def select(self, rows, groups, filled):
        """Keep cache rows `rows` and prompts `groups`; only the first `filled` generated slots are copied."""
        for i in range(len(self.pk)):
            self.pk[i], self.pv[i] = self.pk[i][groups], self.pv[i][groups]
            for buf in (self.sk, self.sv):
                new = buf[i].new_empty((len(rows),) + buf[i].shape[1:])
                new[:, :, :filled] = buf[i][rows, :, :filled]
                buf[i] = new


@dataclass
class SharedPrefix:
    """Handed to the attention layers of a decode step (in place of a mask): where each row's prompt K/V is."""
    cache: KVCache
    bias: torch.Tensor     # (G, 1, 1, P) float32: 0 on prompt tokens, -inf on left padding
    slot: torch.LongTensor  # (rows,) = group * n + sample: each cache row's place in the (G, n) query grid
    n: int


def _softmax_av(s, v):
    """softmax(s) @ v and logsumexp(s) over the last dim; s float32 (..., q, L), v (..., L, d)."""
    m = s.amax(-1, keepdim=True)
    e = (s - m).exp()
    z = e.sum(-1, keepdim=True)
    return (e.to(v.dtype) @ v).float() / z, m + z.log()


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention of one new token per row over [its prompt | its generated tokens] (HF attention interface).

    The prompt part is computed per prompt for all its samples at once: queries are regrouped into a
    (G, kv_heads, n * rep, d) grid, so each prompt's K/V is read once per step instead of n times. The two
    partial softmaxes are merged with their log-sum-exps (exact, as in flash / cascade attention).
    query: (rows, heads, 1, d); key, value: (rows, kv_heads, t + 1, d) generated part. -> (rows, 1, heads, d)
    """
    sp = attention_mask
    rows, h, _, d = query.shape
    kvh = key.shape[1]
    rep, n = h // kvh, sp.n
    Kp, Vp = sp.cache.pk[module.layer_idx], sp.cache.pv[module.layer_idx]          # (G, kvh, P, d)
    G = Kp.shape[0]
    q = query.reshape(rows, kvh, rep, d) * scaling  # heads j * rep .. j * rep + rep - 1 share kv head j
    # prompt part: one (n * rep, P) score block per prompt and kv head
    qg = q.new_zeros(G * n, kvh, rep, d).index_copy_(0, sp.slot, q)
    qg = qg.view(G, n, kvh, rep, d).transpose(1, 2).reshape(G, kvh, n * rep, d)
    s = (qg @ Kp.transpose(-1, -2)).float().add_(sp.bias)                            # (G, kvh, n * rep, P)
    o1, lse1 = _softmax_av(s, Vp)                                                     # (G, kvh, n * rep, .)
    o1, lse1 = (x.view(G, kvh, n, rep, -1).transpose(1, 2).reshape(G * n, kvh, rep, -1)[sp.slot]
                for x in (o1, lse1))                                                  # (rows, kvh, rep, .)
    # generated part: per row
    o2, lse2 = _softmax_av((q @ key.transpose(-1, -2)).float(), value)               # (rows, kvh, rep, .)
    lse = torch.logaddexp(lse1, lse2)
    out = o1 * (lse1 - lse).exp() + o2 * (lse2 - lse).exp()
    return out.to(query.dtype).reshape(rows, 1, h, d), None


AttentionInterface.register(ATTN, shared_prefix_attention)


# ----------------------------------------------------------------------------------------------------------
# Sampling (HF order: temperature -> top-k -> top-p -> draw)

# top-p without top-k first looks at this many most likely tokens (torch.topk, ~5x cheaper than sorting a
# 1024-token row on CPU); a row whose top tokens hold less than top_p of the mass falls back to the full sort
TOP_P_PREFIX = 64


def filter_logits(z, top_k=0, top_p=1.0):
    """Tempered logits z (rows, V) with top-k then top-p applied: removed tokens get -inf (vocabulary order).

    top-k keeps every token whose logit is >= the k-th largest (ties kept, as HF's TopKLogitsWarper); top-p
    keeps the smallest set of most likely tokens whose probability (after top-k) sums to >= top_p, and at
    least one token (HF's TopPLogitsWarper).
    """
    V = z.shape[-1]
    if (not top_k or top_k >= V) and top_p < 1.0 and V > TOP_P_PREFIX:
        # top-p alone: a token is removed iff the mass ranked above it reaches top_p, so when the prefix's mass
        # reaches top_p every token below the prefix goes and the prefix's own decisions are the full sort's
        vals, idx = z.topk(TOP_P_PREFIX, dim=-1)                     # (rows, m), descending
        p = (vals - z.logsumexp(-1, keepdim=True)).exp()
        c = p.cumsum(-1)
        covered = c[:, -1] >= top_p
        if bool(covered.all()):
            keep = c - p < top_p
            keep[:, 0] = True  # the most likely token always stays (top_p = 0 -> greedy)
            return torch.full_like(z, float("-inf")).scatter(1, idx, vals.masked_fill(~keep, float("-inf")))
        out = torch.empty_like(z)
        out[covered] = filter_logits(z[covered], 0, top_p)  # by the prefix (covered rows only)
        out[~covered] = _filter_sorted(z[~covered], 0, top_p)
        return out
    return _filter_sorted(z, top_k, top_p)


def _filter_sorted(z, top_k, top_p):
    """filter_logits by one full sort of each row (any top-k / top-p)."""
    zs, order = z.sort(dim=-1, descending=True)
    if top_k and top_k < z.shape[-1]:
        zs = zs.masked_fill(zs < zs[:, top_k - 1:top_k], float("-inf"))
    if top_p < 1.0:
        p = zs.softmax(-1)
        remove = p.cumsum(-1) - p >= top_p  # the mass ranked above a token already reaches top_p
        remove[:, 0] = False  # the most likely token always stays (top_p = 0 -> greedy)
        zs = zs.masked_fill(remove, float("-inf"))
    return z.scatter(1, order, zs)


def sample(z, u, top_k=0, top_p=1.0):
    """Token ids (rows,) drawn by inverse CDF, in vocabulary order, with uniforms u (rows,) in [0, 1).

    note: the CDF runs over token ids, not over sorted probabilities, so a perturbation of the logits in the
    last bits (another batch, another kernel) moves a draw only when u sits at an interval edge, and never
    by reordering near-tied tokens.
    """
    if top_k or top_p < 1.0:
        z = filter_logits(z, top_k, top_p)
    cdf = z.softmax(-1).cumsum(-1)                                                 # (rows, V)
    j = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)  # first cdf > u * total
    # u * total can round up to total (j = V): fall back to the last token with probability > 0
    last = torch.where(z > float("-inf"), torch.arange(z.shape[-1], device=z.device), 0).amax(-1)
    return torch.minimum(j, last)


def row_seeds(seeds, R):
    """One seed per output row: a list as given, an int s -> s * 1_000_003 + r, None -> a base seed drawn
    from torch's global RNG (so torch.manual_seed makes it reproducible)."""
    if seeds is None:
        seeds = int(torch.randint(0, 2**31 - 1, ()))
    if isinstance(seeds, (list, tuple)) or (torch.is_tensor(seeds) and seeds.dim() == 1):
        assert len(seeds) == R, f"{len(seeds)} seeds for {R} output rows (B * n)"
        return [int(s) for s in seeds]
    return [int(seeds) * 1_000_003 + r for r in range(R)]


# ----------------------------------------------------------------------------------------------------------
# Gather once per rollout phase (FSDP2)

def sharded(model):
    """True while some parameter is an FSDP2 shard (a DTensor): every forward would all-gather it."""
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def gathered(model, enabled=True):
    """Run a rollout phase with every FSDP2 unit's parameters gathered ONCE, not once per forward.

        with rollout.gathered(model, enabled=not args.rollout_sharded):
            ro = rollout.generate(model, ...)   # no collective per decode step; ranks stop independently

    On enter: reshard-after-forward off for every unit, then `unshard()` each (one all-gather each, in the
    MixedPrecisionPolicy's param_dtype); forwards then find their parameters gathered and keep them. On exit:
    each unit's reshard-after-forward back to `distributed.wrap`'s (the decoder layers and the vision tower
    reshard, the root does not) and `reshard()` (frees the gathered copies). Public FSDP2 API only
    (`set_reshard_after_forward`, the switch its docs give for evals); a model sharded with other settings than
    `distributed.wrap`'s gets wrap's back. A no-op without FSDP2 (DDP, single process) or with enabled=False
    (models that do not fit gathered: the sharded, lockstep path). Only forward passes belong inside: there
    is no gradient reduction for gathered parameters.
    """
    units = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]  # root first
    if not enabled or not units:
        yield model
        return
    units[0].set_reshard_after_forward(False)  # recursive: every unit keeps its parameters after forward
    for u in units:
        u.unshard()  # collective: one all-gather per unit, the only parameter traffic of the phase
    try:
        yield model
    finally:
        units[0].set_reshard_after_forward(RESHARD_AFTER_FORWARD["root"], recurse=False)
        for u in units[1:]:
            u.set_reshard_after_forward(RESHARD_AFTER_FORWARD["unit"], recurse=False)
        for u in units:
            u.reshard()  # local: drop the gathered copies, point the module at its shards again


# ----------------------------------------------------------------------------------------------------------
# The sampler

def _prefill_mask(am, impl, dtype):
    """(B, 1, P, P) causal mask over a left-padded prompt, in the kernel's convention (sdpa: bool, eager: additive).

    note: a padding query attends to itself only, so no mask row is empty (an all-False row makes sdpa NaN).
    """
    P = am.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=am.device).tril()
    ok = (causal[None] & am[:, None, :]) | torch.eye(P, dtype=torch.bool, device=am.device)
    return kernel_mask(ok[:, None], impl, dtype)


@torch.no_grad()
def generate(model, batch, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, greedy=False,
             stop_ids=(), pad_id=0, seeds=None, sync=None, suppress_ids=(), repetition_penalty=1.0):
    """Sample n responses per prompt row of a LEFT-padded batch (data.encode_prompts). Returns a Rollout on CPU.

    Output row r is sample r % n of prompt r // n. seeds: None (a base seed drawn from torch's global RNG),
    an int s (row r uses s * 1_000_003 + r) or one int per output row. Greedy ignores temperature / top-p /
    top-k and reports log-probs at temperature 1. sync: lockstep over ranks (default: distributed and the
    parameters still sharded, i.e. FSDP2 outside `gathered`).
    suppress_ids: tokens never sampled (e.g. policy.vision_token_ids: an <|image_pad|> inside a response
    would break the teacher-forced forward, which counts image tokens); reported log-probs stay unfiltered.
    repetition_penalty: HF's RepetitionPenaltyLogitsProcessor (the release's eval applies generation_config's):
    the logit of every token already in the row (prompt, padding included, and response) is divided by it
    when positive, multiplied when negative, before temperature; reported log-probs stay unpenalised.
    """
    assert max_new_tokens >= 1, "max_new_tokens must be >= 1"
    model = unwrap(model)  # DDP -> the HF model; FSDP2 modules are the model itself
    dev = next(model.parameters()).device
    attn_cfg = model.model.language_model.config  # the config object the attention layers read
    if sync is None:  # only a sharded forward makes collectives; gathered / DDP ranks stop on their own
        sync = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and sharded(model)
    ids, am = batch["input_ids"].to(dev), batch["attention_mask"].to(dev).bool()
    B, P = ids.shape
    R = B * n
    temperature = 1.0 if greedy else float(temperature)
    gens = [torch.Generator().manual_seed(s) for s in row_seeds(seeds, R)]
    # (R, max_new) uniforms, drawn on CPU from each row's own generator: independent of the batch and device
    uniforms = torch.stack([torch.rand(max_new_tokens, generator=g) for g in gens]).to(dev)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    suppress = torch.tensor(sorted(set(suppress_ids)), dtype=torch.long, device=dev) if len(suppress_ids) else None

    # ---- prefill: each distinct prompt row once (B rows), only the last position's logits -------------
    has_pix = batch.get("pixel_values") is not None
    if sync:
        with_images = all_sum(float(has_pix))  # collective: ranks with images (FSDP2 gathers the vision tower)
        if 0 < with_images < torch.distributed.get_world_size():
            raise ValueError("under sync, either every rank's prompts have images or none do (see Deviations 3)")
    pos = rope_positions(model, {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()})
    next_pos = pos.masked_fill(~am[None], -1).amax(dim=(0, 2)) + 1            # (B,) first new position
    cache = KVCache(attn_cfg.num_hidden_layers)
    m4 = _prefill_mask(am, attn_cfg._attn_implementation, next(model.parameters()).dtype)
    out = model(input_ids=ids, attention_mask={"full_attention": m4}, position_ids=pos, cache=cache,
                use_cache=True, logits_to_keep=1, mm_token_type_ids=batch["mm_token_type_ids"].to(dev),
                pixel_values=batch["pixel_values"].to(dev) if has_pix else None,
                image_grid_thw=batch["image_grid_thw"].to(dev) if has_pix else None)
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)                 # (R, V): n rows per prompt
    seen = None  # (R, V) tokens already in each output row, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(R, logits.shape[-1], dtype=torch.bool, device=dev)
        seen.scatter_(1, ids.repeat_interleave(n, 0), True)

    # ---- decode state: cache row i is output row rows[i], of prompt group[i] ------------------------
    cache.allocate(R, max_new_tokens)
    cache.t = 0
    bias = torch.zeros(am.shape, device=dev).masked_fill_(~am, float("-inf"))[:, None, None]  # (G, 1, 1, P)
    rows = torch.arange(R, device=dev)
    group = rows // n
    alive = torch.ones(R, dtype=torch.bool, device=dev)
    tokens = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    logprobs = torch.zeros(R, max_new_tokens, device=dev)
    gen_mask = torch.zeros(R, max_new_tokens, dtype=torch.bool, device=dev)
    stopped = torch.zeros(R, dtype=torch.bool, device=dev)
    t, running = 0, True
    impl, attn_cfg._attn_implementation = attn_cfg._attn_implementation, ATTN  # decode: shared-prefix attention
    try:
        while True:
            if running:
                # ---- sample token t of every cache row from its logits (rows, V) ----------------------
                z = logits / temperature
                logp = torch.log_softmax(z, dim=-1)
                if seen is not None:
                    s = seen[rows]
                    z = torch.where(s, torch.where(logits < 0, logits * repetition_penalty,
                                                   logits / repetition_penalty), logits) / temperature
                if suppress is not None:
                    z = z.index_fill(1, suppress, float("-inf"))
                tok = z.argmax(-1) if greedy else sample(z, uniforms[rows, t], top_k, top_p)
                lp = logp.gather(1, tok[:, None]).squeeze(1)
                if seen is not None:
                    seen[rows, tok] = True
                # ---- record (finished rows still in the cache write padding) --------------------------
                tokens[rows, t] = torch.where(alive, tok, pad_id)
                logprobs[rows, t] = torch.where(alive, lp, 0.0)
                gen_mask[rows, t] = alive
                hit = alive & torch.isin(tok, stop)
                stopped[rows] |= hit
                alive &= ~hit
                t += 1
                n_alive = int(alive.sum())  # the one host sync per step
                running = n_alive > 0 and t < max_new_tokens
            # ---- lockstep (sharded FSDP2 only): the ranks decide together whether anyone needs a forward
            if not (all_any(running) if sync else running):  # collective under sync: one all-reduce a step
                break
            if running:
                # ---- compaction: drop finished rows (and finished prompts) once >= 1/4 are finished --
                dead = len(rows) - n_alive
                if dead * COMPACT_FRACTION >= len(rows) > n_alive:
                    keep = alive.nonzero().squeeze(1)
                    groups = group[keep].unique()                               # sorted live prompts
                    remap = torch.full((len(bias),), -1, dtype=torch.long, device=dev)
                    remap[groups] = torch.arange(len(groups), device=dev)
                    cache.select(keep, groups, t - 1)  # generated slots 0 .. t - 2 are filled
                    rows, alive, tok, group, bias = rows[keep], alive[keep], tok[keep], remap[group[keep]], \
                        bias[groups]
                feed, cache.t = tok, t - 1  # token t - 1 goes to generated slot t - 1
                position = (next_pos[rows // n] + t - 1)[None, :, None].expand(3, -1, 1)  # (3, rows, 1)
            else:
                # ---- this rank is done, another is not: one-row dummy forwards (FSDP2 lockstep) -------
                if len(rows) > 1:
                    cache.select(torch.zeros(1, dtype=torch.long, device=dev), group[:1], 0)
                    rows, alive, group, bias = rows[:1], alive[:1] & False, group[:1] * 0, bias[group[:1]]
                feed, cache.t = torch.full((1,), pad_id, device=dev), 0  # outputs unused: overwrite slot 0
                position = next_pos[rows // n][None, :, None].expand(3, -1, 1)
            sp = SharedPrefix(cache, bias, group * n + rows % n, n)
            logits = model(input_ids=feed[:, None], attention_mask={"full_attention": sp}, position_ids=position,
                           cache=cache, use_cache=True).logits[:, -1].float()
    finally:
        attn_cfg._attn_implementation = impl

    # ---- trim to the longest response --------------------------------------------------------------
    lengths = gen_mask.sum(1)
    L = int(lengths.max())
    return Rollout(tokens=tokens[:, :L].cpu(), logprobs=logprobs[:, :L].cpu(), mask=gen_mask[:, :L].cpu(),
                   lengths=lengths.cpu(), finish=["stop" if s else "length" for s in stopped.tolist()],
                   prompt_index=torch.arange(R) // n)


# ----------------------------------------------------------------------------------------------------------
# Helpers for the reward and the update

def decode(tokenizer, rollout):
    """Text of each row's generated tokens, without the stop token and padding (for the reward)."""
    out = []
    for r in range(len(rollout.finish)):
        ids = rollout.tokens[r, :int(rollout.lengths[r])].tolist()
        if rollout.finish[r] == "stop":
            ids = ids[:-1]
        out.append(tokenizer.decode(ids, skip_special_tokens=False))
    return out


def _image_rows(batch):
    """For each prompt row, the indices of its images in image_grid_thw (images are stored in row order)."""
    grid = batch.get("image_grid_thw")
    if grid is None or batch.get("pixel_values") is None:
        return [[] for _ in range(batch["input_ids"].shape[0])]
    per_row = (batch["mm_token_type_ids"] == 1).sum(1)                # image tokens in each row
    merge = int(grid.prod(-1).sum()) // max(1, int(per_row.sum()))      # patches per token (merge size ** 2)
    tokens_per_image, per_row = (grid.prod(-1) // merge).tolist(), per_row.tolist()
    out, i = [], 0
    for need in per_row:
        mine = []
        while need > 0:
            mine.append(i)
            need -= tokens_per_image[i]
            i += 1
        out.append(mine)
    return out


def to_train_batch(prompt_batch, rollout):
    """Teacher-forcing batch [prompt row r // n | response r] (data.join_prompt_response's layout).

    pixel_values / image_grid_thw are repeated per output row: each prompt's patch block n times in a row.
    """
    ids, am = prompt_batch["input_ids"], prompt_batch["attention_mask"]
    dev, P = ids.device, ids.shape[1]
    idx = rollout.prompt_index.to(dev)
    resp, rmask = rollout.tokens.to(dev, ids.dtype), rollout.mask.to(dev)
    mm = prompt_batch.get("mm_token_type_ids", torch.zeros_like(ids))
    out = {"input_ids": torch.cat([ids[idx], resp], 1),                                   # (R, P + L)
           "attention_mask": torch.cat([am[idx], rmask.to(am.dtype)], 1),
           "mm_token_type_ids": torch.cat([mm[idx], torch.zeros_like(resp, dtype=mm.dtype)], 1),
           "response_mask": torch.cat([torch.zeros(len(idx), P, dtype=torch.bool, device=dev), rmask], 1),
           "prompt_len": P}
    if prompt_batch.get("pixel_values") is not None:
        grid = prompt_batch["image_grid_thw"]
        starts = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)]).tolist()     # patch offsets per image
        of_row = _image_rows(prompt_batch)
        images = [i for p in rollout.prompt_index.tolist() for i in of_row[p]]
        patches = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in images])  # (R-repeated patches,)
        out["pixel_values"] = prompt_batch["pixel_values"][patches.to(prompt_batch["pixel_values"].device)]
        out["image_grid_thw"] = grid[images]
    return out


# ----------------------------------------------------------------------------------------------------------
# Teacher forcing with shared prompts (the update's forward: tapo.py --share-prompt)

class PromptCache:
    """HF Cache protocol for `shared_prompt_logprobs`: the first forward (`index` None) keeps each layer's prompt
    K/V, one copy per distinct prompt (G, kv_heads, P, head_dim), with their autograd graph; the second prepends
    to each response row's own K/V its prompt's, Kp[index], so the rows attend to [their prompt | themselves]."""

    def __init__(self, n_layers):
        self.pk, self.pv = [None] * n_layers, [None] * n_layers
        self.index = None  # (R,) each response row's prompt, set before the second forward

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.index is None:
            self.pk[layer_idx], self.pv[layer_idx] = k, v
            return k, v
        return (torch.cat([self.pk[layer_idx][self.index], k], 2),
                torch.cat([self.pv[layer_idx][self.index], v], 2))


def shared_prompt_logprobs(model, prompt_batch, index, responses, pad_id, temperature=1.0, chunk=None):
    """Teacher-forced log pi(y_t | prompt, y_<t) / temperature of each response, each distinct prompt run ONCE.

    prompt_batch: G distinct LEFT-padded prompt rows (data.stack_prompts, images included); index (R,): the
    prompt row of each response; responses: R lists of token ids. -> ((R, L) log-probs, (R, L) bool mask),
    L the longest response, zeros past each response's end: token_logprobs(model, batch)[:, P:] of the
    unshared batch [prompt index[r] | response r] (data.join_prompt_response), to float rounding (tests).

    Two forwards: the prompts without their last token (G rows: image tokens, vision tower, K/V kept once per
    prompt in a PromptCache, graph included), then [last prompt token | response] for the R rows, whose keys
    are [their prompt's cached K/V | their own] under an explicit causal mask; the second forward is the root
    module's (it arms DDP's reducer for the step; each parameter's gradient, from both forwards, reaches its
    all-reduce hook once).
    A group of n responses to one prompt thus costs the prompt once instead of n times. Positions are those of
    the unshared batch (policy.rope_positions on the prompts; response token t at max prompt position + 1 + t).
    Needs the model's SDPA or eager attention, and a model whose forward keeps parameters whole across both
    forwards (not FSDP2-sharded, no activation checkpointing, which turns the cache off): tapo.py checks.
    """
    core = unwrap(model)
    dev = next(core.parameters()).device
    cfg = core.model.language_model.config
    impl, dtype = cfg._attn_implementation, next(core.parameters()).dtype
    assert impl in ("sdpa", "eager"), f"attention implementation {impl!r}: shared prompts need sdpa or eager"
    ids, am = prompt_batch["input_ids"].to(dev), prompt_batch["attention_mask"].to(dev).bool()
    G, P = ids.shape
    assert P >= 2 and bool(am[:, -1].all()), "prompts must be LEFT-padded (data.stack_prompts), 2 tokens or more"
    R, index = len(responses), torch.as_tensor(index, device=dev)
    pos = rope_positions(core, {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in prompt_batch.items()})
    next_pos = pos.masked_fill(~am[None], -1).amax(dim=(0, 2)) + 1             # (G,) first response position
    cache = PromptCache(cfg.num_hidden_layers)
    has_pix = prompt_batch.get("pixel_values") is not None
    # ---- 1. the prompts minus their last token, once each (the language model only: no head) -----------
    core.model(input_ids=ids[:, :P - 1], attention_mask={"full_attention": _prefill_mask(am[:, :P - 1], impl, dtype)},
               position_ids=pos[:, :, :P - 1], cache=cache, use_cache=True,
               mm_token_type_ids=prompt_batch["mm_token_type_ids"][:, :P - 1].to(dev),
               pixel_values=prompt_batch["pixel_values"].to(dev) if has_pix else None,
               image_grid_thw=prompt_batch["image_grid_thw"].to(dev) if has_pix else None)
    # ---- 2. [last prompt token | response] per row, attending to [its prompt's K/V | itself] -------------
    L = max((len(r) for r in responses), default=0)
    x = torch.full((R, L + 1), pad_id, dtype=ids.dtype, device=dev)
    x[:, 0] = ids[index, P - 1]
    rmask = torch.zeros(R, L + 1, dtype=torch.bool, device=dev)
    for r, resp in enumerate(responses):
        x[r, 1:1 + len(resp)] = torch.as_tensor(resp, dtype=ids.dtype)
        rmask[r, 1:1 + len(resp)] = True
    t = torch.arange(L + 1, device=dev)
    rpos = torch.cat([pos[:, index, P - 1:], (next_pos[index, None] + t[:-1])[None].expand(3, -1, -1)], 2)
    causal = torch.ones(L + 1, L + 1, dtype=torch.bool, device=dev).tril()
    ok = torch.cat([am[index, None, :P - 1].expand(-1, L + 1, -1), causal[None].expand(R, -1, -1)], 2)[:, None]
    mask = kernel_mask(ok, impl, dtype)
    cache.index = index
    out = []
    with logprob_head(model, x, rmask, temperature, chunk, out):
        model(input_ids=x, attention_mask={"full_attention": mask}, position_ids=rpos, cache=cache, use_cache=True,
              mm_token_type_ids=torch.zeros_like(x))
    return out[0][:, 1:], rmask[:, 1:]
