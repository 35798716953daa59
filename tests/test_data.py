"""data.py: readers of the release formats, clear errors, prompts, chat batching, length grouping, builders."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import imagefolder
from data import DataError

FORMATS = Path(__file__).resolve().parent / "fixtures"  # the release's sample files, copied


def png(path, colour=(200, 30, 30), size=(112, 112)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def stage1_record(image="a.png", question="<image>What kind of bird is this?", answer="<answer>X</answer>"):
    return {"messages": [{"role": "system", "content": data.SYSTEM_PROMPT_R1},
                         {"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": [image] if image else []}


def rl_row(**kw):
    row = {"images": ["a.png"], "problem": "<image> Based on this image, what species of bird is shown?",
           "answer": "Vesper Finch", "image_noisy": ["b.png"], "image_aug": ["c.png"]}
    row.update(kw)
    return row


def eval_row(**kw):
    row = {"image_path": "a.png", "question": "What kind of bird is this?",
           "options": ["Vesper Finch", "Halden Finch", "Oswin Wren", "Dusk Wren"], "ground_truth": "Vesper Finch"}
    row.update(kw)
    return row


def jsonl(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@pytest.fixture
def imgs(tmp_path):
    for name, col in (("a.png", (200, 30, 30)), ("b.png", (30, 200, 30)), ("c.png", (30, 30, 200))):
        png(tmp_path / name, col)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------
# Readers

def test_release_stage1_sample_parses():
    """The release's Stage-1 sample parses: R1 system prompt verbatim, one image, <think>/<answer> target."""
    samples = data.load_stage1(FORMATS / "stage1_cot_sft.sample.json", check_images=False)
    assert len(samples) == 2
    for s in samples:
        assert s.system == data.SYSTEM_PROMPT_R1
        assert s.image.endswith(".jpg") and "<image>" not in s.question
        assert s.answer.startswith("<think>") and "</think>\n\n<answer>" in s.answer
    assert samples[1].source == "stage1_cot_sft.sample.json:#1"


@pytest.mark.parametrize("name,dataset,split", [("eval_bird_seen.sample.jsonl", "bird", "seen"),
                                                ("eval_car_unseen.sample.jsonl", "car", "unseen")])
def test_release_eval_samples_parse(name, dataset, split):
    """The release's eval samples parse; dataset and split come from the file name; gt is among options."""
    items = data.load_eval(FORMATS / name, check_images=False)
    assert len(items) == 5
    assert all((i.dataset, i.split) == (dataset, split) and i.ground_truth in i.options for i in items)
    assert items[2].source == f"{name}:3"


def test_relative_paths_resolve_against_the_file_folder_or_image_root(imgs, tmp_path):
    """Relative image paths resolve against the data file's folder, or against image_root when given."""
    sub = tmp_path / "files"
    sub.mkdir()
    (sub / "rl.jsonl").write_text(jsonl([rl_row()]))
    with pytest.raises(DataError):
        data.load_stage2(sub / "rl.jsonl")
    row = data.load_stage2(sub / "rl.jsonl", image_root=imgs)[0]
    assert (row.image, row.positive, row.negative) == tuple(str(imgs / n) for n in ("a.png", "b.png", "c.png"))
    assert row.problem == "<image> Based on this image, what species of bird is shown?" and row.source == "rl.jsonl:1"


def test_stage1_text_only_samples(tmp_path):
    """A Stage-1 sample without images (the world's knowledge texts) loads with image None."""
    f = tmp_path / "t.json"
    f.write_text(json.dumps([{"messages": [{"role": "user", "content": "Describe the Vesper Finch."},
                                           {"role": "assistant", "content": "A bird."}], "images": []}]))
    (s,) = data.load_stage1(f)
    assert s.image is None and s.system is None and s.question == "Describe the Vesper Finch."


def test_stage1_prefix_and_unscored_spans(imgs):
    """The optional record keys `prefix` and `unscored` reach the sample (absent: False and no span)."""
    f = imgs / "s1.json"
    f.write_text(json.dumps([dict(stage1_record(), prefix=True, unscored=[[8, 9], [1, 3]]), stage1_record()]))
    a, b = data.load_stage1(f)
    assert a.prefix and a.unscored == ((8, 9), (1, 3))
    assert not b.prefix and b.unscored == ()


