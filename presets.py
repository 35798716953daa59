"""The tiny presets: real Qwen2.5-VL models from a small config, with a tokenizer trained here; no network.

    model, processor = build_preset("tiny", seed=0)   # ~0.7M params; "tiny4" ~1.2M (the world's); "small" ~3.5M

A preset is a `Qwen2_5_VLForConditionalGeneration` built from a small config, with a byte-level BPE tokenizer
trained on fixed text (Qwen's pre-tokenizer, special tokens and chat template; the embedded world's
vocabulary) and the PIL image processor (no torchvision). Both are deterministic for a given seed.
Also here: `VLProcessor`, the torchvision-free Qwen2.5-VL processor that policy.py loads real checkpoints with.

Layer: presets -> world -> data -> reward (policy.py sits on top of this module).
"""
import contextlib
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import world

# The Qwen2-VL chat template (as shipped with Qwen2.5-VL-*-Instruct). With no system message it inserts
# "You are a helpful assistant.", which is what the release's RL and eval prompts got (README Δ14).
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
    # ~0.7M parameters: the size that learned fastest per CPU-minute on 2 cores.
    "tiny": dict(vocab_size=1024, hidden=128, layers=2, heads=4, kv_heads=2, ffn=384,
                 vis_hidden=64, vis_layers=2, vis_heads=2, vis_ffn=128),
    # ~1.2M parameters: tiny with 4 decoder layers, the world's base model (run.sh, sft.BASE_PRESET; README "Results":
    # its rationale's copies and lookup are right where tiny's fail, so unseen classes gain from CoT SFT and TAPO).
    "tiny4": dict(vocab_size=1024, hidden=128, layers=4, heads=4, kv_heads=2, ffn=384,
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
    texts += list(world.tokenizer_corpus())  # the world's vocabulary: class names, attribute words, rationales
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
    t = head_dim // 2  # mrope_section must sum to head_dim / 2 (README "Release facts"); Qwen uses 1:1.5:1.5
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

    note: `Qwen2_5_VLProcessor` insists on a torchvision-backed video processor (README "Release facts").
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


