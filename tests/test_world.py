"""The embedded world: determinism, splits, no leakage of unseen classes, triplets, options, rationales."""
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import data
import world

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(classes_per_domain=8, shots=3, test_per_class=2, captions=2, vqa=1, knowledge_repeats=1, workers=0)


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return world.generate(tmp_path_factory.mktemp("world") / "w", seed=3, **SMALL)


@pytest.fixture(scope="module")
def meta(small):
    return json.loads((small / "world.json").read_text())


def classes_of(meta):
    """{class name: WorldClass} over all domains, from world.json."""
    return {c["name"]: world.WorldClass(d, c["name"], tuple(c["attributes"].items()))
            for d, info in meta["domains"].items() for c in info["classes"]}


def class_of_path(meta, path):
    """Class name of a train/test image path images/{split}/{domain}/{slug}/N.png."""
    parts = Path(path).parts
    assert parts[0] == "images" and parts[1] in ("train", "test"), path
    return {c.slug: c.name for c in classes_of(meta).values() if c.domain == parts[2]}[parts[3]]


def training_files(folder):
    return [folder / "cot_sft.json", folder / "sft_nocot.json", folder / "rl_train.jsonl"]


def test_same_seed_gives_identical_files(small, tmp_path):
    """Generating the same seed twice writes byte-identical files (images included)."""
    again = world.generate(tmp_path / "w", seed=3, **SMALL)
    assert tree_digest(small) == tree_digest(again)


def test_more_test_images_change_only_the_evaluation(small, tmp_path):
    """--test-per-class N larger: every file and image the stages train on is byte-identical (the same base, SFT and
    TAPO), the first images of each test class too; only the eval files, the added test images and world.json
    differ, so a seed's models can be evaluated on a larger test set without training again."""
    more = world.generate(tmp_path / "w", seed=3, **dict(SMALL, test_per_class=5))
    a, b = tree_digest(small), tree_digest(more)
    evals = {k for k in b if k.endswith(".jsonl") and k != "rl_train.jsonl"} | {"world.json"}
    assert {k for k in b if k not in a} == {k for k in b if k.startswith("images/test/")
                                            and int(Path(k).stem) >= SMALL["test_per_class"]}
    assert set(a) <= set(b) and all(a[k] == b[k] for k in a if k not in evals)
    assert {k for k in a if a[k] != b[k]} <= evals
    lines = {w: sum(1 for k in evals - {"world.json"} for _ in (w / k).open()) for w in (small, more)}
    assert lines[more] * SMALL["test_per_class"] == lines[small] * 5


def test_other_seed_changes_split_not_classes(tmp_path):
    """The class table is fixed per domain; the seed changes the split (and images)."""
    a = json.loads((world.generate(tmp_path / "a", seed=0, **SMALL) / "world.json").read_text())
    b = json.loads((world.generate(tmp_path / "b", seed=1, **SMALL) / "world.json").read_text())
    assert all(a["domains"][d]["attributes"] == b["domains"][d]["attributes"] for d in world.DOMAINS)
    assert [c["name"] for c in a["domains"]["bird"]["classes"]] == [c["name"] for c in b["domains"]["bird"]["classes"]]
    assert any(a["domains"][d]["seen"] != b["domains"][d]["seen"] for d in world.DOMAINS)


def test_split_proportions(meta):
    """Each domain: round(60%) of its classes seen, the rest unseen, disjoint and complete."""
    for d, info in meta["domains"].items():
        names = {c["name"] for c in info["classes"]}
        assert len(info["seen"]) == round(0.6 * len(names))
        assert set(info["seen"]) | set(info["unseen"]) == names
        assert not set(info["seen"]) & set(info["unseen"])
    seen, unseen = world.split_classes(world.make_classes("bird", 16), seed=0)
    assert (len(seen), len(unseen)) == (10, 6)


