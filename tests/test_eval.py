"""eval.py: release metrics on hand-written outputs, option shuffling, fake models, resume, torchrun sharding."""
import ast
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageStat

import eval as ev
import report
from data import DataError, EvalItem
from launch import run
from reward import release_eval_answer

ROOT = Path(__file__).resolve().parents[1]
FORMATS = Path(__file__).resolve().parent / "fixtures"  # the release's sample files, copied
CLASSES = [f"Class {c}{d}" for c in "ABCDEFGHIJ" for d in "xy"]  # 20 labels


def eval_files(folder, n, datasets=("bird",), splits=("seen", "unseen"), seed=0, image="img.png"):
    """Release-format eval files (gt first in options) of n items each, all showing one small image."""
    folder.mkdir(parents=True, exist_ok=True)
    if image == "img.png":
        Image.new("RGB", (56, 56), (200, 30, 30)).save(folder / image)
    rng = random.Random(seed)
    for d in datasets:
        for s in splits:
            rows = []
            for _ in range(n):
                opts = rng.sample(CLASSES, 4)
                rows.append({"image_path": image, "question": f"What kind of {d} is this?", "options": opts,
                             "ground_truth": opts[0]})
            (folder / f"{d}_{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def shown_options(prompt):
    return ast.literal_eval(prompt.split("based on the options provided in ")[1].split(", output the thinking")[0])


def first_option(images, prompts):
    """A fake model that always answers the first option shown (open world: a fixed wrong label)."""
    return [f"<think>hmm</think> <answer>{shown_options(p)[0]}</answer>" if "options provided" in p
            else "<think>hmm</think> <answer>Nothing</answer>" for p in prompts]


def run_main(tmp_path, data, *extra, respond=first_option):
    return ev.main(["--model", "fake", "--data", str(data), "--out", str(tmp_path / "out"), *extra], respond=respond)


# ----------------------------------------------------------------------------------------------------------
# Metrics

def test_release_eval_answer_matches_the_release_regex():
    """reward.release_eval_answer gives the span of re.search(r'<answer>(.*)</answer>', DOTALL), stripped."""
    cases = ["<answer> A </answer>", "x<answer>A</answer>y<answer>B</answer>z", "<answer>A", "A</answer>",
             "</answer><answer>A", "<answer></answer>", "<answer>\nA\n</answer>", "", "<answer><answer>A</answer>",
             "</answer> <answer>A</answer>", "<answer>A</answer></answer>"]
    for c in cases:
        m = re.search(r"<answer>(.*)</answer>", c, re.DOTALL)
        assert release_eval_answer(c) == (m.group(1).strip() if m else None), c


def test_closed_world_metrics_on_handwritten_outputs():
    """Closed world: release inclusion on the answer only, '_' normalised; exact, no-option and format rates."""
    gt = "Black_Footed_Albatross"
    opts = ["Laysan Albatross", "Black_Footed_Albatross", "Sooty Albatross", "Heermann Gull"]
    item = EvalItem("x.png", "q?", opts, gt, "bird", "seen", "bird_seen.jsonl:1")
    unit = ev.make_units([item], modes=("closed",), order="release")[0]
    cases = {  # output: (correct, exact, format, no_option)
        "<think>white</think> <answer>Black Footed Albatross</answer>": (True, True, True, False),
        "<think>t</think><answer>Laysan Albatross, Black Footed Albatross</answer>": (True, False, True, False),
        "The answer is Black Footed Albatross.": (False, False, False, True),  # no tag: wrong (release)
        "<think>Black Footed Albatross?</think> <answer>Sooty Albatross</answer>": (False, False, True, False),
        "<think>t</think> <answer></answer>": (False, False, True, True),
        "<think>t</think> <answer>a penguin</answer>": (False, False, True, True),
        "<answer>Sooty Albatross</answer> or <answer>black footed albatross</answer>": (True, False, False, False),
    }
    for out, expect in cases.items():
        r = ev.score(unit, out)
        assert (r["correct"], r["exact"], r["format"], r["no_option"]) == expect, out
    recs = [ev.score(unit, o) for o in cases]
    m = report.summarise(recs)["closed"]["seen"]["bird"]
    lo, hi = m.pop("ci")["acc"]
    assert lo < 300 / 7 < hi
    assert m == {"acc": pytest.approx(300 / 7, abs=1e-3), "exact": pytest.approx(100 / 7, abs=1e-3),
                 "format": pytest.approx(500 / 7, abs=1e-3), "no_option": pytest.approx(300 / 7, abs=1e-3),
                 "truncated": 0.0, "n": 7}


def test_open_world_metrics_on_handwritten_outputs():
    """Open world: TI on the answer (whole output without a tag), cars make+model rule, exact."""
    bird = EvalItem("x.png", "q?", ["Black Footed Albatross", "b"], "Black Footed Albatross", "bird", "unseen", "b:1")
    car = EvalItem("y.png", "q?", ["Suzuki Aerio Sedan 2007", "b"], "Suzuki Aerio Sedan 2007", "car", "unseen", "c:1")
    ub, uc = (ev.make_units([it], modes=("open",))[0] for it in (bird, car))
    assert (ub.super, uc.super) == ("bird", "car")
    assert ev.score(ub, "I think it is a black footed albatross.")["correct"]  # no tag: the whole output
    assert not ev.score(ub, "<think>Black Footed Albatross?</think><answer>Laysan</answer>")["correct"]
    r = ev.score(ub, "<think>t</think><answer>black-footed albatross</answer>")
    assert (r["correct"], r["exact"]) == (False, True)  # release TI is literal; exact forgives "-"
    r = ev.score(uc, "<think>t</think> <answer>Suzuki Aerio</answer>")
    assert (r["correct"], r["exact"]) == (True, False)  # cars: body type and year not required
    assert not ev.text_inclusion("<answer>Suzuki Aerio</answer>", car.ground_truth, "object")
    assert ev.score(uc, "<answer>Suzuki Aerio Sedan 2007</answer>")["exact"]
    m = report.summarise([ev.score(ub, "<answer>Black Footed Albatross</answer>"), ev.score(ub, "x")])["open"]
    assert "ss_rel" not in m["unseen"]["bird"].pop("ci")  # no interval for what is unavailable
    assert m["unseen"]["bird"] == {"ti": 50.0, "exact": 50.0, "ss_rel": None, "format": 0.0, "truncated": 0.0, "n": 2}
    assert "seen" not in m and m["overall"] is None


def test_ss_rel_formula_and_fill():
    """SS_rel = max(0, (cos(p, g) - cos(s, g)) / (1 - cos(s, g))); fill_ss scores the answer, else the output."""
    got = ev.ss_rel(torch.tensor([0.9, 0.5, 0.2, 1.0]), torch.tensor([0.5, 0.5, 0.5, 0.3]))
    torch.testing.assert_close(got, torch.tensor([0.8, 0.0, 0.0, 1.0]))
    seen = []

    def scorer(preds, gts, supers):
        seen.extend(zip(preds, gts, supers))
        return [0.25] * len(preds)
    recs = [{"mode": "open", "output": "<answer>A</answer>", "ground_truth": "G", "super": "bird", "ss_rel": None},
            {"mode": "open", "output": "just text", "ground_truth": "G", "super": "bird", "ss_rel": 0.5},
            {"mode": "open", "output": "no tag", "ground_truth": "G", "super": "car", "ss_rel": None},
            {"mode": "closed", "output": "x", "ground_truth": "G", "super": "car"}]
    ev.fill_ss(recs, scorer)
    assert seen == [("A", "G", "bird"), ("no tag", "G", "car")]
    assert [r.get("ss_rel") for r in recs] == [0.25, 0.5, 0.25, None]


def test_siglip_text_from_a_local_folder(tmp_path):
    """A (tiny, random) local SigLIP loads; the gt itself scores SS_rel 1, everything lies in [0, 1]."""
    from transformers import SiglipConfig, SiglipModel

    from presets import build_tokenizer
    tok = build_tokenizer(1024)
    cfg = SiglipConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=16))
    torch.manual_seed(0)
    SiglipModel(cfg).save_pretrained(tmp_path / "siglip")
    tok.save_pretrained(tmp_path / "siglip")
    s = ev.SiglipText(tmp_path / "siglip")
    vals = s(["Vesper Finch", "a red bird", "Halden Lily"], ["Vesper Finch"] * 3, ["bird"] * 3)
    assert vals[0] == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in vals)
    with pytest.raises(FileNotFoundError, match="local model folder"):
        ev.SiglipText(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------------------
# Options, super-categories, release files

def test_shuffling_is_deterministic_and_keeps_the_ground_truth(tmp_path):
    """Shuffled options depend only on (seed, file:line), keep the same set, and spread the gt uniformly."""
    items, _ = ev.load_items([eval_files(tmp_path, 400, splits=("seen",)) / "bird_seen.jsonl"])
    pos = [0] * 4
    for it in items:
        a = ev.shuffled_options(it, seed=0)
        assert a == ev.shuffled_options(it, seed=0) and sorted(a) == sorted(it.options)
        assert it.ground_truth in a
        pos[a.index(it.ground_truth)] += 1
    assert min(pos) > 70, pos  # about 100 each
    assert any(ev.shuffled_options(it, 0) != ev.shuffled_options(it, 1) for it in items)
    units = ev.make_units(items[:3], modes=("closed",), seed=0)
    assert units[0].options == ev.shuffled_options(items[0], 0) and "shuffled@0" in units[0].key
    assert shown_options(units[0].prompt) == units[0].options


def test_release_sample_files_load():
    """The release's sample eval files load (dataset / split from the name) and give both prompts."""
    files = ev.find_eval_files([FORMATS / "eval_bird_seen.sample.jsonl", FORMATS / "eval_car_unseen.sample.jsonl"],
                               report.SPLITS)
    items, raw = ev.load_items(files, image_root="/data")
    assert len(items) == 10 and {(i.dataset, i.split) for i in items} == {("bird", "seen"), ("car", "unseen")}
    assert raw[0].startswith("bird_200/images/") and items[0].image.startswith("/data/bird_200")
    units = ev.make_units(items, order="release", raw_paths=raw)
    closed = [u for u in units if u.mode == "closed"]
    assert str(items[0].options) in closed[0].prompt and closed[0].options[0] == items[0].ground_truth
    assert {u.super for u in units} == {"bird", "car"}
    release = ev.make_units(items, modes=("open",), super_rule="release", raw_paths=raw)
    assert [u.super for u in release] == ["object"] * 5 + ["car"] * 5  # "bird_200/..." has no "birds"
    assert ev.find_eval_files([FORMATS], ("unseen",)) == [FORMATS / "eval_car_unseen.sample.jsonl"]


# ----------------------------------------------------------------------------------------------------------
# Fake models through the CLI

def test_first_option_model_scores_100_with_release_order_and_chance_when_shuffled(tmp_path, capsys):
    """Always answering the first option: 100% in the release's order, about 25% with shuffled options."""
    data = eval_files(tmp_path / "d", 100)
    rel = run_main(tmp_path / "a", data, "--mode", "closed", "--options-order", "release", "--micro-batch", "16")
    assert rel["closed"]["overall"]["acc"] == 100.0 and rel["closed"]["seen"]["avg"]["n"] == 100
    shuf = run_main(tmp_path / "b", data, "--mode", "closed", "--micro-batch", "16")
    assert 10 < shuf["closed"]["overall"]["acc"] < 40, shuf["closed"]["overall"]
    assert shuf["closed"]["overall"]["no_option"] == 0.0 and shuf["closed"]["overall"]["format"] == 100.0
    assert (tmp_path / "a" / "out" / "summary_closed_release-order.json").exists()
    summary = json.loads((tmp_path / "b" / "out" / "summary_closed.json").read_text())
    assert summary["closed"]["unseen"]["bird"]["n"] == 100 and summary["settings"]["options_order"] == "shuffled"
    printed = capsys.readouterr().out
    assert "| Method | bird seen | bird unseen | Seen avg | Unseen avg | Overall |" in printed


def test_missing_image_fails_naming_it(tmp_path):
    """An eval line whose image does not exist fails with a DataError naming the file:line and the image."""
    data = eval_files(tmp_path / "d", 2, splits=("seen",), image="nowhere/missing.png")
    with pytest.raises(DataError, match=r"bird_seen\.jsonl:1: image .*nowhere/missing\.png not found"):
        run_main(tmp_path, data)


def test_interrupted_run_resumes_without_redoing_items(tmp_path):
    """A run killed after 2 batches resumes: only the remaining prompts are generated, the summary is complete
    and equal to an uninterrupted run's."""
    data = eval_files(tmp_path / "d", 5)  # 10 items x 2 modes = 20 prompts, batches of 3
    calls = []

    def crashing(images, prompts):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return first_option(images, prompts)
    with pytest.raises(KeyboardInterrupt):
        run_main(tmp_path, data, "--micro-batch", "3", respond=crashing)
    items = tmp_path / "out" / "items.jsonl"
    assert len(items.read_text().splitlines()) == 6
    with open(items, "a") as f:
        f.write('{"key": "bird_seen.jsonl:1|open|-", "outp')  # a torn line from the interruption
    seen = []

    def counting(images, prompts):
        seen.extend(prompts)
        return first_option(images, prompts)
    resumed = run_main(tmp_path, data, "--micro-batch", "3", respond=counting)
    assert len(seen) == 14
    keys = [json.loads(line)["key"] for line in items.read_text().splitlines() if line.endswith("}")]
    assert len(keys) == len(set(keys)) == 20
    fresh = run_main(tmp_path / "fresh", data, "--micro-batch", "7")
    assert resumed["closed"] == fresh["closed"] and resumed["open"] == fresh["open"]
    assert resumed["closed"]["overall"]["n"] == 10 and resumed["open"]["overall"]["n"] == 10
    # a different setup (here max_new_tokens) does not reuse the results: they are set aside and redone
    seen.clear()
    run_main(tmp_path, data, "--micro-batch", "3", "--max-new-tokens", "9", respond=counting)
    assert len(seen) == 20 and (tmp_path / "out" / "items.jsonl.stale").exists()


def test_split_and_mode_flags(tmp_path):
    """--unseen and --mode open evaluate only those; ss_rel is null without --siglip."""
    data = eval_files(tmp_path / "d", 3, datasets=("bird", "car"))
    s = run_main(tmp_path, data, "--unseen", "--mode", "open", "--limit", "2")
    assert "closed" not in s and set(s["open"]) == {"unseen", "overall"}
    assert s["open"]["unseen"]["avg"]["n"] == 4 and s["open"]["unseen"]["avg"]["ss_rel"] is None
    assert not (tmp_path / "out" / "summary.json").exists()  # a partial run never replaces the full summary
    assert json.loads((tmp_path / "out" / "summary_open_unseen_limit2.json").read_text())["open"] == s["open"]


# ----------------------------------------------------------------------------------------------------------
# Summary, table, model resolution, responder

def rec(mode, split, dataset, correct, **kw):
    base = {"source": "f.jsonl:1", "mode": mode, "split": split, "dataset": dataset, "correct": correct,
            "exact": correct, "format": True, "no_option": False, "ss_rel": 0.5, "finish": "stop"}
    return {**base, **kw}


def test_summary_averages_datasets_and_overall_is_the_mean_of_seen_and_unseen():
    """Split avg = unweighted mean over datasets; overall = (seen avg + unseen avg) / 2; table rows per tag."""
    recs = ([rec("closed", "seen", "bird", True)] * 3 + [rec("closed", "seen", "car", False)]
            + [rec("closed", "unseen", "bird", True), rec("closed", "unseen", "bird", False, finish="length")])
    s = report.summarise(recs, tag="x")
    assert s["closed"]["seen"]["avg"]["acc"] == 50.0 and s["closed"]["seen"]["avg"]["n"] == 4
    assert s["closed"]["unseen"]["avg"]["acc"] == 50.0 and s["closed"]["unseen"]["bird"]["truncated"] == 50.0
    assert s["closed"]["overall"]["acc"] == 50.0 and s["closed"]["overall"]["n"] == 6
    assert list(s["closed"]["seen"]) == ["bird", "car", "avg"] and "open" not in s
    other = report.summarise([rec("closed", "seen", "bird", False)])
    table = report.markdown_table({"CoT SFT": s, "Base": other}, "closed", "acc", marks={("Base", "bird seen")})
    assert table.splitlines() == [
        "| Method | bird seen | bird unseen | car seen | Seen avg | Unseen avg | Overall |",
        "|---|---|---|---|---|---|---|",
        "| CoT SFT | 100.00 [100.0, 100.0] | 50.00 [0.0, 100.0] | 0.00 [0.0, 0.0] | 50.00 [50.0, 50.0] "
        "| 50.00 [0.0, 100.0] | 50.00 [25.0, 75.0] |",
        "| Base | 0.00* [0.0, 0.0] | - | - | 0.00 [0.0, 0.0] | - | - |"]


def test_table_mode_puts_finished_evaluations_side_by_side(tmp_path, capsys):
    """`eval.py --table DIR:TAG ... --table-out P` prints one row per evaluation and writes P.md / P.json."""
    data = eval_files(tmp_path / "d", 4)
    run_main(tmp_path / "a", data, "--options-order", "release", "--tag", "ignored")
    run_main(tmp_path / "b", data)
    capsys.readouterr()
    got = ev.main(["--table", f"{tmp_path / 'a' / 'out' / 'summary_release-order.json'}:Release order",
                   str(tmp_path / "b" / "out"),
                   str(tmp_path / "missing"), "--table-out", str(tmp_path / "res" / "results")])
    assert list(got) == ["Release order", "fake"]
    printed = capsys.readouterr().out
    assert "| Release order | " + " | ".join(["100.00 [100.0, 100.0]"] * 5) + " |" in printed
    assert "Open-world SS_rel (%): unavailable (no --siglip)" in printed and "row skipped" in printed
    assert (tmp_path / "res" / "results.md").read_text().startswith("Closed-world accuracy")
    assert set(json.loads((tmp_path / "res" / "results.json").read_text())) == {"Release order", "fake"}
    assert "| fake | " in printed and "*" in printed.split("| fake | ")[1].splitlines()[0]  # 100 -> ~25: marked
    assert (tmp_path / "res" / "results.html").exists()
    # run.sh's last step: `python report.py` (without the model stack) writes the same tables
    specs = [f"{tmp_path / 'a' / 'out' / 'summary_release-order.json'}:Release order", str(tmp_path / "b" / "out")]
    subprocess.run([sys.executable, "report.py", *specs, "--out", str(tmp_path / "res2" / "results")],
                   cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True)
    for ext in (".md", ".json"):
        assert (tmp_path / "res2" / f"results{ext}").read_text() == (tmp_path / "res" / f"results{ext}").read_text()


def test_default_model_is_the_newest_checkpoint_of_the_pipeline(tmp_path, monkeypatch):
    """No --model: newest checkpoint of out/tapo, else out/sft_cot, else out/base; none: exit naming run.sh."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run.sh"):
        ev.resolve_model(None)
    for ck in ("out/base/final", "out/sft_cot/step_2", "out/sft_cot/step_10"):
        (tmp_path / ck).mkdir(parents=True)
        (tmp_path / ck / "config.json").write_text("{}")
        files = {"config.json": {"bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}}
        (tmp_path / ck / "manifest.json").write_text(json.dumps({"step": -1, "files": files}))  # a complete save
    assert ev.resolve_model(None)[0] == os.path.join("out", "sft_cot", "step_10")
    assert ev.resolve_model("out/base")[0] == os.path.join("out", "base", "final")  # a run dir
    assert ev.model_label("out/sft_cot/step_10") == "sft_cot_step_10" and ev.model_label("out/tapo/final") == "tapo"
    assert ev.model_label("/ckpt/Fine-R1-3B/") == "Fine-R1-3B"
    assert ev.resolve_model("tiny") == ("tiny", "preset")


def test_eval_follows_the_generation_config(tiny, tmp_path):
    """eval.py stops on every eos of generation_config and applies its repetition penalty (the release's HF
    generate does both) unless --repetition-penalty overrides it."""
    model, proc = tiny
    tok = proc.tokenizer
    ids = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    saved = model.generation_config.eos_token_id, getattr(model.generation_config, "repetition_penalty", None)
    model.generation_config.eos_token_id, model.generation_config.repetition_penalty = ids, 1.05
    ckpt = tmp_path / "ckpt"
    try:
        model.save_pretrained(ckpt)
        proc.save_pretrained(ckpt)
    finally:
        model.generation_config.eos_token_id, model.generation_config.repetition_penalty = saved
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (56, 56)).save(data / "a.png")
    (data / "bird_seen.jsonl").write_text(json.dumps({"image_path": "a.png", "question": "What bird?",
                                                      "options": ["A", "B", "C", "D"], "ground_truth": "A"}) + "\n")
    got = []
    real = ev.rollout.generate

    def spy(model, batch, **kw):
        got.append(kw)
        return real(model, batch, **kw)
    ev.rollout.generate = spy
    try:
        ev.main(["--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o1"), "--max-new-tokens", "3",
                 "--mode", "closed"])
        ev.main(["--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o2"), "--max-new-tokens", "3",
                 "--mode", "closed", "--repetition-penalty", "1"])
    finally:
        ev.rollout.generate = real
    assert set(ids) <= set(got[0]["stop_ids"])
    assert (got[0]["repetition_penalty"], got[1]["repetition_penalty"]) == (1.05, 1.0)


def test_responder_runs_greedy_generation_with_stop_tokens(tiny):
    """make_responder: left-padded batch, greedy, stops at <|im_end|> / eos, pad id; rows mapped by prompt_index."""
    model, proc = tiny
    tok = proc.tokenizer
    got = {}

    def generate(model, batch, **kw):
        got.update(kw, batch=batch)
        B = batch["input_ids"].shape[0]
        return SimpleNamespace(prompt_index=torch.arange(B).flip(0), finish=["stop", "length"],
                               lengths=torch.tensor([3, 8]), tokens=None)
    respond = ev.make_responder(model, proc, 8, generate=generate, decode=lambda tok, ro: ["row0", "row1"])
    imgs = [Image.new("RGB", (56, 56)), Image.new("RGB", (84, 56))]
    rows = respond(imgs, ["short?", "a much longer question about this bird?"])
    assert rows == [{"output": "row1", "finish": "length", "n_tokens": 8},
                    {"output": "row0", "finish": "stop", "n_tokens": 3}]
    assert got["greedy"] and got["n"] == 1 and got["max_new_tokens"] == 8 and got["pad_id"] == tok.pad_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in got["stop_ids"]
    assert bool(got["batch"]["attention_mask"][:, -1].all())  # left padding


def test_tiny_model_end_to_end(tmp_path):
    """With rollout.py present: `eval.py --model tiny` generates, writes items and the summary."""
    pytest.importorskip("rollout")
    data = eval_files(tmp_path / "d", 2, splits=("unseen",))
    s = ev.main(["--model", "tiny", "--data", str(data), "--out", str(tmp_path / "out"), "--unseen",
                 "--max-new-tokens", "6", "--micro-batch", "4"])
    assert s["closed"]["unseen"]["avg"]["n"] == 2 and s["open"]["unseen"]["avg"]["n"] == 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(0 < r["n_tokens"] <= 6 for r in lines)


# ----------------------------------------------------------------------------------------------------------
# Sampled answers, batch invariance, the page

def sampler(images, prompts, temperature=None, seeds=None):
    """Greedy: the first option; sampled: the option its seed points at (open world: a fixed wrong label)."""
    if temperature is None:
        return first_option(images, prompts)
    return [f"<answer>{shown_options(p)[s % 4]}</answer>" if "options provided" in p else "<answer>x</answer>"
            for p, s in zip(prompts, seeds)]


def test_samples_give_avg_and_pass_at_k_resumably_and_leave_greedy_alone(tmp_path):
    """--samples K adds avg@K / pass@K (seeded, batch-independent), keeps the greedy figures, and resumes per sample."""
    data = eval_files(tmp_path / "d", 6)
    calls = []

    def counting(images, prompts, **kw):
        calls.append((len(prompts), kw.get("temperature")))
        return sampler(images, prompts, **kw)
    greedy = run_main(tmp_path / "g", data, "--mode", "closed", respond=sampler)
    s = run_main(tmp_path, data, "--mode", "closed", "--samples", "3", "--micro-batch", "4", respond=counting)
    assert sum(n for n, t in calls if t == 1.0) == 12 * 3 and sum(n for n, t in calls if t is None) == 12
    avg = s["closed"]["seen"]["avg"]
    assert avg["acc"] == greedy["closed"]["seen"]["avg"]["acc"] and {"avg@3", "pass@3"} <= set(avg["ci"])
    assert avg["avg@3"] <= avg["pass@3"] and 0 < avg["avg@3"] < 100
    assert (tmp_path / "out" / "summary_closed_samples3-t1.json").exists()
    calls.clear()
    again = run_main(tmp_path, data, "--mode", "closed", "--samples", "3", "--micro-batch", "5", respond=counting)
    assert calls == [] and again["closed"] == s["closed"]
    other = run_main(tmp_path / "b", data, "--mode", "closed", "--samples", "3", "--micro-batch", "7", respond=sampler)
    assert other["closed"] == s["closed"]  # sample seeds depend on the item, not on the batch
    run_main(tmp_path, data, "--mode", "closed", "--samples", "5", respond=counting)
    assert sum(n for n, _ in calls) == 12 * 2  # only samples 3 and 4 are new


def pixel_echo(images, prompts):
    """A fake model whose answer depends on its own image and prompt only (mean pixel, prompt length)."""
    return [f"<answer>{ImageStat.Stat(im.convert('L')).mean[0]:.0f}-{len(p)}</answer>"
            for im, p in zip(images, prompts)]


def test_records_do_not_depend_on_batch_size(tmp_path):
    """With a model that is batch-invariant, every item's record is the same at batch sizes 1, 3 and 16."""
    data = eval_files(tmp_path / "d", 7, datasets=("bird", "car"))
    for i, f in enumerate(sorted(data.glob("*.jsonl"))):  # images of several sizes: batches mix lengths
        Image.new("RGB", (56 + 28 * i, 56), (40 * i, 90, 10)).save(data / f"im{i}.png")
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        f.write_text("".join(json.dumps({**x, "image_path": f"im{i}.png"}) + "\n" for x in lines))
    outs = {}
    for bs in (1, 3, 16):
        run_main(tmp_path / str(bs), data, "--micro-batch", str(bs), respond=pixel_echo)
        recs = report.load_records(tmp_path / str(bs) / "out")
        outs[bs] = {k: (r["output"], r["correct"]) for k, r in recs.items()}
    assert len(outs[1]) == 56 and outs[1] == outs[3] == outs[16]
    assert report.agreement(tmp_path / "1" / "out", tmp_path / "16" / "out") == (56, 56, 0)
    assert len({o for o, _ in outs[1].values()}) >= 4  # the answers do differ between items


def test_tiny_model_greedy_outputs_do_not_depend_on_the_batch(tiny):
    """Greedy generation of a (perturbed, non-degenerate) tiny model gives each prompt the same text at batch
    sizes 1 and 6, with left padding from mixed image sizes and prompt lengths (fp32, CPU)."""
    pytest.importorskip("rollout")
    import copy
    model, proc = tiny
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # random init answers "\n" everywhere: nothing to compare
    respond = ev.make_responder(model, proc, 8)
    rng = random.Random(0)
    imgs = [Image.new("RGB", (rng.choice([56, 84, 112]), rng.choice([56, 84])), (rng.randrange(256), 90, 30))
            for _ in range(6)]
    prompts = [("What bird is this? " * rng.randint(1, 4)).strip() for _ in range(6)]
    one = [respond([i], [p])[0]["output"] for i, p in zip(imgs, prompts)]
    assert [r["output"] for r in respond(imgs, prompts)] == one
    assert len(set(one)) > 3


def test_run_writes_a_self_contained_report_page(tmp_path):
    """A run writes report.html next to summary.json: tables with intervals, embedded images, the responses."""
    data = eval_files(tmp_path / "d", 3)
    run_main(tmp_path, data)
    page = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page and "[" in page
    assert "Closed world, unseen classes" in page and "&lt;think&gt; hmm &lt;/think&gt;" in page


# ----------------------------------------------------------------------------------------------------------
# torchrun

WORKER = '''
import json, os, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import eval as ev
from test_eval import first_option
calls = []
def respond(images, prompts):
    calls.append(len(prompts))
    return first_option(images, prompts)
ev.main(sys.argv[1:], respond=respond)
with open(os.path.join({out!r}, "calls.rank" + os.environ["RANK"]), "w") as f:
    json.dump(calls, f)
'''


def test_two_ranks_shard_pad_and_gather(tmp_path):
    """Under torchrun (2 ranks, gloo): every item once, equal respond() counts per rank, rank 0's summary whole
    and equal to one process's."""
    data = eval_files(tmp_path / "d", 5, splits=("seen",))  # 5 prompts: 3 on rank 0, 2 (+ 1 padding) on rank 1
    out = tmp_path / "out"
    out.mkdir()
    (out / "items.jsonl").write_text("")  # a previous single-process log is read too
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out)))
    run([worker, "--model", "fake", "--data", data, "--out", out, "--micro-batch", "2", "--options-order", "release",
         "--mode", "closed"], nproc=2, timeout=240)
    calls = [json.loads((out / f"calls.rank{k}").read_text()) for k in (0, 1)]
    assert calls == [[2, 1], [2, 1]]
    keys = [json.loads(x)["key"] for k in (0, 1) for x in (out / f"items.rank{k}.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 5
    s = json.loads((out / "summary_closed_release-order.json").read_text())
    one = run_main(tmp_path / "one", data, "--micro-batch", "3", "--options-order", "release", "--mode", "closed")
    assert one["closed"] == s["closed"]
    assert s["closed"]["seen"]["bird"].pop("ci")["acc"] == [100.0, 100.0]
    assert s["closed"]["seen"]["bird"] == {"acc": 100.0, "exact": 100.0, "format": 100.0, "no_option": 0.0,
                                           "truncated": 0.0, "n": 5}


def test_missing_data_is_a_clean_error(tmp_path):
    """--data naming nothing stops with 'eval.py: bad data: PATH ...', not a traceback."""
    with pytest.raises(SystemExit, match=r"eval\.py: bad data: .*nowhere: no such eval file or folder"):
        ev.main(["--model", "fake", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                respond=lambda images, prompts: ["x"] * len(prompts))
