"""The policy: a Qwen2.5-VL model + processor, loaded offline, scored token by token; saved as HF folders by checkpoint.py.

Every stage (sft.py, rollout.py, tapo.py, eval.py) gets its model from here (checkpoints: checkpoint.py):

    model, processor = load_policy("tiny")                      # built-in preset, no network
    model, processor = load_policy("/ckpt/Qwen2.5-VL-7B-Instruct")  # any local HF folder
    lp = token_logprobs(model, batch, temperature=1.0)           # (B, T) log pi(x_t | x_<t), 0 off-mask

Presets are real `Qwen2_5_VLForConditionalGeneration` models built from a small config, with a byte-level
BPE tokenizer trained here (Qwen's pre-tokenizer, special tokens and chat template) and the PIL image
processor (no torchvision). They are deterministic for a given seed: the tokenizer training corpus is fixed
text and the weights come from a seeded init.

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
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# ----------------------------------------------------------------------------------------------------------
# Presets

# The Qwen2-VL chat template (as shipped with Qwen2.5-VL-*-Instruct). With no system message it inserts
# "You are a helpful assistant.", which is what the release's RL and eval prompts got (REFERENCE.md Δ14).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5's special tokens, in Qwen's order (ids follow the BPE vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2's pre-tokenizer regex (splits digits one by one, keeps a leading space with the word).
QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PRESETS = {
    # ~0.7M parameters: the size that learned fastest per CPU-minute (REFERENCE.md section 7).
    "tiny": dict(vocab_size=1024, hidden=128, layers=2, heads=4, kv_heads=2, ffn=384,
                 vis_hidden=64, vis_layers=2, vis_heads=2, vis_ffn=128),
    # ~3.5M parameters.
    "small": dict(vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=2, ffn=768,
                  vis_hidden=128, vis_layers=2, vis_heads=2, vis_ffn=256),
}

# Pixel budget of the presets' image processor: the embedded world's 112x112 images stay 16 tokens, and the
# rollout benchmark's 448x448 images get 256 (the paper's minimum, 256*28*28).
PRESET_MIN_PIXELS = 56 * 56
PRESET_MAX_PIXELS = 1280 * 28 * 28


def tokenizer_corpus():
    """Fixed text the preset tokenizer is trained on: the prompts, tags and the embedded world's vocabulary."""
    texts = [CHAT_TEMPLATE, "You are a helpful assistant."]
    try:  # the world's own vocabulary (class names, attribute words, rationale templates) when available
        import world
        texts += list(world.tokenizer_corpus())
    except (ImportError, AttributeError):
        pass
    texts += [
        "<think> Visual analysis: </think>\n\n<answer> </answer> Candidates: Comparison: Prediction:",
        "Given the question: , based on the options provided in ['a', 'b'], output the thinking process in "
        "<think> </think> and final choice in <answer> </answer> tags. The response format should be: "
        "<think>...</think> <answer>choice</answer>.",
        "Given the question: . This is a fine-grained question. Output reasoning in <think></think> and the "
        "final answer in <answer></answer>.",
        "You first think through the reasoning process as an internal monologue, enclosed within <think> "
        "</think> tags. Then, provide your final answer enclosed within <answer> </answer> tags.",
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
        "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here "
        "</answer>",
        "What species of bird is this? What kind of flower is this? What model of aircraft is this? "
        "Based on this image, what is shown? Describe this image. Which one has a with and the is of",
    ]
    return texts


def build_tokenizer(vocab_size):
    """Train a byte-level BPE with Qwen2's pre-tokenizer on `tokenizer_corpus()`; deterministic."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    vocab = tok.get_vocab()
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace", model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def preset_config(name, tokenizer):
    p = PRESETS[name]
    head_dim = p["hidden"] // p["heads"]
    t = head_dim // 2  # mrope_section must sum to head_dim / 2 (REFERENCE.md section 7); Qwen uses 1:1.5:1.5
    mrope = [t // 4, (t - t // 4) // 2, t - t // 4 - (t - t // 4) // 2]
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=p["hidden"], intermediate_size=p["ffn"],
            num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
            max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": mrope},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=p["vis_layers"], hidden_size=p["vis_hidden"], intermediate_size=p["vis_ffn"],
            num_heads=p["vis_heads"], out_hidden_size=p["hidden"], patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[p["vis_layers"] - 1],
            in_channels=3, tokens_per_second=2,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


class VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without the video slot, so that it builds without torchvision.

    note: `Qwen2_5_VLProcessor` insists on a torchvision-backed video processor (REFERENCE.md section 7).
    Saved folders still name `Qwen2_5_VLProcessor`, so `AutoProcessor` loads them where torchvision exists.
    """
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        out = super().save_pretrained(save_directory, **kwargs)
        for name in ("processor_config.json", "preprocessor_config.json"):
            f = Path(save_directory) / name
            if f.exists():
                d = json.loads(f.read_text())
                if d.get("processor_class") == type(self).__name__:
                    d["processor_class"] = "Qwen2_5_VLProcessor"
                f.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        return out


def build_preset(name, seed=0):
    """A fresh, seeded preset policy and its processor; no files, no network."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)} or give a folder")
    tokenizer = build_tokenizer(PRESETS[name]["vocab_size"])
    image_processor = Qwen2VLImageProcessorPil(min_pixels=PRESET_MIN_PIXELS, max_pixels=PRESET_MAX_PIXELS)
    processor = VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    config = preset_config(name, tokenizer)
    with fork_rng(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.config.preset = name
    return model.float().eval(), processor


@contextlib.contextmanager
def fork_rng(seed):
    """Run a block under `torch.manual_seed(seed)` without disturbing the caller's RNG streams."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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
    for image tokens and for left padding (REFERENCE.md section 7). Padding positions get 0.
    """
    core = unwrap(model).model
    pos, _ = core.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"), attention_mask=batch["attention_mask"])
    return pos


def unwrap(model):
    """The underlying HF model of a DDP-wrapped one (FSDP2 modules are the model itself)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "lm_head") else model


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
def _logprob_head(model, target_ids, score_mask, temperature, chunk, out):
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
    out = []
    with _logprob_head(model, batch["input_ids"], score_mask, temperature, chunk, out):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=rope_positions(model, batch), pixel_values=batch.get("pixel_values"),
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
