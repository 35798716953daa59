"""What a person reads after a run: summaries with 95% intervals, side-by-side tables, report.html, curves.png.

Used by eval.py (summary.json, the printed tables, report.html, `--table`) and by sft.py / tapo.py (curves.png at
each checkpoint). Imports nothing of the project, so any stage can call it.

    summarise(records)            -> summary dict; every rate carries "ci": {metric: [lo, hi]}
    agreement(dir_a, dir_b)       -> (prompts, identical outputs, changed verdicts) of two evaluations
    tables_text({tag: summary})   -> the markdown tables (run.sh's out/results.md)
    compare(["DIR:TAG", ...])     -> prints the tables with paired-bootstrap marks, writes PATH.md/.json/.html
    write_html(path, runs)        -> one self-contained page: summary, confusions, items (side by side)
    plot_curves(run_dir)          -> run_dir/curves.png from run_dir/metrics.jsonl (pillow only)
    python report.py DIR[:TAG] ... [--out PATH]: compare() from the shell, eval.py --table without loading the
                                    model stack (2.1 s instead of 5.1; run.sh's last step)

Intervals (the release's protocol, README "Release facts", gives point estimates only; these are ours):
1. 95% percentile bootstrap over items, N_BOOT resamples, seeded by (seed, mode, split, dataset) so that a
   summary is reproducible and two models evaluated on the same items draw the same resamples. Items are
   resampled within each dataset; a split average (mean over datasets) and the overall figure (mean of seen and
   unseen averages) average the per-dataset resampled means, so their intervals follow the paper's averaging.
2. Table marks: a cell gets "*" when the 95% paired-bootstrap interval of (this row - the row above), over the
   items both runs evaluated, excludes 0. The per-item verdicts are read from the runs' items*.jsonl as stored
   at generation. note: eval.py re-scores stored outputs for its summary but does not rewrite items*.jsonl, so
   after a change of scoring rules the marks use the old verdicts until the items are regenerated.
3. avg@K = mean accuracy over K sampled answers per item; pass@K = share of items with at least one correct
   answer among its K (exactly K samples, so the plain rate is the unbiased estimator).
"""
import argparse
import base64
import html
import io
import json
import math
import random
import zlib
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

MODES = ("closed", "open")
SPLITS = ("seen", "unseen")
DATASET_ORDER = ("aircraft", "bird", "car", "dog", "flower", "pet")  # release eval scripts' order
METRICS = {"closed": ("acc", "exact", "format", "no_option", "truncated"),
           "open": ("ti", "exact", "ss_rel", "format", "truncated")}
N_BOOT = 1000


# ----------------------------------------------------------------------------------------------------------
# Records on disk (eval.py's items*.jsonl)

