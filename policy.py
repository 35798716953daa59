"""The policy: a Qwen2.5-VL model + processor, loaded offline, scored token by token; saved as HF folders by checkpoint.py.

Every stage (sft.py, rollout.py, tapo.py, eval.py) gets its model from here (checkpoints: checkpoint.py):

    model, processor = load_policy("tiny")                      # built-in preset, no network
    model, processor = load_policy("/ckpt/Qwen2.5-VL-7B-Instruct")  # any local HF folder
    lp = token_logprobs(model, batch, temperature=1.0)           # (B, T) log pi(x_t | x_<t), 0 off-mask

Presets ("tiny", "small") are built by presets.py; real checkpoints load from local folders.

Log-probs (`token_logprobs`) are the single quantity that the SFT loss, TAPO's old / new / negative
log-probs and the rollout check all use. The LM head is applied in chunks of rows by a custom autograd
function that recomputes each chunk's logits in backward, so the extra peak memory is O(chunk x V) instead of
the (B, T, V) float32 log-softmax (see `python bench.py logprobs`).

note: the chunked head runs *inside* the model's forward (we temporarily swap `lm_head.forward`), so DDP and
FSDP2 see an ordinary forward of the root module: FSDP2 gathers the root's parameters (embeddings, final norm,
lm_head) around it as usual and reduces their gradients after backward.
"""
import contextlib
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from distributed import unwrap
from presets import PRESETS, VLProcessor, build_preset


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_processor(path):
    path = Path(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat_template = tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        f = path / name
        if chat_template is None and f.exists():
            txt = f.read_text()
            chat_template = json.loads(txt)["chat_template"] if name.endswith(".json") else txt
    return VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def load_policy(name_or_path, dtype=torch.float32, device="cpu", seed=0):
    """(model, processor) from a preset name ("tiny", "small") or a local Hugging Face folder."""
    if str(name_or_path) in PRESETS:
        model, processor = build_preset(str(name_or_path), seed=seed)
        return model.to(device=device, dtype=dtype), processor
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a preset ({', '.join(PRESETS)}) nor a folder with config.json")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{path}/config.json: model_type is {config.get('model_type')!r}, expected 'qwen2_5_vl'")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), load_processor(path)


def stop_token_ids(model, tokenizer):
    """Every id that ends a response: <|im_end|>, the tokenizer's eos and every eos of the model's
    generation_config (Qwen2.5-VL-Instruct lists [151645, 151643]: <|im_end|> and <|endoftext|>), as HF
    generate and vLLM stop on all of them."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = {tokenizer.eos_token_id} | ({im_end} if im_end != tokenizer.unk_token_id else set())
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def vision_token_ids(tokenizer):
    """Ids of the vision placeholders, which a response must never contain (rollout's suppress_ids)."""
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# Positions and log-probs

def rope_positions(model, batch):
    """3-D M-RoPE positions (3, B, T) for a padded batch (left or right padding, or both).

    Always explicit: without `mm_token_type_ids` HF silently falls back to arange positions, which are wrong
    for image tokens and for left padding (README "Release facts"). Padding positions get 0.
    """
    core = unwrap(model).model
    pos, _ = core.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"), attention_mask=batch["attention_mask"])
    return pos


class ChunkedLogprob(torch.autograd.Function):
    """log softmax(h W^T / temperature)[target], row chunk by row chunk; backward recomputes each chunk.

    h: (N, H), weight: (V, H), target: (N,) -> (N,). Peak extra memory: one (chunk, V) float32 block.
    d lp / d z = onehot(target) - softmax(z), z = h W^T / temperature.
    """

    @staticmethod
    def forward(ctx, h, weight, target, temperature, chunk):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            z = (h[s:s + chunk] @ weight.t()).float() / temperature  # (c, V)
            out[s:s + chunk] = z.gather(1, target[s:s + chunk, None]).squeeze(1) - torch.logsumexp(z, dim=1)
        ctx.save_for_backward(h, weight, target)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, target = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            z = (hc @ weight.t()).float() / temperature  # (c, V), recomputed
            g = -torch.softmax(z, dim=1)
            g.scatter_add_(1, target[s:s + chunk, None], torch.ones_like(g[:, :1]))
            g.mul_(grad_out[s:s + chunk, None] / temperature)  # (c, V): d loss / d (h W^T)
            if grad_h is not None:
                grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc.float())
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def default_chunk(vocab_size):
    """Rows per chunk so that one (chunk, V) float32 block is about 64 MiB (110 rows at Qwen's 151,936)."""
    return max(16, (1 << 24) // vocab_size)


def chunked_logprobs(h, weight, target, temperature=1.0, chunk=None):
    """(N,) log-probs of `target` under logits h W^T / temperature, never holding more than chunk x V."""
    chunk = chunk or default_chunk(weight.shape[0])
    return ChunkedLogprob.apply(h, weight, target, float(temperature), int(chunk))


def naive_logprobs(h, weight, target, temperature=1.0):
    """The slow oracle: full (N, V) float32 log-softmax, then gather."""
    return torch.log_softmax((h @ weight.t()).float() / temperature, dim=-1).gather(1, target[:, None]).squeeze(1)


@contextlib.contextmanager
def logprob_head(model, target_ids, score_mask, temperature, chunk, out):
    """Swap lm_head.forward for the chunked log-prob head for one forward call of the root module."""
    head = unwrap(model).lm_head
    original = head.forward

    def forward(hidden):  # hidden: (B, T, H), final-norm output
        sel = score_mask[:, 1:]  # token t is predicted from position t-1
        h = hidden[:, :-1][sel]  # (N, H)
        lp = chunked_logprobs(h, head.weight, target_ids[:, 1:][sel], temperature, chunk)  # (N,)
        full = torch.zeros(score_mask.shape, dtype=lp.dtype, device=lp.device)
        full[:, 1:] = full[:, 1:].masked_scatter(sel, lp)
        out.append(full)
        return full[:, :, None]  # shaped like logits so HF's forward is happy

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # back to the class method
        assert head.forward.__func__ is original.__func__


def takes_packed_mask(model):
    """Whether the model's attention takes a shared-prefix row's 4-D mask (packed_attention): SDPA and eager do."""
    return unwrap(model).config._attn_implementation in ("sdpa", "eager")


def packed_attention(model, packed_mask):
    """The attention mask of packed rows for the model's forward: None (HF builds the block-diagonal mask from the
    positions), or a shared-prefix row's 4-D boolean mask (B, 1, T, T), which HF passes through as it is: SDPA
    takes it as is, eager attention as an additive float mask. FlashAttention-2 ignores 4-D masks: refused."""
    if packed_mask is None:
        return None
    impl = unwrap(model).config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"shared-prefix packed rows need SDPA or eager attention, the model uses {impl!r}: "
                         "pass --no-share-prefix")
    return kernel_mask(packed_mask, impl, next(unwrap(model).parameters()).dtype)