BAD = [  # (file name, content, loader, substrings the error must contain)
    ("s1.json", "[{]", data.load_stage1, ["s1.json", "invalid JSON"]),
    ("s1.json", json.dumps([stage1_record(), {"msgs": []}]), data.load_stage1, ["s1.json:#1", "messages"]),
    ("s1.json", json.dumps([stage1_record(image="missing.png")]), data.load_stage1,
     ["s1.json:#0", "missing.png", "not found"]),
    ("s1.json", json.dumps([stage1_record(image="broken.png")]), data.load_stage1,
     ["s1.json:#0", "broken.png", "unreadable"]),
    ("s1.json", json.dumps([stage1_record(question="no image token")]), data.load_stage1, ["s1.json:#0", "<image>"]),
    ("s1.json", json.dumps([stage1_record(answer="  ")]), data.load_stage1, ["s1.json:#0", "empty assistant"]),
    ("s1.json", json.dumps([stage1_record(), dict(stage1_record(), prefix="yes")]), data.load_stage1,
     ["s1.json:#1", "prefix"]),
    ("s1.json", json.dumps([dict(stage1_record(), unscored=[[3, 99]])]), data.load_stage1,
     ["s1.json:#0", "unscored", "length 18"]),
    ("s1.json", json.dumps([dict(stage1_record(), unscored=[3, 5])]), data.load_stage1, ["s1.json:#0", "unscored"]),
    ("rl.jsonl", jsonl([rl_row(), "{not json"]), data.load_stage2, ["rl.jsonl:2", "invalid JSON"]),
    ("rl.jsonl", jsonl([rl_row(), rl_row(), {"images": ["a.png"]}]), data.load_stage2, ["rl.jsonl:3", "missing"]),
    ("rl.jsonl", jsonl([rl_row(image_aug=["gone.png"])]), data.load_stage2, ["rl.jsonl:1", "gone.png", "not found"]),
    ("rl.jsonl", jsonl([rl_row(image_noisy=["a.png", "b.png"])]), data.load_stage2, ["rl.jsonl:1", "image_noisy"]),
    ("rl.jsonl", jsonl([rl_row(answer="")]), data.load_stage2, ["rl.jsonl:1", "answer"]),
    ("bird_seen.jsonl", jsonl([eval_row(), eval_row(ground_truth="Kestle Plover")]), data.load_eval,
     ["bird_seen.jsonl:2", "Kestle Plover", "not among its options"]),
    ("bird_seen.jsonl", jsonl([eval_row(options="Vesper Finch")]), data.load_eval, ["bird_seen.jsonl:1", "options"]),
    ("bird_seen.jsonl", jsonl([eval_row(image_path="broken.png")]), data.load_eval,
     ["bird_seen.jsonl:1", "broken.png", "unreadable"]),
    ("bird_seen.jsonl", jsonl([eval_row(), "[1, 2]"]), data.load_eval, ["bird_seen.jsonl:2", "JSON object"]),
]