def test_no_unseen_class_reaches_training_files(small, meta):
    """cot_sft / sft_nocot / rl_train never name an unseen class nor use an unseen-class or test image."""
    unseen = [n for info in meta["domains"].values() for n in info["unseen"]]
    for f in training_files(small):
        text = f.read_text()
        assert not [n for n in unseen if n in text], f
        paths = re.findall(r'"(images/[^"]+)"', text)
        assert paths and all(p.startswith("images/train/") for p in paths), f
        assert not {class_of_path(meta, p) for p in paths} & set(unseen), f


def test_every_rl_row_is_a_seen_class_of_its_shots(small, meta):
    """rl_train.jsonl holds exactly `shots` anchors per seen class, each an image of its own class."""
    rows = [json.loads(x) for x in (small / "rl_train.jsonl").read_text().splitlines()]
    seen = {n for info in meta["domains"].values() for n in info["seen"]}
    assert sorted(r["answer"] for r in rows) == sorted(n for n in seen for _ in range(SMALL["shots"]))
    assert all(class_of_path(meta, r["images"][0]) == r["answer"] for r in rows)
    assert len({r["images"][0] for r in rows}) == len(rows)


def test_triplet_positive_and_negative(small, meta):
    """Positive: another image of the same class; negative: an image of the most similar other seen class."""
    cls = classes_of(meta)
    seen = {n for info in meta["domains"].values() for n in info["seen"]}
    for r in map(json.loads, (small / "rl_train.jsonl").read_text().splitlines()):
        a, pos, neg = r["images"][0], r["image_noisy"][0], r["image_aug"][0]
        c = cls[r["answer"]]
        assert class_of_path(meta, pos) == c.name and pos != a
        n = cls[class_of_path(meta, neg)]
        others = [cls[o] for o in seen if o != c.name and cls[o].domain == c.domain]
        assert n.name != c.name and n.name in seen
        assert world.distance(c, n) == min(world.distance(c, o) for o in others)
        assert Image.open(small / pos).size == Image.open(small / neg).size == Image.open(small / a).size


def test_options_hold_ground_truth_and_nearest_classes(small, meta):
    """Every eval line: gt is options[0] (as released), 3 distinct distractors = the nearest classes."""
    cls = classes_of(meta)
    for f in small.glob("*_*seen.jsonl"):
        for r in map(json.loads, f.read_text().splitlines()):
            c, opts = cls[r["ground_truth"]], r["options"]
            assert opts[0] == r["ground_truth"] and len(set(opts)) == 4
            domain = [o for o in cls.values() if o.domain == c.domain and o.name != c.name]
            dists = sorted(world.distance(c, o) for o in domain)[:3]
            assert sorted(world.distance(c, cls[o]) for o in opts[1:]) == dists
            assert class_of_path(meta, r["image_path"]) == c.name


def test_eval_files_cover_seen_and_unseen_classes(small, meta):
    """{domain}_seen/unseen.jsonl hold test_per_class images of exactly the seen / unseen classes."""
    for d, info in meta["domains"].items():
        for split in ("seen", "unseen"):
            rows = [json.loads(x) for x in (small / f"{d}_{split}.jsonl").read_text().splitlines()]
            assert sorted(r["ground_truth"] for r in rows) == sorted(n for n in info[split]
                                                                    for _ in range(SMALL["test_per_class"]))


def test_cot_rationale_has_four_parts(small, meta):
    """Each CoT answer is '<think> Visual analysis ... Candidates (<=4 seen, incl. gt) ... Comparison ...
    Prediction: LABEL. </think>\\n\\n<answer>LABEL</answer>' and matches the image's class; the comparison
    recalls each candidate's description (the default `describe`), the label's equal to the visual analysis."""
    seen = {n for info in meta["domains"].values() for n in info["seen"]}
    classes = classes_of(meta)
    pat = re.compile(r"<think> Visual analysis: the \w+ has (.+)\. Candidates: (.+)\. Comparison: (.+)\. "
                     r"Prediction: (.+)\. </think>\n\n<answer>(.+)</answer>")
    samples = json.loads((small / "cot_sft.json").read_text())
    # one image per seen class, asked under the 3 prompts of the later stages (RL, open, closed) and under
    # closed_option_sets - 1 more closed prompts
    per_class = 3 + meta["sizes"]["closed_option_sets"] - 1
    assert meta["sizes"]["comparison"] == "describe" and per_class > 3
    assert len(samples) == per_class * len(seen) and len({s["images"][0] for s in samples}) == len(seen)
    for s in samples:
        m = pat.fullmatch(s["messages"][2]["content"])
        assert m, s["messages"][2]["content"]
        label = class_of_path(meta, s["images"][0])
        cands = m.group(2).split(", ")
        assert m.group(4) == m.group(5) == label and label in cands and len(cands) <= 4
        assert set(cands) <= seen
        assert m.group(3).split("; ") == [f"{c} has {world.description(classes[c])}" for c in cands]
        assert m.group(1) == world.description(classes[label])


