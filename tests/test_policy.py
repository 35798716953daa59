"""Foundation invariants: offline presets, HF checkpoints, chunked log-probs against the naive oracle."""
import json

import pytest
import torch
from conftest import padded_batch, random_image

from checkpoint import load_trainer_state, save_checkpoint
from policy import (build_preset, chunked_logprobs, count_params, load_policy, naive_logprobs, token_logprobs,
                    image_embeddings)


def test_presets_build_offline_and_deterministic(monkeypatch):
    """Two builds of a preset with the same seed give identical weights and tokenizers, with no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (m1, p1), (m2, p2) = build_preset("tiny", seed=3), build_preset("tiny", seed=3)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert p1.tokenizer.get_vocab() == p2.tokenizer.get_vocab()
    m3, _ = build_preset("tiny", seed=4)
    assert not torch.equal(m3.lm_head.weight, m1.lm_head.weight)


def test_preset_sizes(tiny):
    """tiny is well under 1M parameters, tiny4 (its 4-layer twin) about 1.2M, small a few million; all the real
    Qwen2.5-VL class."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    model, _ = tiny
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert count_params(model) < 900_000
    small, _ = load_policy("small")
    assert 2_000_000 < count_params(small) < 8_000_000
    tiny4, _ = load_policy("tiny4")  # tiny with twice the decoder layers
    assert tiny4.config.text_config.num_hidden_layers == 2 * model.config.text_config.num_hidden_layers
    assert 1_000_000 < count_params(tiny4) < 1_500_000


def test_chat_template_and_special_tokens(tiny):
    """The preset tokenizer has Qwen's special tokens as single ids and the Qwen2-VL chat template."""
    _, proc = tiny
    tok = proc.tokenizer
    for t in ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                    tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok("<think> a b </think>\n\n<answer>X Y</answer>")["input_ids"]) == \
        "<think> a b </think>\n\n<answer>X Y</answer>"


def test_save_reload_identical(tiny, tmp_path):
    """save_checkpoint -> plain Qwen2_5_VLForConditionalGeneration.from_pretrained gives identical weights and outputs."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    model, proc = tiny
    save_checkpoint(tmp_path / "ck", model, proc, state={"step": 7})
    assert not (tmp_path / "ck.tmp").exists()
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ck").eval()
    reloaded, proc2 = load_policy(tmp_path / "ck")
    for m in (plain, reloaded):
        sd, ref = m.state_dict(), model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    batch = padded_batch(proc)
    assert torch.equal(token_logprobs(model, batch), token_logprobs(reloaded, batch))
    assert proc2.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    assert load_trainer_state(tmp_path / "ck")["state"]["step"] == 7
    cfg = json.loads((tmp_path / "ck" / "processor_config.json").read_text()) \
        if (tmp_path / "ck" / "processor_config.json").exists() else {}
    assert cfg.get("processor_class", "Qwen2_5_VLProcessor") == "Qwen2_5_VLProcessor"


def test_load_rejects_other_model(tmp_path):
    """A folder holding another model type fails with a message naming the file and the type."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="config.json.*llama"):
        load_policy(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a preset"):
        load_policy(tmp_path / "nothing")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_naive_head(temperature):
    """The chunked head's values and gradients equal the naive log-softmax gather (fp32, 1e-6)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.2 * torch.randn(50, 16, generator=g)).requires_grad_()  # logits of realistic scale (|z| ~ 1)
    t = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    a = chunked_logprobs(h, w, t, temperature, chunk=8)
    ga = torch.autograd.grad((a * upstream).sum(), (h, w))
    b = naive_logprobs(h, w, t, temperature)
    gb = torch.autograd.grad((b * upstream).sum(), (h, w))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_token_logprobs_match_full_forward(tiny):
    """token_logprobs (and its parameter gradients) equal log_softmax of one full HF forward, padded both sides."""
    model, proc = tiny
    batch = padded_batch(proc)
    mask = batch["response_mask"]
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 0).any()
    for temperature in (1.0, 0.8):
        model.zero_grad()
        lp = token_logprobs(model, batch, temperature=temperature, chunk=5)
        (lp.sum()).backward()
        g_chunk = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        from policy import rope_positions
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=rope_positions(model, batch), pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"]).logits
        ref = torch.log_softmax(logits.float() / temperature, -1)[:, :-1].gather(2, batch["input_ids"][:, 1:, None])[..., 0]
        ref = torch.cat([torch.zeros_like(ref[:, :1]), ref], 1) * mask
        ref.sum().backward()
        torch.testing.assert_close(lp, ref, atol=1e-6, rtol=0)
        assert (lp[~mask] == 0).all()
        for n, p in model.named_parameters():
            if p.grad is not None:
                # fp32 summation order differs; 1e-6 relative to the tensor's scale (|g| reaches ~20 here)
                err = (g_chunk[n] - p.grad).abs().max().item()
                assert err <= 1e-6 * (1 + p.grad.abs().max().item()), (n, err)
        model.zero_grad()


def test_image_embeddings_shape(tiny):
    """image_embeddings gives one mean-pooled row per image, whatever the image size."""
    model, proc = tiny
    e = image_embeddings(model, proc, [random_image(112, 112, 0), random_image(168, 112, 1)])
    assert e.shape == (2, model.config.text_config.hidden_size) and torch.isfinite(e).all()


def test_stop_ids_cover_every_generation_config_eos(tiny):
    """Rollouts stop on every eos of generation_config (Qwen2.5-VL lists <|im_end|> and <|endoftext|>)."""
    from policy import stop_token_ids
    model, proc = tiny
    tok = proc.tokenizer
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [im_end, eot]
        assert set(stop_token_ids(model, tok)) == {im_end, eot}
        model.generation_config.eos_token_id = im_end
        assert stop_token_ids(model, tok) == [im_end]
    finally:
        model.generation_config.eos_token_id = saved