@pytest.mark.parametrize("name,content,loader,expect", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_a_clear_error(imgs, name, content, loader, expect):
    """Each kind of malformed record or bad image raises DataError naming the file and line / index / image."""
    f = imgs / name
    f.write_text(content)
    with pytest.raises(DataError) as e:
        loader(f)
    assert all(s in str(e.value) for s in expect), str(e.value)


def test_load_image_errors_and_resize(imgs):
    """load_image: RGB, resized on request; a missing or corrupt file raises DataError naming the path."""
    im = data.load_image(imgs / "a.png", size=(56, 84))
    assert im.mode == "RGB" and im.size == (56, 84)
    for bad in ("nothere.png", "broken.png"):
        with pytest.raises(DataError, match=bad):
            data.load_image(imgs / bad)


def test_load_triplet_resizes_positive_and_negative_to_the_anchor(tmp_path):
    """Triplet images: positive and negative come back at the anchor's size."""
    png(tmp_path / "a.png", size=(140, 112))
    png(tmp_path / "b.png", size=(90, 90))
    png(tmp_path / "c.png", size=(300, 200))
    (tmp_path / "rl.jsonl").write_text(jsonl([rl_row()]))
    a, p, n = data.load_triplet(data.load_stage2(tmp_path / "rl.jsonl")[0])
    assert a.size == p.size == n.size == (140, 112)


# ---------------------------------------------------------------------------------------------------------
# Prompts and chat

def test_release_prompts():
    """closed / open / RL prompts are the release's templates ({Options} is the list repr; the RL text keeps
    the space after <image>, as EasyR1's split at the image token does)."""
    q, opts = "What kind of bird is this?", ["Vesper Finch", "Oswin Wren"]
    assert data.closed_prompt(q, opts) == (
        "Given the question: What kind of bird is this?, based on the options provided in ['Vesper Finch', "
        "'Oswin Wren'], output the thinking process in <think> </think> and final choice in <answer> </answer> "
        "tags. The response format should be: <think>...</think> <answer>choice</answer>.")
    assert data.open_prompt(q) == ("Given the question: What kind of bird is this?. This is a fine-grained "
                                   "question. Output reasoning in <think></think> and the final answer in "
                                   "<answer></answer>.")
    assert data.rl_prompt("<image> Based on this image, what species of bird is shown?") == (
        " Based on this image, what species of bird is shown?\n\nYou first think through the reasoning process "
        "as an internal monologue, enclosed within <think> </think> tags. Then, provide your final answer "
        "enclosed within <answer> </answer> tags.")


def test_chat_messages():
    """Image first then text in the user turn; a system message only when one is given."""
    assert data.chat_messages("hi", True) == [{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": "hi"}]}]
    msgs = data.chat_messages("hi", False, system=data.SYSTEM_PROMPT_R1)
    assert msgs[0] == {"role": "system", "content": data.SYSTEM_PROMPT_R1}
    assert msgs[1]["content"] == [{"type": "text", "text": "hi"}]


def test_encode_prompts_left_pads_and_restores_padding_side(tiny):
    """Prompts are left-padded (each ends with the assistant header), with image tensors; side restored."""
    _, proc = tiny
    proc.tokenizer.padding_side = "right"
    imgs = [Image.new("RGB", (112, 112), (200, 0, 0)), None, Image.new("RGB", (140, 112), (0, 0, 200))]
    b = data.encode_prompts(proc, imgs, ["What kind of bird is this?", "Describe the Vesper Finch at length.", "Hi"])
    assert proc.tokenizer.padding_side == "right"
    assert b["input_ids"].shape == b["attention_mask"].shape == b["mm_token_type_ids"].shape
    assert b["attention_mask"][:, -1].all() and not b["attention_mask"][:, 0].all()
    header = proc.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert (b["input_ids"][:, -len(header):] == torch.tensor(header)).all()
    assert b["image_grid_thw"].shape == (2, 3) and (b["mm_token_type_ids"][1] == 0).all()
    text_only = data.encode_prompts(proc, [None], ["Describe the Vesper Finch."])
    assert "pixel_values" not in text_only and "image_grid_thw" not in text_only


def test_join_prompt_response_matches_the_chat_template(tiny):
    """[prompt | response] rows equal the chat template's full conversation (assistant turn ending in
    <|im_end|>) with padding removed; response_mask marks exactly the response tokens."""
    _, proc = tiny
    imgs = [Image.new("RGB", (112, 112), (0, 200, 0)), None]
    users = ["What kind of flower is this?", "Describe the Dusk Lily."]
    answers = ["<think> green </think>\n\n<answer>Dusk Lily</answer>", "The Dusk Lily is a flower."]
    b = data.encode_pairs(proc, imgs, users, answers)
    P = b["prompt_len"]
    for i, (im, u, a) in enumerate(zip(imgs, users, answers)):
        msgs = data.chat_messages(u, im is not None) + [{"role": "assistant", "content": a}]
        full = proc.apply_chat_template(msgs, tokenize=False).rstrip("\n")
        ref = proc(text=[full], images=[im] if im else None, return_tensors="pt")["input_ids"][0]
        assert torch.equal(b["input_ids"][i][b["attention_mask"][i].bool()], ref)
        resp = b["input_ids"][i][b["response_mask"][i]]
        assert proc.tokenizer.decode(resp) == a + "<|im_end|>"
        assert not b["response_mask"][i, :P].any()
    assert b["mm_token_type_ids"][:, P:].eq(0).all() and b["input_ids"].shape == b["response_mask"].shape


def test_join_prompt_response_without_eos():
    """add_eos=False drops the end token; an empty response leaves an all-False response row."""
    prompt = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
              "mm_token_type_ids": torch.zeros(2, 3, dtype=torch.long)}
    b = data.join_prompt_response(prompt, [[11, 12], []], pad_id=0)
    assert b["input_ids"].tolist() == [[0, 5, 6, 11, 12], [7, 8, 9, 0, 0]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b["response_mask"].tolist() == [[False] * 3 + [True] * 2, [False] * 5] and b["prompt_len"] == 3


def test_length_grouped_batches():
    """Deterministic per seed, every index once, and far less padding than random batches."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=1000).tolist()
    a = data.length_grouped_batches(lengths, 8, seed=1, group_size_mult=25)
    assert a == data.length_grouped_batches(lengths, 8, seed=1, group_size_mult=25)
    assert a != data.length_grouped_batches(lengths, 8, seed=2, group_size_mult=25)
    assert sorted(i for b in a for i in b) == list(range(1000)) and all(len(b) <= 8 for b in a)
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa
    assert pad(a) < 0.2 * pad([list(range(s, s + 8)) for s in range(0, 1000, 8)])
    assert data.length_grouped_batches([3, 9, 1, 7, 5], 2, seed=0, shuffle=False) == [[1, 3], [4, 0], [2]]


# ---------------------------------------------------------------------------------------------------------
# Builders for real data

COLOURS = {"001.Red_Bird": (220, 20, 20), "002.Crimson_Bird": (190, 30, 40), "003.Blue_Bird": (20, 20, 220),
           "004.Navy_Bird": (20, 30, 150), "005.Green_Bird": (20, 200, 20), "006.Lime_Bird": (120, 230, 40),
           "007.Grey_Bird": (128, 128, 128), "008.White_Bird": (240, 240, 240)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image-folder dataset: 8 classes of noisy solid-colour images, 6 per class, in CUB-style folders."""
    root = tmp_path_factory.mktemp("ds") / "birds"
    rng = np.random.default_rng(0)
    for name, col in COLOURS.items():
        for i in range(6):
            arr = np.clip(np.array(col) + rng.normal(0, 8, (64, 80, 3)), 0, 255).astype("uint8")
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def mean_colour(images):
    """A stand-in embedding: mean RGB (so the nearest class is the nearest colour)."""
    return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images]))


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    return imagefolder.build_from_image_folder(folder, out, seed=0, shots=3, embed_fn=mean_colour, noun="bird",
                                        kind="species")