def test_sft_prompts_are_the_stages_prompts(small, meta):
    """Each seen class's SFT image is asked under TAPO's RL prompt and the open / closed eval prompts."""
    import data
    samples = json.loads((small / "cot_sft.json").read_text())
    by_image = {}
    for s in samples:
        by_image.setdefault(s["images"][0], []).append(s["messages"][1]["content"].replace("<image>", ""))
    for texts in by_image.values():
        assert texts[0].endswith(data.RL_SUFFIX)
        assert texts[1].endswith("This is a fine-grained question. Output reasoning in <think></think> and the "
                                 "final answer in <answer></answer>.")
        assert texts[2].startswith("Given the question: ") and "based on the options provided in [" in texts[2]


def test_nocot_file_mirrors_cot_file(small):
    """sft_nocot.json: the CoT file's images and questions, assistant '<answer>LABEL</answer>' only."""
    cot = json.loads((small / "cot_sft.json").read_text())
    nocot = json.loads((small / "sft_nocot.json").read_text())
    assert [s["images"] for s in cot] == [s["images"] for s in nocot]
    assert [s["messages"][:2] for s in cot] == [s["messages"][:2] for s in nocot]
    for a, b in zip(cot, nocot):
        label = re.search(r"<answer>(.+)</answer>", a["messages"][2]["content"]).group(1)
        assert b["messages"][2]["content"] == f"<answer>{label}</answer>"


def test_pretraining_corpus_names_every_class_on_its_own_images(small, meta, tmp_path):
    """pretrain.json: knowledge texts name every class; web-like captions name images of every class, seen AND
    unseen (here without naming noise), and every image sample uses the pretraining pool only."""
    clean = world.generate(tmp_path / "w", seed=3, **dict(SMALL, name_noise=(0, 0, 0)))
    samples = json.loads((clean / "pretrain.json").read_text())
    names = list(classes_of(meta))
    text_only = [s for s in samples if not s["images"]]
    with_image = [s for s in samples if s["images"]]
    for n in names:
        assert any(s["messages"][0]["content"] == f"Describe the {n}." for s in text_only), n
        assert any(n in s["messages"][1]["content"] for s in with_image), n
    assert all(p.startswith("images/pretrain/") for s in with_image for p in s["images"])


def test_instruction_samples_follow_the_stage_prompts(small, meta):
    """The base model's format samples (pretraining images under the RL / open / closed prompts) answer
    <think>..</think><answer>..</answer>: attribute questions with a colour and no class name anywhere; class
    questions with the web's (noisy) name; text-only field-guide quizzes with the described class."""
    samples = json.loads((small / "pretrain.json").read_text())
    names = list(classes_of(meta))
    inst = [s for s in samples if "<think>" in s["messages"][1]["content"]]
    kinds = {"rl": 0, "open": 0, "closed": 0}
    n_attr = 0
    for s in inst:
        q, a = s["messages"][0]["content"], s["messages"][1]["content"]
        kinds["rl"] += q.endswith(data.RL_SUFFIX)
        kinds["open"] += "This is a fine-grained question." in q
        kinds["closed"] += "based on the options provided in" in q
        m = re.fullmatch(r"<think> .+ </think>\n\n<answer>(.+)</answer>", a)
        assert m, a
        if m.group(1) in world.COLOURS:
            n_attr += 1
            assert s["images"] and not [n for n in names if n in q + a], s
        else:
            assert not s["images"] or s["images"][0].startswith("images/pretrain/"), s
    assert all(kinds.values()) and sum(kinds.values()) == len(inst) and n_attr > 0