def load_records(folder):
    """{key: record} from every items*.jsonl in folder (any world size); a torn last line is skipped."""
    done = {}
    for p in sorted(Path(folder).glob("items*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line an interrupted run was writing
            if isinstance(rec, dict) and "key" in rec and "output" in rec:
                done[rec["key"]] = rec
    return done


def agreement(folder_a, folder_b):
    """(prompts both folders answered, identical outputs, changed verdicts): batch invariance between two
    evaluations of one model, e.g. --batch-size 1 vs 32 or 1 process vs torchrun (README: measured rates)."""
    a, b = load_records(folder_a), load_records(folder_b)
    common = [k for k in a if k in b]
    return (len(common), sum(a[k]["output"] == b[k]["output"] for k in common),
            sum(a[k]["correct"] != b[k]["correct"] for k in common))


def item_key(r):
    """The item an answer belongs to within its mode: file:line. Greedy and sampled answers share it, and so
    do two runs that showed the options in different orders (paired comparisons)."""
    return r["source"]


def item_value(r, metric):
    """One record's value of a metric (0/1, or ss_rel in [0, 1]); None when unavailable."""
    if metric in ("acc", "ti"):
        return float(r["correct"])
    if metric == "truncated":
        return float(r.get("finish") == "length")
    v = r.get(metric)
    return None if v is None else float(v)


# ----------------------------------------------------------------------------------------------------------
# Bootstrap

def boot_means(vals, seed_str, n_boot=N_BOOT):
    """(n_boot, C) column means of vals (n, C) over n items drawn with replacement; the resamples depend only on
    (seed_str, n), so two models' columns stacked side by side are resampled together (paired)."""
    g = torch.Generator().manual_seed(zlib.crc32(seed_str.encode()))
    idx = torch.randint(len(vals), (n_boot, len(vals)), generator=g)
    return vals[idx].mean(1)


def interval(boot):
    """95% percentile interval of a (n_boot,) tensor of resampled estimates, in %."""
    lo, hi = torch.quantile(boot.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [round(100 * lo, 2), round(100 * hi, 2)]


def _group_rows(records, mode, k):
    """{(split, dataset): {item_key: {metric: value}}} of one mode: greedy metrics and, with samples, avg@k /
    pass@k of the item's sampled answers (closed: acc, open: ti)."""
    rows = {}
    sampled = {}
    for r in records:
        if r["mode"] != mode:
            continue
        if r.get("sample") is None:
            group, key = rows.setdefault((r["split"], r["dataset"]), {}), item_key(r)
            while key in group:  # the same item twice (hand-made records): count both, never drop one
                key += "'"
            group[key] = {m: item_value(r, m) for m in METRICS[mode]}
        else:
            sampled.setdefault((r["split"], r["dataset"], item_key(r)), []).append(float(r["correct"]))
    for (split, ds, key), vs in sampled.items():
        row = rows.setdefault((split, ds), {}).setdefault(key, {})
        row[f"avg@{k}"], row[f"pass@{k}"] = sum(vs) / len(vs), float(max(vs))
    return rows


def dataset_key(name):
    return (DATASET_ORDER.index(name) if name in DATASET_ORDER else len(DATASET_ORDER), name)


def summarise(records, model=None, tag=None, settings=None, seed=0, n_boot=N_BOOT):
    """{"model", "tag", "settings", mode: {split: {dataset: metrics, "avg": metrics}, "overall": metrics|None}}.

    metrics = {metric: %, "n": items, "ci": {metric: [lo, hi]}}; avg = mean over the split's datasets; overall =
    mean of the seen and unseen avgs (None unless both). Rates of greedy answers; avg@K / pass@K of the K
    sampled ones (records with "sample")."""
    out = {"model": model, "tag": tag, "settings": settings or {}}
    ks = {r.get("sample") for r in records if r.get("sample") is not None}
    k = max(ks) + 1 if ks else 0
    for mode in MODES:
        rows = _group_rows(records, mode, k)
        if not rows:
            continue
        names = list(METRICS[mode]) + ([f"avg@{k}", f"pass@{k}"] if k else [])
        res, boots = {}, {}
        for split in SPLITS:
            per = {}
            for ds in sorted((d for s, d in rows if s == split), key=dataset_key):
                items = [rows[(split, ds)][key] for key in sorted(rows[(split, ds)])]
                have = [m for m in names if all(it.get(m) is not None for it in items)]
                vals = torch.tensor([[it[m] for m in have] for it in items], dtype=torch.float64)  # (n, C)
                b = boot_means(vals, f"{seed}/{mode}/{split}/{ds}", n_boot)  # (n_boot, C)
                boots[(split, ds)] = {m: b[:, j] for j, m in enumerate(have)}
                per[ds] = _metrics({m: vals[:, j].mean() for j, m in enumerate(have)}, boots[(split, ds)], names,
                                   len(items))
            if per:
                dss = list(per)
                boots[(split, "avg")] = _mean_boots([boots[(split, d)] for d in dss])
                per["avg"] = _metrics({m: sum(per[d][m] for d in dss) / 100 / len(dss) for m in boots[(split, "avg")]},
                                      boots[(split, "avg")], names, sum(per[d]["n"] for d in dss))
                res[split] = per
        if all(s in res for s in SPLITS):
            b = _mean_boots([boots[(s, "avg")] for s in SPLITS])
            res["overall"] = _metrics({m: sum(res[s]["avg"][m] for s in SPLITS) / 200 for m in b}, b, names,
                                      sum(res[s]["avg"]["n"] for s in SPLITS))
        else:
            res["overall"] = None
        out[mode] = res
    return out


def _mean_boots(groups):
    """Mean over groups of their resampled estimates, for the metrics every group has."""
    common = [m for m in groups[0] if all(m in g for g in groups)]
    return {m: sum(g[m] for g in groups) / len(groups) for m in common}


def _metrics(points, boots, names, n):
    """{metric: % (None when unavailable), "n": n, "ci": {metric: [lo, hi]}} in the order of names."""
    m = {name: (round(100 * float(points[name]), 4) if name in points else None) for name in names}
    m["n"] = n
    m["ci"] = {name: interval(boots[name]) for name in names if name in boots}
    return m


def paired_diff(rows_a, rows_b, metric, split, ds, seed=0, n_boot=N_BOOT):
    """95% interval (in points) of b - a for a table cell (split, dataset | "avg" | split "overall"), by a paired
    bootstrap over the items both evaluated; rows_* are _group_rows outputs. None when no common items."""
    splits = SPLITS if split == "overall" else (split,)
    per_split = []
    for sp in splits:
        groups = [d for s, d in rows_a if s == sp and (s, d) in rows_b and (ds in ("avg", None) or d == ds)]
        diffs = []
        for d in sorted(groups, key=dataset_key):
            a, b = rows_a[(sp, d)], rows_b[(sp, d)]
            common = [key for key in sorted(a) if key in b and a[key].get(metric) is not None
                      and b[key].get(metric) is not None]
            if common:
                vals = torch.tensor([[a[key][metric], b[key][metric]] for key in common], dtype=torch.float64)
                bm = boot_means(vals, f"{seed}/paired/{sp}/{d}", n_boot)
                diffs.append(bm[:, 1] - bm[:, 0])
        if not diffs:
            return None
        per_split.append(sum(diffs) / len(diffs))
    return interval(sum(per_split) / len(per_split))


# ----------------------------------------------------------------------------------------------------------
# Tables

TABLES = (("closed", "acc", "Closed-world accuracy (%, release inclusion rule)"),
          ("closed", "exact", "Closed-world exact answer (%)"),
          ("open", "ss_rel", "Open-world SS_rel (%)"),
          ("open", "ti", "Open-world text inclusion (%, release rule)"),
          ("closed", "avg@", "Closed-world accuracy of sampled answers, avg@K (%)"),
          ("closed", "pass@", "Closed-world pass@K (%)"),
          ("open", "avg@", "Open-world text inclusion of sampled answers, avg@K (%)"))


def _cell(s, mode, split, ds, metric):
    block = (s.get(mode) or {}).get(split) or {}
    m = block if split == "overall" else block.get(ds) or {}
    return m.get(metric), (m.get("ci") or {}).get(metric)


def table_columns(summaries, mode, metric):
    """[(header, split, dataset)]: per-dataset seen / unseen, Seen avg, Unseen avg, Overall (paper Table 1/2)."""
    datasets = sorted({d for s in summaries.values() for split in SPLITS
                       for d in ((s.get(mode) or {}).get(split) or {}) if d != "avg"}, key=dataset_key)
    cols = [(f"{d} {split}", split, d) for d in datasets for split in SPLITS
            if any(_cell(s, mode, split, d, metric)[0] is not None for s in summaries.values())]
    return cols + [("Seen avg", "seen", "avg"), ("Unseen avg", "unseen", "avg"), ("Overall", "overall", None)]


def markdown_table(summaries, mode="closed", metric="acc", marks=None):
    """One row per tag: "value [lo, hi]" per column; marks {(tag, header)} get "*" (row above differs)."""
    cols = table_columns(summaries, mode, metric)
    lines = ["| Method | " + " | ".join(c for c, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for tag, s in summaries.items():
        cells = []
        for head, split, ds in cols:
            v, ci = _cell(s, mode, split, ds, metric)
            star = "*" if marks and (tag, head) in marks else ""
            cells.append("-" if v is None else f"{v:.2f}{star}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""))
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sample_metric(summaries, prefix):
    """"avg@8" for prefix "avg@" when some summary has sampled answers, else None."""
    for s in summaries.values():
        for mode in MODES:
            avg = ((s.get(mode) or {}).get("seen") or (s.get(mode) or {}).get("unseen") or {}).get("avg") or {}
            for k in avg:
                if k.startswith(prefix):
                    return k
    return None


def table_specs(summaries):
    """[(mode, metric, title)] of the tables these summaries fill."""
    specs = []
    for mode, metric, title in TABLES:
        if metric.endswith("@"):
            metric = _sample_metric(summaries, metric)
            if metric is None:
                continue
            title = title.replace("K", metric.split("@")[1])
        if any(s.get(mode) for s in summaries.values()):
            specs.append((mode, metric, title))
    return specs


def tables_text(summaries, marks=None):
    """The tables for {tag: summary}, one markdown table each; ss_rel said unavailable when no row has it."""
    parts = []
    for mode, metric, title in table_specs(summaries):
        rows = [s[mode] for s in summaries.values() if s.get(mode)]
        if metric == "ss_rel" and all(r[sp]["avg"]["ss_rel"] is None for r in rows for sp in SPLITS if sp in r):
            parts.append(f"{title}: unavailable (no --siglip)")
        else:
            parts.append(f"{title}\n{markdown_table(summaries, mode, metric, (marks or {}).get((mode, metric)))}")
    if marks:
        parts.append("[lo, hi]: 95% bootstrap interval over items. *: differs from the row above beyond noise "
                     "(95% paired-bootstrap interval of the difference over the same items excludes 0; each cell "
                     "is tested on its own, so about 1 cell in 20 can be marked by chance).")
    return "\n\n".join(parts)


def print_tables(summary, tag):
    print("\n" + tables_text({tag: summary}) + "\n")
    for mode in MODES:  # one greppable line per mode and split
        for split in SPLITS + ("overall",):
            m = (summary.get(mode) or {}).get(split)
            m = m["avg"] if split != "overall" and m else m
            if m:
                print(f"eval {mode} {split} | " + " | ".join(
                    f"{k} {'-' if v is None else round(v, 2)}" + (f" [{m['ci'][k][0]:.1f}, {m['ci'][k][1]:.1f}]"
                                                                  if k in m["ci"] else "")
                    for k, v in m.items() if k != "ci"))


def table_marks(summaries, rows):
    """{(mode, metric): {(tag, header)}}: cells whose paired difference to the row above excludes 0."""
    marks = {}
    tags = list(summaries)
    for mode, metric, _ in table_specs(summaries):
        cols = table_columns(summaries, mode, metric)
        for prev, tag in zip(tags, tags[1:]):
            a, b = rows.get(prev, {}).get(mode), rows.get(tag, {}).get(mode)
            if not a or not b:
                continue
            for head, split, ds in cols:
                ci = paired_diff(a, b, metric, split, ds)
                if ci is not None and (ci[0] > 0 or ci[1] < 0):
                    marks.setdefault((mode, metric), set()).add((tag, head))
    return marks


def compare(specs, out=None):
    """Side-by-side tables of finished evaluations (run.sh's final table), specs "DIR[:TAG]" (DIR/summary.json)
    or "FILE.json[:TAG]", with paired-bootstrap marks from DIR/items*.jsonl; refreshes each model's run
    curves.png; with `out`, also writes out.md (the tables), out.json ({tag: summary}) and out.html."""
    summaries, records = {}, {}
    for spec in specs:
        path, _, tag = spec.partition(":")
        f = Path(path) if path.endswith(".json") else Path(path) / "summary.json"
        if not f.exists():
            print(f"table: {f} does not exist, row skipped")
            continue
        s = json.loads(f.read_text())
        tag = tag or s.get("tag") or f.parent.name
        summaries[tag] = s
        records[tag] = list(load_records(f.parent).values())
    ks = {t: max([r["sample"] + 1 for r in rs if r.get("sample") is not None] or [0]) for t, rs in records.items()}
    rows = {t: {m: _group_rows(rs, m, ks[t]) for m in MODES} for t, rs in records.items()}
    text = tables_text(summaries, table_marks(summaries, rows))
    print(text)
    curves = {}
    for tag, s in summaries.items():  # the training run a checkpoint came from: out/tapo/final -> out/tapo
        run = Path(str((s.get("settings") or {}).get("model") or s.get("model") or "")).parent
        png = plot_curves(run) if (run / "metrics.jsonl").exists() else None
        if png and png not in curves.values():  # two evaluations of one run: its curves once
            curves[tag] = png
            print(f"curves: {png}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).with_suffix(".md").write_text(text + "\n")
        Path(out).with_suffix(".json").write_text(json.dumps(summaries, indent=1) + "\n")
        write_html(Path(out).with_suffix(".html"), {t: (summaries[t], records[t]) for t in summaries},
                   text, curves)
        print(f"report: {Path(out).with_suffix('.html')}")
    return summaries


# ----------------------------------------------------------------------------------------------------------
# report.html

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;max-width:1800px}
h1{font-size:20px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.items td{max-width:520px}.ok{background:#e3f4e3}.bad{background:#fbe4e4}
.verdict{font-weight:600}.ok .verdict{color:#17631b}.bad .verdict{color:#9b1c1c}
.think{white-space:pre-wrap;color:#555;background:#f7f7f2;border-left:3px solid #c9c38f;padding:3px 6px;
margin:3px 0;font-size:13px}.answer{white-space:pre-wrap;font-weight:600}.rest{white-space:pre-wrap;color:#777}
.q{font-size:13px}.opts{font-size:13px;color:#444}img.item{width:160px;height:auto;image-rendering:auto}
.note{color:#666;font-size:12px}.resp{max-height:18em;overflow-y:auto}
"""


def _esc(s):
    return html.escape(str(s), quote=True)


def image_data_uri(path, size=224):
    """The image as a data: URI (downscaled to <= size px, PNG), or None if it cannot be read."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def response_html(output):
    """The response with its <think> part set apart and its <answer> in bold; the raw text otherwise."""
    text = output or ""
    parts = []
    s, e = text.find("<think>"), text.find("</think>")
    if s != -1 and e > s:
        parts.append(f'<div class="rest">{_esc(text[:s].strip())}</div>' if text[:s].strip() else "")
        parts.append(f'<div class="think">&lt;think&gt; {_esc(text[s + 7:e].strip())} &lt;/think&gt;</div>')
        text = text[e + 8:]
    a, b = text.find("<answer>"), text.rfind("</answer>")
    if a != -1 and b > a:
        parts.append(f'<div class="rest">{_esc(text[:a].strip())}</div>' if text[:a].strip() else "")
        parts.append(f'<div class="answer">&lt;answer&gt; {_esc(text[a + 8:b].strip())} &lt;/answer&gt;</div>')
        text = text[b + 9:]
    if text.strip():
        parts.append(f'<div class="rest">{_esc(text.strip())}</div>')
    return "".join(parts) or '<div class="rest">(empty)</div>'


def predicted(r):
    """What the model picked, for confusions: the one option its answer names (closed), else its answer text."""
    ans = r.get("answer")
    if not ans:
        return "(no answer)"
    norm = lambda x: str(x).lower().replace("_", " ")  # noqa: E731  (the release's normalisation)
    named = [o for o in r.get("options") or [] if norm(o) in norm(ans)]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        return f"({len(named)} options)"
    return ans if len(ans) <= 40 else ans[:37] + "..."


def confusions(records, top=10):
    """[(ground truth, predicted, count)] of the wrong greedy answers that name something, most frequent first
    (answers without an <answer> are counted by the page apart: they confuse nothing with anything)."""
    counts = {}
    for r in records:
        if r.get("sample") is None and not r["correct"] and r.get("answer"):
            pair = (r["ground_truth"], predicted(r))
            counts[pair] = counts.get(pair, 0) + 1
    return [(g, p, c) for (g, p), c in sorted(counts.items(), key=lambda x: (-x[1], x[0]))][:top]


def _md_to_html(table_md):
    """A markdown table (as tables_text writes it) as an HTML table."""
    lines = [ln for ln in table_md.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{_esc(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + f"<td>{_esc(row[0])}</td>" + "".join(f'<td class="num">{_esc(c)}</td>' for c in row[1:])
                   + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _tables_html(text):
    parts = []
    for block in text.split("\n\n"):
        title, _, rest = block.partition("\n")
        parts.append(f"<h3>{_esc(title)}</h3>" + (_md_to_html(rest) if rest.startswith("|") else "")
                     if rest else f'<p class="note">{_esc(title)}</p>')
    return "".join(parts)


def write_html(path, runs, tables=None, curves=None, n_items=8, seed=0):
    """One self-contained page for runs {tag: (summary, records)}: the tables, curves, and per mode and split
    the most frequent confusions of each run and a seeded sample of items answered by every run, side by side."""
    tags = list(runs)
    tables = tables if tables is not None else tables_text({t: s for t, (s, _) in runs.items()})
    title = "Evaluation: " + ", ".join(tags)
    body = [f"<h1>{_esc(title)}</h1>"]
    model = {t: (s.get("settings") or {}).get("model") or s.get("model") for t, (s, _) in runs.items()}
    body.append("<p class='note'>" + "<br>".join(f"{_esc(t)}: {_esc(m)}" for t, m in model.items()) + "</p>")
    body.append("<h2>Summary</h2>" + _tables_html(tables))
    for tag, png in (curves or {}).items():
        uri = image_data_uri(png, size=2000)
        if uri:
            body.append(f"<h3>Training curves: {_esc(tag)}</h3><img src='{uri}' alt='curves of {_esc(tag)}'>")
    for mode in MODES:
        for split in SPLITS:
            recs = {t: [r for r in rs if r["mode"] == mode and r["split"] == split and r.get("sample") is None]
                    for t, (_, rs) in runs.items()}
            if not any(recs.values()):
                continue
            name = "Closed world" if mode == "closed" else "Open world"
            body.append(f"<h2>{name}, {split} classes</h2>")
            row = "".join(f"<td>{_split_summary(runs[t][0], mode, split)}</td>" for t in tags)
            body.append("<table><tr>" + "".join(f"<th>{_esc(t)}</th>" for t in tags) + f"</tr><tr>{row}</tr>")
            conf = "".join(f"<td>{_confusions_html(recs[t])}</td>" for t in tags)
            body.append(f"<tr>{conf}</tr></table>")
            body.append(_items_html(recs, tags, n_items, f"{seed}/{mode}/{split}"))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(page, encoding="utf-8")
    return path


def _confusions_html(recs):
    pairs = confusions(recs)
    wrong = sum(not r["correct"] for r in recs)
    silent = sum(not r["correct"] and not r.get("answer") for r in recs)
    head = f"<div class='note'>{wrong} of {len(recs)} wrong, {silent} of them without an answer</div>"
    if not pairs:
        return head
    return (head + "<table><tr><th>ground truth</th><th>predicted</th><th>n</th></tr>"
            + "".join(f"<tr><td>{_esc(g)}</td><td>{_esc(p)}</td><td class='num'>{c}</td></tr>" for g, p, c in pairs)
            + "</table>")


def _split_summary(summary, mode, split):
    m = ((summary.get(mode) or {}).get(split) or {}).get("avg")
    if not m:
        return "-"
    ci = m.get("ci") or {}  # summaries written before intervals have none
    return "<br>".join(f"{_esc(k)} <b>{v:.1f}</b>" + (f" [{ci[k][0]:.1f}, {ci[k][1]:.1f}]" if k in ci else "")
                       for k, v in m.items() if k not in ("n", "ci") and v is not None) + f"<br>n {m['n']}"


def _items_html(recs, tags, n, seed_str):
    """A seeded sample of n items every run answered: image, question, options, then each run's response. With
    several runs, up to half of the sample are items on which their verdicts differ (what a reader compares)."""
    by_tag = {t: {item_key(r): r for r in recs[t]} for t in tags}
    common = sorted(set.intersection(*(set(v) for v in by_tag.values())))
    differ = [k for k in common if len({bool(by_tag[t][k]["correct"]) for t in tags}) > 1]
    rng = random.Random(seed_str)
    keys = rng.sample(differ, min(n // 2, len(differ)))
    rest = [k for k in common if k not in set(keys)]
    keys = sorted(keys + rng.sample(rest, min(n - len(keys), len(rest))))
    rows = []
    for key in keys:
        r0 = by_tag[tags[0]][key]
        uri = image_data_uri(r0["image"])
        img = (f"<img class='item' src='{uri}' alt='{_esc(r0['image'])}'>" if uri
               else f"(image {_esc(r0['image'])} unreadable)")
        opts = f"<div class='opts'>options: {_esc(', '.join(r0['options']))}</div>" if r0.get("options") else ""
        cells = [f"<td>{img}<div class='q'>{_esc(r0['question'])}</div>{opts}<div>truth: <b>{_esc(r0['ground_truth'])}"
                 f"</b></div><div class='note'>{_esc(r0['source'])}</div></td>"]
        for t in tags:
            r = by_tag[t][key]
            ok = bool(r["correct"])
            cells.append(f"<td class='{'ok' if ok else 'bad'}'><div class='verdict'>{'correct' if ok else 'wrong'}"
                         f"</div><div class='note'>picked: {_esc(predicted(r))}</div>"
                         f"<div class='resp'>{response_html(r['output'])}</div></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<tr><th>item</th>" + "".join(f"<th>{_esc(t)}</th>" for t in tags) + "</tr>"
    why = (f"; {len(differ)} where the runs' verdicts differ, up to half of the sample from those"
           if len(tags) > 1 else "")
    return (f"<h3>{len(keys)} items (seeded sample of {len(common)}{why})</h3><table class='items'>{head}"
            + "".join(rows) + "</table>")


# ----------------------------------------------------------------------------------------------------------
# Training curves (pillow only)

CURVES = {"tapo": ("reward", "acc", "survived_frac", "kl_neg", "entropy", "loss"),
          "sft": ("loss", "lr", "grad_norm")}
UPDATE_ONLY = ("kl_neg", "entropy", "loss")  # TAPO logs 0 for these on a step where no group survived


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def curve_series(run_dir):
    """{metric: [(step, value)]} of run_dir/metrics.jsonl for the run's CURVES ({} without metrics). A resumed
    run rewrites its steps: the last line of a step wins; a torn line is skipped."""
    by_step = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(m, dict) and "step" in m:
            m.setdefault("survived_frac", m.get("kept_frac"))  # runs logged before survived_frac existed
            by_step[m["step"]] = m
    keys = CURVES["tapo"] if any("reward" in m for m in by_step.values()) else CURVES["sft"]
    series = {k: [(s, float(by_step[s][k])) for s in sorted(by_step) if isinstance(by_step[s].get(k), (int, float))
                  and not (k in UPDATE_ONLY and by_step[s].get("updates") == 0)] for k in keys}
    return {k: v for k, v in series.items() if v}


def plot_curves(run_dir, name="curves.png"):
    """run_dir/curves.png: one small panel per metric of run_dir/metrics.jsonl against step (TAPO: reward, acc,
    survived_frac, kl_neg, entropy, loss; SFT: loss, lr, grad_norm). Returns the path, or None without metrics."""
    run_dir = Path(run_dir)
    series = curve_series(run_dir)
    if not series:
        return None
    steps = sorted({s for pts in series.values() for s, _ in pts})
    keys = list(series)
    W, H, cols = 300, 170, 3
    rows = (len(keys) + cols - 1) // cols
    img = Image.new("RGB", (W * cols, H * rows + 24), "white")
    d = ImageDraw.Draw(img)
    small, big = _font(11), _font(13)
    d.text((6, 4), f"{run_dir}  (steps {steps[0]}-{steps[-1]})", fill="black", font=big)
    for i, k in enumerate(keys):
        x0, y0 = (i % cols) * W, 24 + (i // cols) * H
        pts = series[k]
        ys = [v for _, v in pts]
        lo, hi = min(ys), max(ys)
        log = lo > 0 and hi / lo > 20  # a loss spike at step 1 would flatten everything after it
        f = math.log10 if log else float
        hi = hi if hi > lo else lo + (abs(lo) * 0.1 or 1.0)
        left, right, top, bottom = x0 + 52, x0 + W - 10, y0 + 20, y0 + H - 22
        d.rectangle([left, top, right, bottom], outline="#999")
        d.text((x0 + 52, y0 + 4), f"{k}  (last {ys[-1]:.4g}){'  log scale' if log else ''}", fill="black", font=big)
        d.text((x0 + 2, top - 4), f"{hi:.3g}", fill="#555", font=small)
        d.text((x0 + 2, bottom - 10), f"{lo:.3g}", fill="#555", font=small)
        d.text((left, bottom + 4), str(steps[0]), fill="#555", font=small)
        d.text((right - 24, bottom + 4), str(steps[-1]), fill="#555", font=small)
        span = max(1, steps[-1] - steps[0])
        xy = [(left + (s - steps[0]) / span * (right - left),
               bottom - (f(v) - f(lo)) / (f(hi) - f(lo)) * (bottom - top)) for s, v in pts]
        if len(xy) > 1:
            d.line(xy, fill="#1f5fa8", width=2)
        for p in xy if len(xy) <= 40 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill="#1f5fa8")
    path = run_dir / name
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)  # a reader never sees a half-written picture
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Finished evaluations side by side (eval.py --table, without loading "
                                 "torch's model stack): the tables with paired-bootstrap marks, curves refreshed")
    ap.add_argument("specs", nargs="+", metavar="DIR[:TAG]", help="an evaluation folder (DIR/summary.json) or a "
                    "summary*.json, with the row's label")
    ap.add_argument("--out", default=None, help="also write OUT.md, OUT.json and OUT.html")
    cli = ap.parse_args()
    compare(cli.specs, cli.out)