def test_builder_split_and_files_parse(built):
    """60% of classes seen; rl / seen / unseen files parse; seen test images are not training images."""
    split = json.loads(built["split"].read_text())
    assert (len(split["seen"]), len(split["unseen"])) == (5, 3)
    rl = data.load_stage2(built["rl_train"])
    seen, unseen = data.load_eval(built["seen"]), data.load_eval(built["unseen"])
    assert len(rl) == 5 * 3 and len(seen) == 5 * 3 and len(unseen) == 3 * 6
    assert {r.answer for r in rl} == set(split["seen"]) and {i.ground_truth for i in unseen} == set(split["unseen"])
    assert not {r.image for r in rl} & {i.image for i in seen}
    assert rl[0].problem == "<image> Based on this image, what species of bird is shown?"
    assert "Red Bird" in split["seen"] + split["unseen"]  # "001.Red_Bird" -> "Red Bird"


def test_builder_triplets_use_most_similar_seen_class(built, folder):
    """Positive: another training image of the class; negative: an image of the most similar seen class."""
    split = json.loads(built["split"].read_text())
    label = {n: imagefolder.folder_label(n) for n in COLOURS}
    colour = {label[n]: np.array(c, dtype=float) for n, c in COLOURS.items()}
    cls_of = lambda p: label[Path(p).parent.name]  # noqa: E731
    for r in data.load_stage2(built["rl_train"]):
        assert cls_of(r.positive) == r.answer and r.positive != r.image
        nearest = min((c for c in split["seen"] if c != r.answer),
                      key=lambda c: np.linalg.norm(colour[c] - colour[r.answer]))
        assert cls_of(r.negative) == nearest == split["negative_class"][r.answer]