def test_closed_world_format_samples_answer_with_an_option(small):
    """Under the closed-world prompt the base model's format samples answer with one of the listed options (the
    web's genus / super-category names only answer open prompts), as an Instruct model picks a choice."""
    samples = json.loads((small / "pretrain.json").read_text())
    closed = [s for s in samples if "based on the options provided in" in s["messages"][0]["content"]]
    assert closed
    for s in closed:
        opts = re.findall(r"'([^']+)'", s["messages"][0]["content"].split("based on the options provided in")[1])
        answer = re.search(r"<answer>(.+)</answer>", s["messages"][1]["content"]).group(1)
        assert len(opts) == 4 and answer in opts, s


def test_describe_comparison_recalls_every_candidate(tmp_path):
    """--comparison describe: the rationale's comparison gives each candidate's whole description (knowledge),
    and the field-guide knowledge texts use the same form."""
    w = world.generate(tmp_path / "w", seed=3, **dict(SMALL, comparison="describe"))
    meta = json.loads((w / "world.json").read_text())
    classes = classes_of(meta)
    for s in json.loads((w / "cot_sft.json").read_text()):
        think = s["messages"][2]["content"]
        cands = re.search(r"Candidates: (.+?)\. Comparison", think).group(1).split(", ")
        for n in cands:
            assert f"{n} has {world.description(classes[n])}" in think, (n, think)
    guides = [s for s in json.loads((w / "pretrain.json").read_text()) if "Comparison:" in s["messages"][1]["content"]]
    assert guides and all(" matches" not in s["messages"][1]["content"] for s in guides)


def test_replay_is_the_corpus_without_its_prompt_format_samples(small):
    """replay.json (what SFT replays) is pretrain.json in order minus every sample answered in the stages'
    short <think>/<answer> format, so that the base model's short answers do not compete with the CoT rationale
    (the text-only quizzes answered with the whole rationale stay)."""
    corpus = json.loads((small / "pretrain.json").read_text())
    replay = json.loads((small / "replay.json").read_text())
    fmt = [s for s in corpus if "<answer>" in s["messages"][-1]["content"]
           and "Candidates:" not in s["messages"][-1]["content"]]
    assert fmt and replay == [s for s in corpus if s not in fmt]


def test_analysis_replay_says_of_each_pretraining_image_what_the_corpus_said(small, meta):
    """analysis_replay.json: every pretraining image once, answered with the start of its class's rationale (the
    visual analysis, `prefix`), no unseen class named; its pattern word is scored exactly when some corpus text
    about the image stated the whole description, and otherwise is the one `unscored` span."""
    replay = json.loads((small / "analysis_replay.json").read_text())
    corpus = json.loads((small / "pretrain.json").read_text())
    said = {}
    for smp in corpus:
        for p in smp["images"]:
            said.setdefault(p, []).append(smp["messages"][-1]["content"])
    assert sorted(r["images"][0] for r in replay) == sorted(said)
    by_desc = {(c.domain, world.description(c)): c for c in classes_of(meta).values()}
    unseen = [n for info in meta["domains"].values() for n in info["unseen"]]
    for r in replay:
        text = r["messages"][-1]["content"]
        assert r["prefix"] is True and not [n for n in unseen if n in r["messages"][0]["content"] + text]
        m = re.fullmatch(r"<think> Visual analysis: the (\w+) has (.+)\.", text)
        domain = next(d for d, info in meta["domains"].items() if info["noun"] == m.group(1))
        c = by_desc[(domain, m.group(2))]
        assert world.rationale(c, [c]).startswith(text)
        stated = any(world.description(c) in t for t in said[r["images"][0]])
        assert stated or any(world.description(c, pattern=False) in t for t in said[r["images"][0]])
        if stated:
            assert "unscored" not in r
        else:
            [[a, b]] = r["unscored"]
            assert text[a:b] == c.a["pattern"]


