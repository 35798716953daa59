"""An intervention on the embedded world's rationales: does the candidate step decide the answer?

    python intervene.py out/eval/sft_cot                      # the model that wrote the evaluation (its run.json)
    python intervene.py out/eval/tapo --model out/tapo/final --out out/eval/tapo_forced.jsonl

Every greedy closed-world answer of an eval.py folder that writes a rationale is cut where its "Candidates:" begin
(the model's own visual analysis is kept, word for word), the candidates are replaced by the prompt's options as
listed (so the ground truth is always among them), and the same model continues greedily from there. If the answer
depended on the candidates, an unseen class missing from them would be the cause of a wrong answer, and forcing
it in would fix it. Printed per split: answers, accuracy of the model's own answers, accuracy with forced
candidates, and how many Predictions the forcing changed (README "Results", stop 25: under 3% of the unseen
answers, on 7 seeds). This is a diagnostic, not an evaluation: the scores the README reports are eval.py's.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

import diagnose
from data import encode_prompts, stack_prompts
from eval import closed_correct, weights_fingerprint
from policy import load_policy, stop_token_ids
from rollout import decode, generate


def forced_prefix(output, options):
    """The answer's own text up to its candidates, then the options as the candidates; None without candidates."""
    i = output.find("Candidates:")
    return None if i < 0 else output[:i] + "Candidates: " + ", ".join(options) + "."


def eligible(records):
    """Greedy closed-world records (one per item) whose answer has candidates to replace, in key order."""
    return sorted((r for r in records if r.get("mode") == "closed" and "sample" not in r and r.get("options")
                   and forced_prefix(r["output"], r["options"]) is not None), key=lambda r: r["key"])


@torch.no_grad()
def force_candidates(model, processor, records, batch_size=32, max_new_tokens=256, progress=False):
    """-> one row per record: key, split, forced text, own / forced Prediction, own / forced correctness."""
    tok = processor.tokenizer
    stop = stop_token_ids(model, tok)
    rows = []
    for i in tqdm(range(0, len(records), batch_size), desc="intervene", disable=not progress):
        chunk, prompts = records[i:i + batch_size], []
        for r in chunk:
            with Image.open(r["image"]) as im:  # eval.py records the resolved image path
                enc = encode_prompts(processor, [im.convert("RGB")], [r["prompt"]], None)
            ids = torch.tensor([tok(forced_prefix(r["output"], r["options"]), add_special_tokens=False)["input_ids"]])
            enc["input_ids"] = torch.cat([enc["input_ids"], ids], 1)  # the prefix continues the assistant turn
            enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(ids)], 1)
            enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(ids)], 1)
            prompts.append(enc)
        ro = generate(model, stack_prompts(prompts, tok.pad_token_id), max_new_tokens=max_new_tokens, greedy=True,
                      stop_ids=stop, pad_id=tok.pad_token_id)
        for r, text in zip(chunk, decode(tok, ro)):
            forced = forced_prefix(r["output"], r["options"]) + text
            rows.append({"key": r["key"], "split": r["split"], "ground_truth": r["ground_truth"], "forced": forced,
                         "prediction_own": diagnose.parse_rationale(r["output"])["prediction"],
                         "prediction_forced": diagnose.parse_rationale(forced)["prediction"],
                         "correct_own": bool(r["correct"]), "correct_forced": closed_correct(forced, r["ground_truth"])})
    return rows


def summary(rows):
    """Markdown table per split: answers, own and forced accuracy (%), Predictions changed by the forcing."""
    lines = ["| split | answers | accuracy, own candidates | accuracy, candidates = options | predictions changed |",
             "|---|---|---|---|---|"]
    for split in sorted({r["split"] for r in rows}):
        rs = [r for r in rows if r["split"] == split]
        pct = lambda k: 100.0 * sum(r[k] for r in rs) / len(rs)
        changed = sum(r["prediction_own"] != r["prediction_forced"] for r in rs)
        lines.append(f"| {split} | {len(rs)} | {pct('correct_own'):.1f} | {pct('correct_forced'):.1f} | {changed} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval", help="an eval.py --out folder of a world model (its greedy closed-world answers)")
    ap.add_argument("--model", help="the checkpoint that wrote it (default: the model its run.json names; a "
                    "checkpoint whose weights differ from the run's is an error)")
    ap.add_argument("--out", help="write one JSON line per answer here (forced text, predictions, correctness)")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="cap on the continuation (default 256, "
                    "eval.py's world cap)")
    args = ap.parse_args(argv)
    try:
        run = json.loads((Path(args.eval) / "run.json").read_text())
        if not {"model", "weights"} <= set(run):
            raise ValueError(f"{Path(args.eval) / 'run.json'}: no model / weights recorded (not an eval.py folder?)")
        model_path = args.model or run["model"]
        if weights_fingerprint(model_path) != run["weights"]:
            raise ValueError(f"{model_path}: not the weights that wrote {args.eval} ({run['model']}, fingerprint "
                             f"{run['weights']}); pass the checkpoint the evaluation ran")
        records = eligible(diagnose.read_items(args.eval, "closed"))
        if not records:
            raise ValueError(f"{args.eval}: no greedy closed-world answer with Candidates to replace")
        model, processor = load_policy(model_path)
        model.eval()
        rows = force_candidates(model, processor, records, args.batch_size, args.max_new_tokens, progress=True)
    except (OSError, ValueError) as e:
        ap.exit(2, f"intervene.py: error: {e}\n")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(summary(rows))


if __name__ == "__main__":
    sys.exit(main())