def test_builder_options_hold_ground_truth_and_similar_classes(built):
    """Every option list: ground truth first + the 3 most similar classes of the whole dataset."""
    for f in (built["seen"], built["unseen"]):
        for item in data.load_eval(f):
            assert item.options[0] == item.ground_truth and len(set(item.options)) == 4
    split = json.loads(built["split"].read_text())
    assert split["options"]["Red Bird"][1] == "Crimson Bird"


def test_builder_is_deterministic(folder, tmp_path):
    """Same seed -> identical files."""
    a = imagefolder.build_from_image_folder(folder, tmp_path / "a", seed=4, embed_fn=mean_colour)
    b = imagefolder.build_from_image_folder(folder, tmp_path / "b", seed=4, embed_fn=mean_colour)
    assert all(a[k].read_text() == b[k].read_text() for k in ("rl_train", "seen", "unseen"))


def test_builder_with_policy_vision_features(folder, tmp_path, tiny):
    """The default similarity is the loaded policy's mean-pooled vision-tower features."""
    model, proc = tiny
    paths = imagefolder.build_from_image_folder(folder, tmp_path, model, proc, seed=0, shots=2, test_per_class=1)
    assert len(data.load_stage2(paths["rl_train"])) == 5 * 2
    assert all(len(i.options) == 4 for i in data.load_eval(paths["unseen"]))


@pytest.mark.parametrize("size, lo, hi, expected", [
    ((112, 112), 200704, 1003520, (448, 448)),      # CUB-sized images are scaled UP to the RL minimum
    ((2000, 1500), 200704, 1003520, (1156, 867)),  # large images DOWN into the maximum, sides truncated
    ((640, 480), 200704, 1003520, (640, 480)),     # inside the budget: untouched
    ((2000, 1500), None, 589824, (886, 665)),      # the release's SFT cap
])
def test_pixel_budget_is_the_releases(size, lo, hi, expected):
    """pixel_budget_size scales by sqrt(budget / area) and truncates each side, as EasyR1 / LLaMA-Factory do."""
    assert data.pixel_budget_size(*size, lo, hi) == expected


def test_triplet_follows_the_anchor_budget(tmp_path):
    """The anchor is resized into the budget; positive and negative to the anchor's size."""
    for name, wh in (("a.png", (100, 60)), ("p.png", (80, 80)), ("n.png", (300, 200))):
        Image.new("RGB", wh).save(tmp_path / name)
    row = data.RLRow(image=str(tmp_path / "a.png"), positive=str(tmp_path / "p.png"), negative=str(tmp_path / "n.png"),
                     problem="<image> q", answer="x", source="t")
    a, p, n = data.load_triplet(row, min_pixels=24000, max_pixels=None)
    assert a.size == (200, 120) and p.size == n.size == a.size


def test_stacked_prompts_equal_one_processor_call(tiny):
    """stack_prompts of single-row encodings equals encode_prompts of the whole batch (TAPO reuses encodings)."""
    from conftest import random_image
    _, proc = tiny
    images = [random_image(112 + 28 * i, 112, i) for i in range(3)]
    texts = ["What is this?", "What species of bird is shown in this image, please?", "Hi"]
    whole = data.encode_prompts(proc, images, texts)
    stacked = data.stack_prompts([data.encode_prompts(proc, [im], [t]) for im, t in zip(images, texts)],
                                 proc.tokenizer.pad_token_id)
    assert whole.keys() == stacked.keys() and all(torch.equal(whole[k], stacked[k]) for k in whole)