def test_smallest_world_lists_only_seen_options_in_the_analysis_replay(tmp_path):
    """With 4 classes per domain (2 seen) the analysis replay's closed-world options are the seen classes there
    are, never an unseen one (fewer than 4 when fewer exist)."""
    w = world.generate(tmp_path / "w", seed=1, **dict(SMALL, classes_per_domain=4))
    meta = json.loads((w / "world.json").read_text())
    seen = {n for info in meta["domains"].values() for n in info["seen"]}
    closed = [re.search(r"options provided in (\[.*?\])", r["messages"][0]["content"])
              for r in json.loads((w / "analysis_replay.json").read_text())]
    opts = [ast.literal_eval(m.group(1)) for m in closed if m]
    assert opts and all(1 <= len(o) <= 4 and set(o) <= seen for o in opts)


def test_closed_option_sets_make_the_candidates_a_copy_of_the_options(tmp_path):
    """--closed-option-sets K: K closed-world CoT samples per seen class, options = the class and other SEEN
    classes, and the rationale's candidates are exactly the options in the order listed."""
    w = world.generate(tmp_path / "w", seed=3, **dict(SMALL, closed_option_sets=4))
    meta = json.loads((w / "world.json").read_text())
    seen = {n for info in meta["domains"].values() for n in info["seen"]}
    closed = [s for s in json.loads((w / "cot_sft.json").read_text())
              if "based on the options provided in" in s["messages"][1]["content"]]
    assert len(closed) == 4 * len(seen)
    lists = set()
    for s in closed:
        opts = re.findall(r"'([^']+)'", s["messages"][1]["content"].split("based on the options provided in")[1])
        cands = re.search(r"Candidates: (.+?)\. Comparison", s["messages"][2]["content"]).group(1).split(", ")
        assert cands == opts and set(opts) <= seen and class_of_path(meta, s["images"][0]) in opts
        lists.add(tuple(opts))
    assert len(lists) > len(seen)  # the option lists vary within a class


def test_extra_classes_are_named_in_sft_but_never_answered_trained_or_tested(small, meta, tmp_path):
    """--extra-per-domain K: K seen classes per domain become extra. The corpus is byte-identical (the base model
    does not change); the extras appear as candidates or options of the SFT files but never as an answer, have no
    training or test image, and no unseen class reaches a fine-tuning file."""
    w = world.generate(tmp_path / "w", seed=3, **dict(SMALL, extra_per_domain=2))
    m = json.loads((w / "world.json").read_text())
    assert (w / "pretrain.json").read_bytes() == (small / "pretrain.json").read_bytes()
    for d, info in m["domains"].items():
        assert len(info["extra"]) == 2 and set(info["extra"]) <= set(meta["domains"][d]["seen"])
        assert sorted(info["seen"] + info["extra"]) == sorted(meta["domains"][d]["seen"])
        assert info["unseen"] == meta["domains"][d]["unseen"]
        assert {c["name"] for c in info["classes"] if c["split"] == "extra"} == set(info["extra"])
    extra = {n for info in m["domains"].values() for n in info["extra"]}
    unseen = {n for info in m["domains"].values() for n in info["unseen"]}
    sft = json.loads((w / "cot_sft.json").read_text())
    answers = {re.search(r"<answer>(.+)</answer>", s["messages"][-1]["content"]).group(1) for s in sft}
    named = {n for n in extra if any(n in s["messages"][1]["content"] + s["messages"][2]["content"] for s in sft)}
    assert not answers & extra and named == extra
    rl = [json.loads(x) for x in (w / "rl_train.jsonl").read_text().splitlines()]
    assert not {r["answer"] for r in rl} & extra
    images = [p for f in training_files(w) for p in re.findall(r'"(images/[^"]+)"', f.read_text())]
    images += [json.loads(x)["image_path"] for f in w.glob("*_*seen.jsonl") for x in f.read_text().splitlines()]
    assert not {class_of_path(m, p) for p in images} & extra
    truths = {json.loads(x)["ground_truth"] for f in w.glob("*_*seen.jsonl") for x in f.read_text().splitlines()}
    assert not truths & extra
    fine_tuning = "".join(f.read_text() for f in training_files(w))
    assert not [n for n in unseen if n in fine_tuning]
    assert world.generate(tmp_path / "w", seed=3, check=True, **dict(SMALL, extra_per_domain=2)) == []
    assert world.generate(tmp_path / "w", seed=3, check=True, **SMALL)  # another world: named as different


