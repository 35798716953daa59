"""sft.py: assistant-only loss, exact token normalisation over micro-batches and ranks, resume, CLI."""
import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

import sft
import supervised
import training
from checkpoint import load_trainer_state, write_trainer_state
from conftest import random_image
from launch import run
from policy import load_policy, rope_positions, token_logprobs, vision_token_ids

ANSWERS = [
    "<think> Visual analysis: red head. Candidates: Vesper Finch, Garrow Wren. Prediction: Vesper Finch. </think>"
    "\n\n<answer>Vesper Finch</answer>",
    "<think> blue wings </think>\n\n<answer>Garrow Wren</answer>",
    "A bird with a red head.",
    "green",
    "<think> Visual analysis: the aircraft has a white fuselage, tipped black wings and a red tail. </think>"
    "\n\n<answer>Strom Comet</answer>",
    "The Vesper Finch is a bird. It has a red head, plain blue wings and a yellow body.",
]


def stage1_records(folder, n=8):
    """n Stage-1 records (release format) with images of several sizes; records 2 and n-1 are text-only."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(112, 112), (84, 56), (56, 112), (112, 84), (56, 56), (140, 84)]
    recs = []
    for i in range(n):
        text_only = i in (2, n - 1)
        if not text_only:
            random_image(*sizes[i % len(sizes)], seed=i).save(folder / f"img{i}.png")
        user = ("Tell me about the Vesper Finch." if text_only else
                "<image>" + ["What species of bird is this?", "Describe this image."][i % 2])
        recs.append({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": user},
                                  {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}],
                     "images": [] if text_only else [f"img{i}.png"]})
    return recs


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    (d / "train.json").write_text(json.dumps(stage1_records(d)))
    return d / "train.json"


def prepared(path, system=None):
    model, processor = load_policy("tiny", seed=0)
    samples = supervised.load_mixture(str(path))
    prompt_lens, resp_ids, _ = supervised.tokenize(samples, processor, system, 512)
    return model, processor, samples, prompt_lens, resp_ids


def step_grads(model, processor, samples, prompt_lens, resp_ids, micro, batch=None, pack=False, share=0):
    """Gradient of one optimizer step over `batch` (default: every sample), one process."""
    keys = supervised.grouping_keys(prompt_lens, resp_ids)
    batch = list(range(len(samples))) if batch is None else batch
    mbs, _ = supervised.step_micro_batches(model, processor, samples, prompt_lens, resp_ids, keys, batch, micro, 0, 1,
                                           pack=pack, share=share)
    nll = supervised.forward_backward(model, mbs, sum(len(resp_ids[i]) for i in batch), world=1)
    # a text-only step leaves the vision tower without gradient in one process (zero under 2 ranks)
    g = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return g, float(nll)


# ----------------------------------------------------------------------------------------------------------

def test_only_assistant_tokens_carry_loss(stage1):
    """The scored tokens are exactly the assistant text + <|im_end|>, and the loss is their HF-logits NLL."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1, system=sft.SYSTEM_PROMPT_R1)
    tok = processor.tokenizer
    idxs = list(range(len(samples)))
    batch = supervised.encode_micro_batch(processor, samples, prompt_lens, resp_ids, idxs, sft.SYSTEM_PROMPT_R1, "cpu")
    mask = batch["response_mask"]
    for row, i in enumerate(idxs):
        assert tok.decode(batch["input_ids"][row][mask[row]]) == samples[i].answer + "<|im_end|>"
    assert not (mask & (batch["mm_token_type_ids"] != 0)).any()  # no image token is scored
    n = int(mask.sum())
    with torch.no_grad():
        lp = token_logprobs(model, batch)
        loss, _ = supervised.sft_loss(lp, mask, n, world=1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=rope_positions(model, batch), pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"]).logits
    ref = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    torch.testing.assert_close(loss, -ref[mask[:, 1:]].sum() / n, atol=1e-5, rtol=1e-5)


def test_prefix_sample_is_scored_without_end_of_turn(tmp_path):
    """A `prefix` record (the start of a longer answer) is scored on its text alone: no closing <|im_end|>."""
    recs = stage1_records(tmp_path, n=3)
    recs[0]["prefix"] = True
    (tmp_path / "p.json").write_text(json.dumps(recs))
    model, processor, samples, prompt_lens, resp_ids = prepared(tmp_path / "p.json")
    batch = supervised.encode_micro_batch(processor, samples, prompt_lens, resp_ids, [0, 1], None, "cpu")
    decode = [processor.tokenizer.decode(batch["input_ids"][r][batch["response_mask"][r]]) for r in range(2)]
    assert decode == [samples[0].answer, samples[1].answer + "<|im_end|>"]


def test_unscored_span_is_teacher_forced_but_carries_no_loss(tmp_path):
    """The tokens of an `unscored` character span stay in the input and are exactly the response tokens the
    mask leaves out; the step's token count (unscored_positions) drops by as many."""
    recs = stage1_records(tmp_path, n=1)
    answer = "<think> Visual analysis: the bird has a red head, plain blue wings and a yellow body."
    start = answer.index("plain")
    recs[0]["messages"][-1]["content"], recs[0]["unscored"] = answer, [[start, start + 5]]
    (tmp_path / "u.json").write_text(json.dumps(recs))
    model, processor, samples, prompt_lens, resp_ids = prepared(tmp_path / "u.json")
    tok = processor.tokenizer
    unscored = supervised.unscored_positions(tok, samples, resp_ids)
    batch = supervised.encode_micro_batch(processor, samples, prompt_lens, resp_ids, [0], None, "cpu",
                                          unscored=unscored)
    P, ids, mask = batch["prompt_len"], batch["input_ids"][0], batch["response_mask"][0]
    assert tok.decode(ids[P:]) == answer + "<|im_end|>"
    assert tok.decode(ids[P:][~mask[P:]]).strip() == "plain"
    assert int(mask.sum()) == len(resp_ids[0]) - len(unscored[0]) == len(resp_ids[0]) - 1


def test_micro_batch_size_does_not_change_the_gradient(stage1):
    """One step as 1 micro-batch of 8 and as 8 micro-batches of 1 gives the same gradient (1e-6)."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    g8, nll8 = step_grads(model, processor, samples, prompt_lens, resp_ids, micro=8)
    g1, nll1 = step_grads(model, processor, samples, prompt_lens, resp_ids, micro=1)
    assert abs(nll8 - nll1) < 1e-3 * abs(nll8)
    for k in g8:
        torch.testing.assert_close(g1[k], g8[k], atol=1e-6, rtol=1e-5, msg=k)


def test_packed_rows_give_the_padded_batchs_log_probs(stage1):
    """--pack: samples packed into rows (own positions, block-diagonal attention, images reordered) give every
    response token the log-prob of the ordinary padded batch (1e-5); images of several sizes, text-only samples."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    lengths = [p + len(r) for p, r in zip(prompt_lens, resp_ids)]
    (plan,), width = supervised.packed_micro_batches(list(range(len(samples))), lengths, micro=8, world=1)
    rows = [r for mb in plan for r in mb]
    assert len(rows) < len(samples), "the fixture must put several samples in a row"
    idxs = [i for r in rows for i in r]
    packed = supervised.encode_packed_micro_batch(model, processor, samples, prompt_lens, resp_ids, rows, None, "cpu")
    padded = supervised.encode_micro_batch(processor, samples, prompt_lens, resp_ids, idxs, None, "cpu")
    assert packed["input_ids"].shape[1] <= width and packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        a, b = token_logprobs(model, packed), token_logprobs(model, padded)
    # both hold the samples in the order idxs, each response left to right: row-major order matches
    torch.testing.assert_close(a[packed["response_mask"]], b[padded["response_mask"]], atol=1e-5, rtol=1e-5)


def test_shared_prefix_is_the_longest_text_prefix_of_every_prompt(stage1):
    """shared_prefix_len: every encoded prompt starts with the same `share` tokens, none of them a vision token,
    each prompt keeps at least one token of its own, and one token more is not shared by all (or is a vision token:
    an image's tokens differ from image to image)."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    share = supervised.shared_prefix_len(samples, processor, None)
    enc = supervised.encode_micro_batch(processor, samples, prompt_lens, resp_ids, list(range(len(samples))), None,
                                        "cpu")
    P = enc["prompt_len"]
    ids = [row[P - n:P] for row, n in zip(enc["input_ids"], prompt_lens)]  # prompts are left-padded
    vision = set(vision_token_ids(processor.tokenizer))
    assert 0 < share < min(prompt_lens)
    assert all(torch.equal(x[:share], ids[0][:share]) for x in ids)
    assert not vision & set(ids[0][:share].tolist())
    assert len({int(x[share]) for x in ids}) > 1 or int(ids[0][share]) in vision


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_rows_give_the_padded_batchs_log_probs(stage1, attn):
    """--share-prefix: packed rows holding the common prompt prefix once (later samples attend to the row's copy,
    a 4-D mask) give every response token the padded batch's log-prob (1e-5), under SDPA and eager attention, with
    fewer tokens than rows where each sample holds its own copy."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    model.set_attn_implementation(attn)
    share = supervised.shared_prefix_len(samples, processor, None)
    lengths = [p + len(r) - share for p, r in zip(prompt_lens, resp_ids)]
    (plan,), _ = supervised.packed_micro_batches(list(range(len(samples))), lengths, micro=8, world=1)
    rows = [r for mb in plan for r in mb]
    assert any(len(r) > 1 for r in rows), "the fixture must put several samples in a row"
    idxs = [i for r in rows for i in r]
    shared = supervised.encode_packed_micro_batch(model, processor, samples, prompt_lens, resp_ids, rows, None, "cpu",
                                                  share=share)
    plain = supervised.encode_packed_micro_batch(model, processor, samples, prompt_lens, resp_ids, rows, None, "cpu")
    padded = supervised.encode_micro_batch(processor, samples, prompt_lens, resp_ids, idxs, None, "cpu")
    assert shared["attention_mask"].sum() == plain["attention_mask"].sum() - share * (len(idxs) - len(rows))
    with torch.no_grad():
        a, b = token_logprobs(model, shared), token_logprobs(model, padded)
    torch.testing.assert_close(a[shared["response_mask"]], b[padded["response_mask"]], atol=1e-5, rtol=1e-5)


def test_shared_prefix_step_gives_the_padded_gradient(stage1):
    """One optimizer step with --pack --share-prefix has the padded step's gradient (1e-6)."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    share = supervised.shared_prefix_len(samples, processor, None)
    g, nll = step_grads(model, processor, samples, prompt_lens, resp_ids, micro=2)
    gs, nlls = step_grads(model, processor, samples, prompt_lens, resp_ids, micro=2, pack=True, share=share)
    assert abs(nll - nlls) < 1e-4 * abs(nll)
    for k in g:
        torch.testing.assert_close(gs[k], g[k], atol=1e-6, rtol=1e-5, msg=k)


def test_a_share_beyond_the_common_prefix_is_refused_naming_the_sample(stage1):
    """encode_packed_micro_batch checks that each sample starts with the row's shared tokens: a share longer than
    the samples' common prefix is a ValueError naming a sample, never a row with another sample's tokens."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    share = supervised.shared_prefix_len(samples, processor, None)
    with pytest.raises(ValueError, match="shared prefix"):
        supervised.encode_packed_micro_batch(model, processor, samples, prompt_lens, resp_ids,
                                             [list(range(len(samples)))], None, "cpu", share=share + 4)


@pytest.mark.parametrize("max_mb", [1024, 0.2])
def test_encode_cache_gives_the_same_packed_rows_bit_for_bit(stage1, max_mb):
    """EncodeCache: packed micro-batches built from samples read back (after an earlier, differently grouped
    micro-batch filled the cache; the blank image sample of a text-only micro-batch included) equal those encoded
    afresh tensor for tensor, whether the cache holds every sample or, full, only some."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    cache = supervised.EncodeCache(max_mb)
    groupings = [([[0, 1], [3, 4, 5]], False), ([[6, 2], [0], [5, 1]], False), ([[2, 7]], True), ([[7], [2]], True),
                 ([[4, 3, 2], [1, 0, 6, 5, 7]], True)]
    for rows, need_image in groupings:
        fresh = supervised.encode_packed_micro_batch(model, processor, samples, prompt_lens, resp_ids, rows, None,
                                                     "cpu", need_image)
        kept = supervised.encode_packed_micro_batch(model, processor, samples, prompt_lens, resp_ids, rows, None,
                                                    "cpu", need_image, cache=cache)
        assert fresh.keys() == kept.keys()
        for k in fresh:
            assert fresh[k].dtype == kept[k].dtype and torch.equal(fresh[k], kept[k]), (rows, k)
    assert cache.hits > 0 and cache.nbytes <= cache.max_bytes
    assert (len(cache.pieces) == len(samples) + 1) == (max_mb == 1024)  # + the blank image sample


def test_packed_step_gives_the_padded_gradient(stage1):
    """One optimizer step with --pack (rows of several samples) has the padded step's gradient (1e-6)."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    g, nll = step_grads(model, processor, samples, prompt_lens, resp_ids, micro=2)
    gp, nllp = step_grads(model, processor, samples, prompt_lens, resp_ids, micro=2, pack=True)
    assert abs(nll - nllp) < 1e-4 * abs(nll)
    for k in g:
        torch.testing.assert_close(gp[k], g[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("n, micro, world", [(16, 4, 2), (16, 1, 2), (5, 2, 4), (1, 4, 2), (9, 3, 1)])
def test_packed_plan_keeps_every_sample_once_within_the_width_and_ranks_in_lockstep(n, micro, world):
    """packed_micro_batches: each sample in exactly one row, no row longer than the batch's longest sample, at
    most `micro` rows per micro-batch, the same number of micro-batches on every rank, and fewer rows than samples
    whenever two samples fit in the width."""
    lengths = [40 + (37 * i) % 190 for i in range(n)]
    plan, width = supervised.packed_micro_batches(list(range(n)), lengths, micro, world)
    rows = [r for rk in plan for mb in rk for r in mb]
    assert width == max(lengths) and sorted(i for r in rows for i in r) == list(range(n))
    assert all(sum(lengths[i] for i in r) <= width for r in rows)
    assert len({len(rk) for rk in plan}) == 1 and all(len(mb) <= micro for rk in plan for mb in rk)
    if n > 1 and sorted(lengths)[0] + sorted(lengths)[1] <= width:
        assert len(rows) < n


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-pack", "fsdp-pack", "ddp-pack-share"])
def test_two_ranks_give_the_single_process_gradient(mode, stage1, tmp_path):
    """2 ranks (DDP / FSDP2, gloo; each also with --pack's rows, DDP with the shared prefix too) give the 1-process
    gradient (1e-6): the whole batch at
    micro-batch 2, a 1-sample step (one rank idle) and a step where one rank's micro-batch is text-only and the
    other's not."""
    from sft_worker import MIXED
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    ref = {"full": step_grads(model, processor, samples, prompt_lens, resp_ids, micro=8)[0],
           "one": step_grads(model, processor, samples, prompt_lens, resp_ids, 1, [len(samples) - 1])[0],
           "mixed": step_grads(model, processor, samples, prompt_lens, resp_ids, 1, MIXED)[0]}
    out = tmp_path / f"{mode}.pt"
    mode, pack = mode.split("-")[0], ["--" + flag for flag in mode.split("-")[1:]]
    run(["tests/sft_worker.py", "--data", str(stage1), "--mode", mode, "--micro", "2", "--out", str(out), *pack],
        nproc=2)
    got = torch.load(out)
    for step in ref:
        for k in ref[step]:
            torch.testing.assert_close(got[step][k], ref[step][k], atol=1e-6, rtol=1e-5, msg=f"{step} {k}")
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref["full"].values()))
    assert abs(got["norm_full"] - float(norm)) < 1e-5 * float(norm)


def test_resume_continues_exactly(stage1, tmp_path):
    """4 steps straight equal 2 steps + resume from step_2 + 2 steps: same parameters and losses."""
    common = ["sft.py", "--model", "tiny", "--data", str(stage1), "--max-steps", "4", "--micro-batch", "4",
              "--micro-batch", "2", "--lr", "1e-3", "--warmup-steps", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    run(common + ["--out", str(a), "--save-every", "2"])
    assert (a / "step_2" / "trainer_state.json").exists()
    run(common + ["--out", str(b), "--resume", str(a / "step_2")])
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=0, rtol=0, msg=k)
    la = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [3, 4]
    assert [r["loss"] for r in lb] == [r["loss"] for r in la[2:]]
    assert [r["lr"] for r in lb] == [r["lr"] for r in la[2:]]


def test_two_step_smoke_run_on_a_world_folder(stage1, tmp_path):
    """`sft.py --data WORLD_DIR --defaults world` trains 2 steps: progress lines, metrics, an HF checkpoint."""
    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text("{}")
    for f in stage1.parent.iterdir():
        if f.suffix == ".png":
            (world / f.name).write_bytes(f.read_bytes())
    (world / "cot_sft.json").write_text(stage1.read_text())
    out = tmp_path / "run"
    r = run(["sft.py", "--model", "tiny", "--data", str(world), "--out", str(out), "--max-steps", "2",
             "--defaults", "world"])
    assert '"defaults": "world"' in r.stdout
    lines = [x for x in r.stdout.splitlines() if x.startswith("step ")]
    assert len(lines) == 2 and lines[1].startswith("step 2/2 | loss ")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
    model, _ = load_policy(out / "final")
    state = load_trainer_state(out / "final")["state"]
    assert state["step"] == 2 and state["args"]["data"] == str(world)


def test_malformed_stage1_file_names_the_record(stage1, tmp_path):
    """A Stage-1 file whose record #1 has no assistant turn stops sft.py with a message naming that record."""
    recs = json.loads(stage1.read_text())[:3]
    recs[1]["messages"] = recs[1]["messages"][:2]
    bad = stage1.parent / "bad.json"
    bad.write_text(json.dumps(recs))
    with pytest.raises(SystemExit, match=r"bad\.json:#1"):
        sft.main(["--model", "tiny", "--data", str(bad), "--out", str(tmp_path / "x")])


def test_replay_batches_cover_every_sample_once_per_epoch_and_depend_only_on_seed_and_k(stage1):
    """TAPO's replay: batches k = 0 .. n-1 partition the samples, and batch k is the same for a fresh Replay
    (what exact resume needs)."""
    _, processor = load_policy("tiny", seed=0)
    a, b = (supervised.Replay(str(stage1), processor, None, coef=1.0, batch=3, micro=2, max_length=512, seed=4)
            for _ in range(2))
    assert a.n_batches == 3
    assert sorted(i for k in range(3) for i in a.indices(k)) == list(range(8))
    assert [a.indices(k) for k in (7, 2, 5)] == [b.indices(k) for k in (7, 2, 5)]
    assert a.indices(0) != a.indices(3) or a.indices(1) != a.indices(4)  # a new shuffle each epoch


@pytest.mark.parametrize("pack", [False, True])
def test_replay_gradient_is_coef_times_the_sft_step_gradient(stage1, pack):
    """Replay.backward at coef 0.5, in micro-batches of 2 (padded, or rows of several samples: tapo.py
    --replay-pack), gives 0.5 x the gradient of one padded SFT step on its batch."""
    model, processor, samples, prompt_lens, resp_ids = prepared(stage1)
    replay = supervised.Replay(str(stage1), processor, None, coef=0.5, batch=5, micro=2, max_length=512, seed=1,
                               pack=pack)
    model.zero_grad(set_to_none=True)
    nll, n_step = replay.backward(model, 1, "cpu", rank=0, world=1)
    got = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want, want_nll = step_grads(model, processor, samples, prompt_lens, resp_ids, micro=5, batch=replay.indices(1))
    assert n_step == sum(len(resp_ids[i]) for i in replay.indices(1)) and abs(nll - want_nll) < 1e-4
    for k in want:
        assert torch.allclose(got[k], 0.5 * want[k], atol=1e-7, rtol=1e-5), k


def test_replay_under_a_frozen_language_side_keeps_only_image_samples(stage1):
    """Replay(images_only=True) (tapo.py --freeze language) drops the text-only samples, which would reach no
    trainable parameter; the others stay in order."""
    _, processor = load_policy("tiny", seed=0)
    both = [supervised.Replay(str(stage1), processor, None, coef=1.0, batch=4, micro=2, max_length=512,
                              images_only=flag) for flag in (False, True)]
    assert len(both[0].samples) == 8 and [s.source for s in both[1].samples] == \
        [s.source for s in both[0].samples if s.image is not None] and len(both[1].samples) == 6


def test_cosine_with_warmup_values():
    """lr multiplier: linear warmup from 0, then a cosine from 1 to 0 over the remaining steps (HF's schedule)."""
    assert sft.cosine_with_warmup(0, 4, 12) == 0.0 and sft.cosine_with_warmup(2, 4, 12) == 0.5
    assert sft.cosine_with_warmup(4, 4, 12) == 1.0 and abs(sft.cosine_with_warmup(8, 4, 12) - 0.5) < 1e-12
    assert sft.cosine_with_warmup(12, 4, 12) == 0.0


@pytest.mark.parametrize("n, micro, world", [(10, 4, 1), (10, 4, 2), (7, 2, 4), (1, 4, 2), (3, 1, 8)])
def test_every_rank_gets_the_same_number_of_micro_batches(n, micro, world):
    """rank_micro_batches: same micro-batch count on every rank, each <= micro, every sample exactly once."""
    plan = supervised.rank_micro_batches(list(range(n)), list(range(10)), micro, world)
    assert len({len(r) for r in plan}) == 1
    assert sorted(i for r in plan for mb in r for i in mb) == list(range(n))
    assert all(len(mb) <= micro for r in plan for mb in r)


def test_epoch_batches_cover_every_sample_once():
    """One epoch's batches hold every sample exactly once."""
    batches = supervised.epoch_batches(list(range(10)), 4, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(10))


def test_mixture_weights_repeat_and_subsample(stage1):
    """--data PATH:2,PATH:0.5 gives two copies plus a seeded half of the file's samples."""
    assert len(supervised.load_mixture(f"{stage1}:2,{stage1}:0.5")) == 8 * 2 + 4


def test_pixel_budget_sets_the_prompt_length(stage1):
    """--max-pixels shrinks an image before the processor, so its prompt holds fewer image tokens."""
    _, processor = load_policy("tiny")
    samples = [s for s in supervised.load_mixture(str(stage1)) if s.image][:1]
    full, _, _ = supervised.tokenize(samples, processor, None, 4096)
    capped, _, _ = supervised.tokenize(samples, processor, None, 4096, pixels=(None, 56 * 56))
    assert capped[0] < full[0]


@pytest.mark.parametrize("part", ["vision", "language"])
def test_freeze_stops_exactly_the_named_side(part):
    """training.freeze(model, part): the vision tower + merger ("vision") or everything else ("language") stops
    requiring gradients, and nothing on the other side does."""
    model, _ = load_policy("tiny", seed=0)
    n = training.freeze(model, part)
    for name, p in model.named_parameters():
        visual = name.startswith("model.visual.")
        assert p.requires_grad == (visual != (part == "vision")), name
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_freeze_vision_embeddings_mlp_leaves_only_the_decoders_attention_and_norms():
    """`--freeze vision,embeddings,mlp` (the world's SFT): the trainable parameters are exactly the language
    decoder's attention projections and norm weights; the vision tower's own MLPs are frozen with the tower."""
    model, _ = load_policy("tiny", seed=0)
    training.freeze(model, training.parse_freeze("vision,embeddings,mlp"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("model.language_model.")
                and (".self_attn." in n or "norm" in n)}
    assert trainable == expected and expected


def test_freeze_mlp_alone_leaves_the_vision_towers_mlps_training():
    """"mlp" names the language decoder's MLPs only; "embeddings" the token embeddings (tied lm_head)."""
    model, _ = load_policy("tiny", seed=0)
    training.freeze(model, "mlp,embeddings")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("model.language_model.")
                      and (".mlp." in n or "embed_tokens" in n)}
    assert any(".mlp." in n and n.startswith("model.visual.") for n, _ in model.named_parameters())


@pytest.mark.parametrize("spec", ["bogus", "vision,bogus", ""])
def test_freeze_flag_rejects_an_unknown_part(spec):
    """`--freeze` names its parts; an unknown one is an argparse error naming it, not a silent full fine-tune."""
    with pytest.raises(argparse.ArgumentTypeError, match="unknown part"):
        training.parse_freeze(spec)


def test_freeze_everything_is_an_error():
    """Freezing both sides leaves nothing to train: a clear error, not an optimizer over no parameter."""
    model, _ = load_policy("tiny", seed=0)
    assert training.parse_freeze("none") == ()
    with pytest.raises(ValueError, match="no trainable parameter"):
        training.freeze(model, "vision,language")


def test_freeze_language_run_trains_only_the_vision_side(stage1, tmp_path):
    """`sft.py --freeze language`: text-only samples are dropped (and counted), every language-side weight of the
    final checkpoint equals the starting one bit for bit, and the vision side moved."""
    start = tmp_path / "start"
    model, processor = load_policy("tiny", seed=0)
    model.save_pretrained(start)
    processor.save_pretrained(start)
    out = tmp_path / "run"
    r = run(["sft.py", "--model", str(start), "--data", str(stage1), "--out", str(out), "--max-steps", "2",
             "--lr", "1e-3", "--warmup-steps", "0", "--freeze", "language"])
    assert "--freeze language: 2 of 8 samples have no image, dropped" in r.stdout
    w0, w1 = load_file(start / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    moved = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert moved and all(k.startswith(("visual.", "model.visual.")) for k in moved)  # saved names drop "model."


def test_resume_does_not_flag_an_unchanged_freeze_as_changed(tmp_path):
    """--freeze parses to a tuple; saved in a trainer state and loaded back (the resume path), an unchanged setting
    is not reported as changed, and a changed one still is."""
    args = argparse.Namespace(freeze=training.parse_freeze("vision,mlp"), lr=1e-3, out=tmp_path)
    write_trainer_state(tmp_path, {"args": vars(args)})
    saved = load_trainer_state(tmp_path)["state"]["args"]
    assert training.changed_settings(saved, args) == {}
    changed = argparse.Namespace(freeze=training.parse_freeze("vision"), lr=1e-3, out=tmp_path)
    assert training.changed_settings(saved, changed) == {"freeze": (("vision", "mlp"), ("vision",))}
