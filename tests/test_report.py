"""report.py: bootstrap intervals, avg@K / pass@K, paired marks, the self-contained page, training curves."""
import json
import re

from PIL import Image

import report


def rec(i, correct, split="seen", dataset="bird", mode="closed", sample=None, **kw):
    r = {"key": f"{dataset}_{split}.jsonl:{i}|{mode}", "source": f"{dataset}_{split}.jsonl:{i}", "mode": mode,
         "split": split, "dataset": dataset, "correct": correct, "exact": correct, "format": True,
         "no_option": False, "ss_rel": None, "finish": "stop", "image": "none.png", "question": "Which bird?",
         "options": ["Tessel Wren", "Dusk Wren", "Marlow Finch", "Pale Finch"], "ground_truth": "Tessel Wren",
         "output": "<think>red head</think> <answer>Tessel Wren</answer>", "answer": "Tessel Wren"}
    if sample is not None:
        r.update(sample=sample, key=r["key"] + f"|sample{sample}@t1")
    return {**r, **kw}


def test_interval_is_seeded_contains_the_estimate_and_narrows_with_more_items():
    """The 95% interval is the same on every call, brackets the point estimate, and is ~sqrt(10)x narrower at 10x n."""
    small = report.summarise([rec(i, i % 2 == 0) for i in range(40)])["closed"]["seen"]["bird"]
    again = report.summarise([rec(i, i % 2 == 0) for i in range(40)])["closed"]["seen"]["bird"]
    big = report.summarise([rec(i, i % 2 == 0) for i in range(400)])["closed"]["seen"]["bird"]
    assert small["ci"] == again["ci"]
    lo, hi = small["ci"]["acc"]
    assert lo < small["acc"] == 50.0 < hi
    w_small, w_big = hi - lo, big["ci"]["acc"][1] - big["ci"]["acc"][0]
    assert 25 < w_small < 37 and 2.5 < w_small / w_big < 4  # normal approx: 2 * 1.96 * sqrt(.25 / n)


def test_split_and_overall_intervals_follow_the_mean_over_datasets():
    """Split avg / overall intervals bracket their means; a constant metric has a zero-width interval."""
    recs = ([rec(i, i < 30, dataset="bird") for i in range(40)] + [rec(i, i < 10, dataset="car") for i in range(40)]
            + [rec(i, i < 20, split="unseen") for i in range(40)])
    s = report.summarise(recs)["closed"]
    assert s["seen"]["avg"]["acc"] == 50.0 and s["overall"]["acc"] == 50.0
    for m in (s["seen"]["avg"], s["overall"]):
        assert m["ci"]["acc"][0] < 50.0 < m["ci"]["acc"][1]
    assert s["overall"]["ci"]["format"] == [100.0, 100.0]
    # the overall mixes three datasets' noise: narrower than one dataset's
    width = lambda m: m["ci"]["acc"][1] - m["ci"]["acc"][0]  # noqa: E731
    assert width(s["overall"]) < width(s["unseen"]["bird"])


def test_avg_and_pass_at_k_from_sampled_answers():
    """avg@K = mean correctness of the K samples per item; pass@K = share of items with one correct; greedy intact."""
    recs = [rec(0, True), rec(1, False)]
    recs += [rec(0, c, sample=j) for j, c in enumerate([True, False, False, False])]
    recs += [rec(1, False, sample=j) for j in range(4)]
    m = report.summarise(recs)["closed"]["seen"]["bird"]
    assert (m["acc"], m["avg@4"], m["pass@4"], m["n"]) == (50.0, 12.5, 50.0, 2)
    assert set(m["ci"]) >= {"acc", "avg@4", "pass@4"}
    table = report.tables_text({"x": report.summarise(recs)})
    assert "avg@4" in table and "pass@4" in table


def test_paired_bootstrap_marks_only_differences_beyond_noise():
    """Same items: a 10-item gain with no loss is marked although the two unpaired intervals overlap; an identical
    run and one that swaps which items are right (same count) are not."""
    a = [rec(i, i < 10) for i in range(40)]
    better = [rec(i, i < 20) for i in range(40)]  # right on 10 more items, never worse
    flipped = [rec(i, i % 2 == 0) for i in range(40)]  # 20 right as `better`, 10 of them other items
    rows = lambda rs: {"closed": report._group_rows(rs, "closed", 0)}  # noqa: E731
    lo, hi = report.paired_diff(rows(a)["closed"], rows(better)["closed"], "acc", "seen", "bird")
    assert 0 < lo < 25 < hi
    ci_a, ci_b = (report.summarise(r)["closed"]["seen"]["bird"]["ci"]["acc"] for r in (a, better))
    assert ci_b[0] < ci_a[1]  # unpaired, the intervals overlap
    assert report.paired_diff(rows(a)["closed"], rows(a)["closed"], "acc", "seen", "avg") == [0.0, 0.0]
    summaries = {t: report.summarise(r) for t, r in (("a", a), ("better", better), ("same", better),
                                                      ("mixed", flipped))}
    marks = report.table_marks(summaries, {"a": rows(a), "better": rows(better), "same": rows(better),
                                           "mixed": rows(flipped)})[("closed", "acc")]
    assert ("better", "bird seen") in marks and ("better", "Seen avg") in marks
    assert not any(t in ("same", "mixed") for t, _ in marks)  # each compared with the row above