def test_reasoned_quizzes_write_the_rationale_in_words_for_every_class(tmp_path):
    """--quiz-cot 1: every text-only quiz is answered with the four-part rationale, for seen AND unseen classes;
    under the closed prompt its candidates are the options as listed; replay.json keeps these quizzes."""
    w = world.generate(tmp_path / "w", seed=3, **dict(SMALL, quiz_cot=1.0, comparison="describe"))
    meta = json.loads((w / "world.json").read_text())
    corpus = json.loads((w / "pretrain.json").read_text())
    quizzes = [s for s in corpus if not s["images"] and "<answer>" in s["messages"][-1]["content"]]
    assert quizzes and all("Candidates:" in s["messages"][-1]["content"] for s in quizzes)
    answered = {re.search(r"<answer>(.+)</answer>", s["messages"][-1]["content"]).group(1) for s in quizzes}
    assert answered == set(classes_of(meta))  # every class, unseen included (pretraining, not fine-tuning)
    closed = [s for s in quizzes if "based on the options provided in" in s["messages"][0]["content"]]
    assert closed
    for s in closed:
        opts = re.findall(r"'([^']+)'", s["messages"][0]["content"].split("based on the options provided in")[1])
        cands = re.search(r"Candidates: (.+?)\. Comparison", s["messages"][-1]["content"]).group(1).split(", ")
        assert cands == opts
    replay = json.loads((w / "replay.json").read_text())
    assert all(q in replay for q in quizzes)
    assert not [s for s in replay if "<think>" in s["messages"][-1]["content"] and s["images"]]
    fine_tuning = "".join(f.read_text() for f in training_files(w))
    assert not [n for d in meta["domains"].values() for n in d["unseen"] if n in fine_tuning]


def test_pretraining_pool_4shot_and_test_images_are_disjoint(small, meta):
    """Pretraining, 4-shot training and test images are three disjoint sets of files, and of pixels."""
    samples = json.loads((small / "pretrain.json").read_text())
    pre = {p for s in samples for p in s["images"]}
    train = set(re.findall(r'"(images/train/[^"]+)"', "".join(f.read_text() for f in training_files(small))))
    test = {json.loads(x)["image_path"] for f in small.glob("*_*seen.jsonl") for x in f.read_text().splitlines()}
    assert pre and train and test
    assert all(p.startswith("images/pretrain/") for p in pre) and all(p.startswith("images/test/") for p in test)
    assert not pre & train and not pre & test and not train & test
    digest = {s: {hashlib.sha256((small / p).read_bytes()).hexdigest() for p in ps}
              for s, ps in (("pre", pre), ("train", train), ("test", test))}
    assert not digest["pre"] & digest["train"] and not digest["pre"] & digest["test"]
    assert not digest["train"] & digest["test"]


def test_images_are_112px_rgb_pngs(small):
    """Every image is a 112x112 RGB PNG (16 image tokens for Qwen2.5-VL)."""
    files = list((small / "images").rglob("*.png"))
    assert len(files) == json.loads((small / "world.json").read_text())["files"]["images"]
    for f in files[::7]:
        im = Image.open(f)
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (112, 112))


def test_world_files_load_with_data_loaders(small):
    """All written files parse with data.py, images checked; the CoT file carries the release system prompt."""
    assert len(data.load_stage1(small / "pretrain.json")) > 0
    assert all(s.prefix and s.image for s in data.load_stage1(small / "analysis_replay.json"))
    cot = data.load_stage1(small / "cot_sft.json")
    assert all(s.system == data.SYSTEM_PROMPT_R1 and s.image.endswith(".png") for s in cot)
    assert all(Path(r.positive).exists() for r in data.load_stage2(small / "rl_train.jsonl"))
    items = data.load_eval(small / "flower_unseen.jsonl")
    assert {(i.dataset, i.split) for i in items} == {("flower", "unseen")}


