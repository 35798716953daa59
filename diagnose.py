"""Where the embedded world's rationales go wrong: the four parts of each answer checked against the world.

    python diagnose.py --world out/world out/eval/sft_cot                  # one evaluation (eval.py's folder)
    python diagnose.py --world out/world out/eval/base out/eval/sft_cot out/eval/tapo --mode closed
    python eval.py --model out/sft_cot/final --data out/world --mode closed --samples 8 --temperature 1.0 \
        --out out/eval_t1/sft_cot && python diagnose.py --world out/world out/eval_t1/sft_cot   # greedy vs sampled

A world rationale reads "Visual analysis: the bird has A. Candidates: X, Y, Z, W. Comparison: X has ...; ...
Prediction: N." (world.py). For every evaluated item, greedy and each sampled answer apart, this reads the
parts back and checks them against the class table of world.json:
    analysis right     the visual analysis equals the ground truth's description (every attribute, pattern too)
    colours right      the same with the pattern words left out (what the base model's captions mostly state)
    snaps to seen      of the wrong analyses, those that are exactly some SEEN class's description
    gt in candidates   the ground truth is among the candidates (given a right analysis)
    cands = options    closed world: the candidates are the prompt's options (as a set; the world's rationales copy
                       them, so a seen name in place of an unseen option shows here)
    lookup consistent  the predicted class's description equals the stated analysis (the comparison's job)
    acc | analysis     accuracy of the answers whose analysis is right
    answer = pred.     the <answer> repeats the rationale's own "Prediction" (a copy the tiny model can miss)
    pred. outside      the Prediction is none of the rationale's own Candidates (the comparison matched none of
                       them and the model named a class from memory: on unseen classes, CoT SFT's candidates are
                       mostly seen look-alikes, so this is how it reaches an unseen answer)
    acc | outside      accuracy of those answers
    wrong after right  the answers wrong although their analysis is right, by where the lookup lost the ground
                       truth: left out (its name is not in the Comparison: the model wrote another name in its
                       place), misremembered (compared with a description that is not its own), passed over
                       (compared with its own description, equal to the analysis, and another class predicted)
An answer without a visual analysis (the base model's short "<think> The bird has A. </think>") is read for its
stated attributes only ("colours right" counts it; the other columns do not). Every figure is a count over the
answers of that split and decoding, so greedy (1 per item) and sampled (K per item) rows differ in size.

`group_signal` reads TAPO's groups the same way (groups.py draws them from a checkpoint): where the reward varies.
"""
import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import report

ANALYSIS = re.compile(r"(?:Visual analysis: the|<think>\s*The) \w+ has (.*?)\.(?: Candidates|\s*</think>)")
CANDIDATES = re.compile(r"Candidates: (.*?)\. Comparison")
COMPARISON = re.compile(r"Comparison: (.*?)\. Prediction", re.S)
PREDICTION = re.compile(r"Prediction: (.*?)\. ")
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def parse_rationale(text):
    """The four parts of a world answer: {analysis, rationale (bool), candidates [], prediction, answer}."""
    a, c = ANALYSIS.search(text), CANDIDATES.search(text)
    p, ans = PREDICTION.search(text), ANSWER.search(text)
    return {"analysis": a.group(1).strip() if a else None, "rationale": "Visual analysis:" in text,
            "candidates": [x.strip() for x in c.group(1).split(",")] if c else [],
            "prediction": p.group(1).strip() if p else None, "answer": ans.group(1).strip() if ans else None}


def parse_comparison(text):
    """{candidate name: the description the Comparison recalls for it} (a name compared twice: its first)."""
    c = COMPARISON.search(text)
    out = {}
    for part in c.group(1).split("; ") if c else ():
        name, has, desc = part.partition(" has ")
        if has:
            out.setdefault(name.strip(), desc.strip())
    return out


def load_world(world_dir):
    """{class name: (description, split)} and the pattern words, from world.json."""
    path = Path(world_dir) / "world.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an embedded world (python world.py --out {world_dir})")
    meta = json.loads(path.read_text())
    classes = {c["name"]: (c["description"], c["split"]) for d in meta["domains"].values() for c in d["classes"]}
    return classes, list(meta["patterns"])


def without_pattern(text, patterns):
    """A description with its pattern words dropped ("tipped purple wings" -> "purple wings")."""
    return re.sub(r"\b(?:%s) " % "|".join(map(re.escape, patterns)), "", text)


def anatomy(records, classes, patterns):
    """Counts per (split, decoding): decoding is "greedy" or "sampled@T" (eval.py --samples K --temperature T)."""
    by_desc = {desc: split for desc, split in classes.values()}
    out = defaultdict(lambda: defaultdict(int))
    for r in records:
        if r["ground_truth"] not in classes:
            raise ValueError(f"{r.get('key')}: ground truth {r['ground_truth']!r} is not a class of this world")
        kind = f"sampled@{r['temperature']:g}" if "sample" in r else "greedy"
        c = out[(r["split"], kind)]
        gt_desc = classes[r["ground_truth"]][0]
        p = parse_rationale(r["output"])
        c["answers"] += 1
        c["correct"] += bool(r["correct"])
        if p["analysis"] is not None:
            c["stated"] += 1
            c["colours_right"] += without_pattern(p["analysis"], patterns) == without_pattern(gt_desc, patterns)
        if not p["rationale"]:
            continue
        c["rationales"] += 1
        right = p["analysis"] == gt_desc
        c["analysis_right"] += right
        if not right and by_desc.get(p["analysis"]) == "seen":
            c["wrong_snaps_seen"] += 1
        if right:
            c["gt_in_candidates|right"] += r["ground_truth"] in p["candidates"]
            c["correct|right"] += bool(r["correct"])
            if not r["correct"]:
                recalled = parse_comparison(r["output"]).get(r["ground_truth"])
                c["wrong|right"] += 1
                c["left_out" if recalled is None else "passed_over" if recalled == gt_desc else "misremembered"] += 1
        pred = classes.get(p["prediction"])
        c["lookup_consistent"] += pred is not None and pred[0] == p["analysis"]
        c["answer_is_prediction"] += p["prediction"] is not None and p["prediction"] == p["answer"]
        if p["candidates"] and p["prediction"] is not None:
            c["with_candidates"] += 1
            if p["prediction"] not in p["candidates"]:
                c["prediction_outside"] += 1
                c["correct|outside"] += bool(r["correct"])
        if r.get("options"):
            c["with_options"] += 1
            c["candidates_are_options"] += set(p["candidates"]) == set(r["options"])
    return out