def kernel_mask(ok, impl, dtype):
    """A boolean attention mask (True: may attend) in the kernel's convention: SDPA takes it as is, eager attention
    as an additive float mask (0 / the dtype's min)."""
    if impl == "sdpa":
        return ok
    assert impl == "eager", f"attention implementation {impl!r}: only sdpa and eager take an explicit mask"
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)


def token_logprobs(model, batch, score_mask=None, temperature=1.0, chunk=None):
    """Teacher-forced log pi(x_t | x_<t, image) / temperature-scaled, for every position where score_mask.

    batch: input_ids, attention_mask (B, T) with any mix of left / right padding, mm_token_type_ids,
    pixel_values and image_grid_thw when there are images. score_mask (B, T) bool, default
    batch["response_mask"]. Returns (B, T) float32, zero where not scored (and always at t = 0).
    With grad enabled this is differentiable w.r.t. the model (the chunked head recomputes in backward).

    note: under DDP / FSDP2 the vision tower must run on every rank or on none: a text-only micro-batch on one
    rank would leave DDP waiting for gradients and FSDP2's all-gathers out of order. sft.py adds a blank image
    row to text-only micro-batches under torchrun; TAPO and eval batches always hold images.
    """
    if score_mask is None:
        score_mask = batch["response_mask"]
    score_mask = score_mask.bool() & batch["attention_mask"].bool()
    packed = batch.get("position_ids")  # (4, B, T): samples packed in rows (supervised.encode_packed_micro_batch)
    mask = batch["attention_mask"] if packed is None else packed_attention(model, batch.get("packed_mask"))
    out = []
    with logprob_head(model, batch["input_ids"], score_mask, temperature, chunk, out):
        model(input_ids=batch["input_ids"], attention_mask=mask,
              position_ids=packed if packed is not None else rope_positions(model, batch),
              pixel_values=batch.get("pixel_values"),
              image_grid_thw=batch.get("image_grid_thw"), mm_token_type_ids=batch["mm_token_type_ids"],
              use_cache=False)
    return out[0]


@torch.no_grad()
def image_embeddings(model, processor, images, batch_size=16):
    """(N, D) mean-pooled vision-tower features (after the merger), one row per PIL image."""
    visual = unwrap(model).model.visual
    rows = []
    for s in range(0, len(images), batch_size):
        enc = processor.image_processor(images=images[s:s + batch_size], return_tensors="pt")
        grid = enc["image_grid_thw"]
        feats = visual(enc["pixel_values"].to(visual.dtype), grid_thw=grid).pooler_output  # (sum tokens, D)
        sizes = (grid.prod(-1) // visual.spatial_merge_size ** 2).tolist()
        rows += [f.float().mean(0) for f in torch.split(feats, sizes)]
    return torch.stack(rows)