@pytest.mark.parametrize("n", [4, 5, 8, 16, 30])
def test_every_class_has_a_one_attribute_neighbour(n):
    """Low inter-class variance: each class's nearest other class differs in exactly one attribute."""
    for d in world.DOMAINS:
        cs = world.make_classes(d, n)
        assert len(cs) == n and len({c.attrs for c in cs}) == n
        assert all(min(world.distance(c, o) for o in cs if o is not c) == 1 for c in cs)


def test_class_names_are_invented_and_unambiguous():
    """Names are unique two-word names, no name inside another, and no attribute word in any name."""
    words = {w for dom in world.DOMAINS.values() for _, vals in dom.attributes for w in vals}
    for d in world.DOMAINS:
        names = [c.name.lower() for c in world.make_classes(d, 16)]
        assert len(set(names)) == 16 and all(len(n.split()) == 2 for n in names)
        assert not [(a, b) for a in names for b in names if a != b and a in b]
        assert not [n for n in names if set(n.split()) & words]


def test_colour_parts_of_a_class_differ():
    """Within a class, no two coloured parts share a colour (each part stays visible)."""
    for d in world.DOMAINS:
        for c in world.make_classes(d, 16):
            cols = [c.a[p] for p in world.COLOUR_PARTS[d]]
            assert len(set(cols)) == len(cols), c


def test_render_is_deterministic_and_varies_by_key():
    """Same key -> same pixels; another key -> another image of the class (intra-class variance)."""
    c = world.make_classes("aircraft")[0]
    a, b, other = world.render(c, "k"), world.render(c, "k"), world.render(c, "k2")
    assert a.tobytes() == b.tobytes() and a.tobytes() != other.tobytes()


def test_cli_writes_a_world(tmp_path):
    """`python world.py --out DIR` with small sizes writes world.json and the release-format files."""
    out = tmp_path / "cli"
    subprocess.run([sys.executable, str(ROOT / "world.py"), "--out", str(out), "--classes-per-domain", "4",
                    "--captions", "1", "--test-per-class", "1", "--shots", "2", "--domains", "bird"],
                   check=True, capture_output=True, cwd=ROOT)
    assert {"world.json", "pretrain.json", "cot_sft.json", "sft_nocot.json", "rl_train.jsonl",
            "bird_seen.jsonl", "bird_unseen.jsonl"} <= {p.name for p in out.iterdir()}


def test_cli_rejects_more_extra_classes_than_the_seen_split_can_spare(tmp_path):
    """16 classes, 60% seen = 10: at most 8 extra (2 seen classes stay for the triplets); the error says so."""
    r = subprocess.run([sys.executable, str(ROOT / "world.py"), "--out", str(tmp_path / "w"),
                        "--extra-per-domain", "9"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--extra-per-domain must be in 0..8" in r.stderr
    assert not (tmp_path / "w").exists()


def test_check_accepts_its_own_world_names_what_differs_and_writes_nothing(small):
    """generate(check=True): [] for the arguments that made the world, one line per difference otherwise."""
    before = tree_digest(small)
    assert world.generate(small, seed=3, check=True, **SMALL) == []
    diffs = world.generate(small, seed=4, check=True, **dict(SMALL, pattern_frac=0.6))
    assert diffs == ["seed: 3 here, 4 asked", "pattern_frac: 0.3 here, 0.6 asked"]
    assert world.generate(small.parent / "none", seed=3, check=True, **SMALL)[0].endswith("no world here")
    assert tree_digest(small) == before and not (small.parent / "none").exists()


def test_run_sh_stops_on_a_world_folder_of_another_seed(small, tmp_path):
    """run.sh reuses a stage's output when it exists; a world of another seed stops it before any training."""
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text((small / "world.json").read_text())  # seed 3, SMALL sizes
    r = subprocess.run(["bash", str(ROOT / "run.sh")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, SEED="0", OUT=str(tmp_path)))
    assert r.returncode != 0 and "seed: 3 here, 0 asked" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]