def group_signal(groups, classes):
    """Counts over TAPO groups [(ground truth, [(rollout text, accuracy)])]: which part of the rationale the reward
    varies with. A group is "mixed" when some rollouts are right and some wrong (it survives dynamic sampling)."""
    c = defaultdict(int)
    for gt, rollouts in groups:
        if gt not in classes:
            raise ValueError(f"ground truth {gt!r} is not a class of this world")
        desc = classes[gt][0]
        analyses = [parse_rationale(text)["analysis"] for text, _ in rollouts]
        right = [a == desc for a in analyses]
        acc = [a >= 0.5 for _, a in rollouts]
        mixed = 0 < sum(acc) < len(acc)
        c["groups"] += 1
        c["mixed"] += mixed
        c["same_analysis"] += len(set(analyses)) == 1
        c["mixed_perception"] += mixed and 0 < sum(right) < len(right)
        c["rollouts"] += len(rollouts)
        c["analysis_right"] += sum(right)
        c["correct|right"] += sum(a for a, r in zip(acc, right) if r)
        c["correct|wrong"] += sum(a for a, r in zip(acc, right) if not r)
    return c


GROUP_HEADER = ["| checkpoint | groups | mixed (survive) | one analysis in the whole group | mixed groups that split on "
                "a right analysis | analysis right (rollouts) | acc given a right analysis | acc given a wrong analysis |",
                "|---" * 8 + "|"]


def group_row(name, c):
    wrong = c["rollouts"] - c["analysis_right"]
    return (f"| {name} | {c['groups']} | {frac(c['mixed'], c['groups'])} | {frac(c['same_analysis'], c['groups'])} | "
            f"{frac(c['mixed_perception'], c['mixed'])} | {frac(c['analysis_right'], c['rollouts'])} | "
            f"{frac(c['correct|right'], c['analysis_right'])} | {frac(c['correct|wrong'], wrong)} |")


def frac(a, b):
    return f"{a}/{b} ({100.0 * a / b:.1f}%)" if b else "-"


def table(name, counts):
    """Markdown rows, one per (split, decoding)."""
    rows = []
    for (split, kind), c in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1] != "greedy", kv[0][1])):
        wrong = c["rationales"] - c["analysis_right"]
        cells = [frac(c["correct"], c["answers"]), frac(c["colours_right"], c["stated"]),
                 frac(c["analysis_right"], c["rationales"]), frac(c["wrong_snaps_seen"], wrong),
                 frac(c["gt_in_candidates|right"], c["analysis_right"]),
                 frac(c["candidates_are_options"], c["with_options"]), frac(c["lookup_consistent"], c["rationales"]),
                 frac(c["correct|right"], c["analysis_right"]), frac(c["answer_is_prediction"], c["rationales"]),
                 frac(c["prediction_outside"], c["with_candidates"]),
                 frac(c["correct|outside"], c["prediction_outside"]),
                 f"{c['wrong|right']}: {c['left_out']} / {c['misremembered']} / {c['passed_over']}"]
        rows.append(f"| {name} | {split} | {kind} | " + " | ".join(cells) + " |")
    return rows


HEADER = ["| eval | split | decoding | correct | colours right (of stated) | analysis right (of rationales) | "
          "wrong analyses that are a seen class | gt in candidates given a right analysis | candidates = options | "
          "lookup consistent | acc given a right analysis | answer = prediction | prediction outside the candidates | "
          "acc given outside | wrong after a right analysis: gt left out / misremembered / passed over |",
          "|---" * 15 + "|"]


def read_items(folder, mode):
    """eval.py's records of one evaluation folder (report.load_records: every items*.jsonl, one record per key,
    a torn line skipped as eval.py's resume does), optionally one mode only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (give eval.py's --out folder)")
    recs = [r for r in report.load_records(folder).values() if mode in ("both", r.get("mode"))]
    if not recs:
        raise FileNotFoundError(f"{folder}: no {'' if mode == 'both' else mode + '-world '}answers in items*.jsonl "
                                "(an eval.py --out folder)")
    return recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", help="eval.py --out folders of this world's models")
    ap.add_argument("--world", required=True, help="the world folder the evaluations ran on (holds world.json)")
    ap.add_argument("--mode", choices=["closed", "open", "both"], default="closed",
                    help="which prompts' answers to read (default closed: the options fix the candidates' reference)")
    args = ap.parse_args(argv)
    try:
        classes, patterns = load_world(args.world)
        lines = list(HEADER)
        for e in args.evals:
            lines += table(Path(e).name, anatomy(read_items(e, args.mode), classes, patterns))
    except (OSError, ValueError) as e:
        ap.exit(2, f"diagnose.py: error: {e}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