def test_confusions_count_ground_truth_to_picked_option():
    """Wrong greedy answers become (gt, picked option) pairs, most frequent first; right ones, samples and
    missing answers do not."""
    recs = [rec(i, False, answer="Dusk Wren") for i in range(3)] + [rec(3, False, answer="no idea")]
    recs += [rec(4, True), rec(5, False, answer=None), rec(6, False, sample=0, answer="Dusk Wren")]
    recs += [rec(7, False, answer="Dusk Wren or Pale Finch")]
    assert report.confusions(recs) == [("Tessel Wren", "Dusk Wren", 3), ("Tessel Wren", "(2 options)", 1),
                                       ("Tessel Wren", "no idea", 1)]


def test_page_is_self_contained_and_shows_items_side_by_side(tmp_path):
    """report.html embeds images as data URIs, loads nothing from elsewhere, escapes outputs, and puts the same
    items of several runs in one row each."""
    Image.new("RGB", (112, 112), (200, 30, 30)).save(tmp_path / "img.png")
    img = str(tmp_path / "img.png")
    a = [rec(i, i % 3 == 0, image=img, output=f"<think>a <b>red</b> head {i}</think> <answer>Dusk Wren</answer>",
             answer="Dusk Wren")
         for i in range(20)]
    b = [rec(i, True, image=img) for i in range(20)]
    runs = {t: (report.summarise(rs), rs) for t, rs in (("SFT", a), ("TAPO", b))}
    page = report.write_html(tmp_path / "r.html", runs, n_items=5).read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:|//|/|file:)""", page) and "<script" not in page
    assert page.count("data:image/png;base64,") == 5
    assert "&lt;b&gt;red&lt;/b&gt;" in page and "<b>red</b>" not in page  # model text never becomes markup
    assert page.count("class='think'") + page.count('class="think"') == 10  # 5 items x 2 runs
    rows = re.findall(r"<tr><td><img class='item'.*?</tr>", page)
    assert len(rows) == 5 and all(r.count("class='ok'") + r.count("class='bad'") == 2 for r in rows)
    assert "Tessel Wren</td><td>Dusk Wren</td><td class='num'>13<" in page  # a's confusion, 13 wrong
    differ = sum("class='ok'" in r and "class='bad'" in r for r in rows)
    assert differ >= 2  # items where the runs disagree are half of the sample (13 of 20 here)


def test_curves_png_from_metrics_jsonl(tmp_path):
    """plot_curves draws a TAPO run's six panels (last line of a repeated step wins, steps without an update have
    no loss / kl / entropy) and SFT's three; none without metrics."""
    lines = [{"step": s, "reward": 0.1 * s, "acc": 0.05, "kept_frac": 0.3, "kl_neg": 0.01, "entropy": 1.2,
              "loss": -0.1, "grad_norm": 1.0, "updates": 1} for s in (1, 2, 3, 2, 3, 4)]
    lines.append({"step": 5, "reward": 0.0, "acc": 0.0, "kept_frac": 0.0, "kl_neg": 0.0, "entropy": 0.0, "loss": 0.0,
                  "updates": 0})  # no group survived: its zeros are not measurements
    (tmp_path / "tapo").mkdir()
    (tmp_path / "tapo" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5, "rew')
    series = report.curve_series(tmp_path / "tapo")
    assert [s for s, _ in series["reward"]] == [1, 2, 3, 4, 5] and [s for s, _ in series["loss"]] == [1, 2, 3, 4]
    png = report.plot_curves(tmp_path / "tapo")
    with Image.open(png) as im:
        tapo_size = im.size
    assert png.name == "curves.png" and tapo_size == (900, 2 * 170 + 24)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 3})
                                                    + "\n")
    with Image.open(report.plot_curves(tmp_path / "sft")) as im:
        assert im.size == (900, 170 + 24)
    assert report.plot_curves(tmp_path / "nothing") is None
