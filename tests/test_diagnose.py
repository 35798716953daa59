"""diagnose.py: the world rationale's four parts read back and checked against the class table."""
import json

import pytest

import diagnose
import world


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A world.json of one domain (the generator's own class table and split) and its classes."""
    classes = world.make_classes("bird", 8)
    seen, unseen = world.split_classes(classes, 0, 0.6)
    meta = {"patterns": list(world.PATTERNS), "domains": {"bird": {"classes": [
        {"name": c.name, "split": "seen" if c in seen else "unseen", "description": world.description(c)}
        for c in classes]}}}
    d = tmp_path_factory.mktemp("w")
    (d / "world.json").write_text(json.dumps(meta))
    return d, seen, unseen


def record(c, output, split, correct, **extra):
    tail = f"|sample{extra['sample']}@t{extra['temperature']:g}" if "sample" in extra else ""  # eval.py's keys
    return dict(key=f"x|{c.name}|closed{tail}", ground_truth=c.name, split=split, mode="closed", output=output,
                correct=correct, **extra)


def test_parse_reads_back_the_generators_rationale(setup):
    _, seen, _ = setup
    c, cands = seen[0], [seen[1], seen[0], seen[2]]
    p = diagnose.parse_rationale(world.rationale(c, cands, "describe"))
    assert p == {"analysis": world.description(c), "rationale": True, "candidates": [o.name for o in cands],
                 "prediction": c.name, "answer": c.name}


def test_parse_reads_the_base_models_short_think(setup):
    _, seen, _ = setup
    c = seen[0]
    p = diagnose.parse_rationale(f"<think> {world.analysis(c, pattern=False)} </think>\n\n<answer>{c.name}</answer>")
    assert (p["analysis"], p["rationale"], p["answer"]) == (world.description(c, pattern=False), False, c.name)


def test_without_pattern_drops_only_pattern_words():
    assert diagnose.without_pattern("a red head, tipped blue wings and a plain body", ["plain", "tipped"]) == \
        "a red head, blue wings and a body"


def test_anatomy_counts_snaps_lookup_and_decoding_apart(setup):
    d, seen, unseen = setup
    classes, patterns = diagnose.load_world(d)
    u = unseen[0]
    snap = min(seen, key=lambda s: world.distance(s, u))  # the unseen image described as a seen class
    wrong = world.rationale(snap, [snap, seen[1]], "describe")                        # analysis snaps to `snap`
    right_bad_lookup = world.rationale(u, [u, snap], "describe").replace(f"Prediction: {u.name}.",
                                                                          f"Prediction: {snap.name}.")
    recs = [record(u, wrong, "unseen", False),
            record(u, world.rationale(u, [snap, u], "describe"), "unseen", True),
            record(u, right_bad_lookup, "unseen", False, sample=0, temperature=1.0)]
    out = diagnose.anatomy(recs, classes, patterns)
    g, s = out[("unseen", "greedy")], out[("unseen", "sampled@1")]
    assert (g["answers"], g["correct"], g["analysis_right"], g["wrong_snaps_seen"]) == (2, 1, 1, 1)
    assert (g["gt_in_candidates|right"], g["lookup_consistent"], g["correct|right"]) == (1, 2, 1)
    assert (s["answers"], s["analysis_right"], s["lookup_consistent"], s["correct|right"]) == (1, 1, 0, 0)


def test_counts_candidates_copying_the_options_and_answers_repeating_the_prediction(setup):
    """A rationale whose candidates replace an option by another name, and whose answer is not its prediction."""
    d, seen, unseen = setup
    classes, patterns = diagnose.load_world(d)
    u, opts = unseen[0], [unseen[0], seen[0], seen[1], seen[2]]
    copied = world.rationale(u, [opts[2], opts[0], opts[3], opts[1]], "describe")  # the options in another order
    swapped = world.rationale(u, [seen[3], opts[0], opts[3], opts[1]], "describe").replace(
        f"<answer>{u.name}</answer>", f"<answer>{seen[3].name}</answer>")
    recs = [dict(record(u, t, "unseen", ok), options=[o.name for o in opts]) for t, ok in ((copied, True),
                                                                                         (swapped, False))]
    recs.append(record(u, copied, "unseen", True))  # no options (an open-world record): not in the first count
    g = diagnose.anatomy(recs, classes, patterns)[("unseen", "greedy")]
    assert (g["with_options"], g["candidates_are_options"]) == (2, 1)
    assert (g["rationales"], g["answer_is_prediction"]) == (3, 2)


def test_counts_predictions_outside_the_candidates(setup):
    """The unseen answer reached from memory: the comparison lists seen look-alikes, the Prediction names another."""
    d, seen, unseen = setup
    classes, patterns = diagnose.load_world(d)
    u = unseen[0]
    outside = world.rationale(u, [seen[0], seen[1]], "describe")    # candidates without u, prediction u
    inside = world.rationale(u, [seen[0], u], "describe")
    wrong_outside = outside.replace(f"Prediction: {u.name}.", f"Prediction: {seen[2].name}.").replace(
        f"<answer>{u.name}</answer>", f"<answer>{seen[2].name}</answer>")
    recs = [record(u, outside, "unseen", True), record(u, inside, "unseen", True),
            record(u, wrong_outside, "unseen", False), record(u, "<answer>x</answer>", "unseen", False)]
    g = diagnose.anatomy(recs, classes, patterns)[("unseen", "greedy")]
    assert (g["with_candidates"], g["prediction_outside"], g["correct|outside"]) == (3, 2, 1)


def test_wrong_answers_after_a_right_analysis_say_where_the_lookup_lost_the_ground_truth(setup):
    """Right analysis, wrong prediction: the ground truth's name left out of the Comparison, compared with another
    class's description, or compared with its own and passed over; a right answer is none of these."""
    d, seen, unseen = setup
    classes, patterns = diagnose.load_world(d)
    u, s0, s1 = unseen[0], seen[0], seen[1]

    def predict(text, name):
        return text.replace(f"Prediction: {u.name}.", f"Prediction: {name}.").replace(
            f"<answer>{u.name}</answer>", f"<answer>{name}</answer>")
    left_out = predict(world.rationale(u, [s0, s1], "describe"), s0.name)
    misremembered = predict(world.rationale(u, [u, s0], "describe").replace(
        f"{u.name} has {world.description(u)}", f"{u.name} has {world.description(s1)}"), s0.name)
    passed_over = predict(world.rationale(u, [u, s0], "describe"), s0.name)
    assert diagnose.parse_comparison(passed_over) == {u.name: world.description(u), s0.name: world.description(s0)}
    recs = [record(u, t, "unseen", False) for t in (left_out, misremembered, misremembered, passed_over)]
    recs.append(record(u, world.rationale(u, [u, s0], "describe"), "unseen", True))
    g = diagnose.anatomy(recs, classes, patterns)[("unseen", "greedy")]
    assert (g["analysis_right"], g["wrong|right"]) == (5, 4)
    assert (g["left_out"], g["misremembered"], g["passed_over"]) == (1, 2, 1)


def test_group_signal_separates_perception_from_lookup(setup):
    """TAPO groups: a mixed group whose rollouts agree on the analysis varies by its lookup, one that splits on a right
    analysis varies by perception; a group all right carries no signal; a right answer after a wrong analysis counts."""
    d, seen, _ = setup
    classes, _ = diagnose.load_world(d)
    c, other = seen[0], min(seen[1:], key=lambda s: world.distance(s, seen[0]))
    right = world.rationale(c, [c, other], "describe")
    bad_lookup = right.replace(f"Prediction: {c.name}.", f"Prediction: {other.name}.").replace(
        f"<answer>{c.name}</answer>", f"<answer>{other.name}</answer>")
    misread = world.rationale(other, [other, c], "describe")               # reads the image as `other`, answers it
    lucky = misread.replace(f"<answer>{other.name}</answer>", f"<answer>{c.name}</answer>")  # same, answers c
    groups = [(c.name, [(right, 1.0), (bad_lookup, 0.0)]),             # lookup
              (c.name, [(right, 1.0), (misread, 0.0), (lucky, 1.0)]),  # perception; one lucky right answer
              (c.name, [(right, 1.0), (right, 1.0)])]                  # all right: dropped by dynamic sampling
    g = diagnose.group_signal(groups, classes)
    assert (g["groups"], g["mixed"], g["same_analysis"], g["mixed_perception"]) == (3, 2, 2, 1)
    assert (g["rollouts"], g["analysis_right"], g["correct|right"], g["correct|wrong"]) == (7, 5, 4, 1)
    with pytest.raises(ValueError, match="not a class of this world"):
        diagnose.group_signal([("Nobody Wren", [(right, 1.0)])], classes)


def test_colours_right_ignores_the_pattern(setup):
    d, seen, _ = setup
    classes, patterns = diagnose.load_world(d)
    c = next(x for x in seen if x.a["pattern"] == "tipped")
    out = diagnose.anatomy([record(c, f"<think> {world.analysis(c, pattern=False)} </think>\n\n<answer>{c.name}"
                                      "</answer>", "seen", True)], classes, patterns)[("seen", "greedy")]
    assert (out["stated"], out["colours_right"], out["rationales"]) == (1, 1, 0)


def test_reads_records_as_eval_resumes_them(setup, tmp_path):
    """report.load_records' reading: a torn line (an interrupted eval) is skipped, one record per key."""
    _, seen, _ = setup
    r = record(seen[0], "<answer>x</answer>", "seen", False)
    (tmp_path / "items.jsonl").write_text(json.dumps(r) + "\n" + json.dumps(r) + "\n" + '{"key": "torn", "outp')
    assert diagnose.read_items(tmp_path, "closed") == [r]


def test_folder_without_answers_of_the_mode_is_an_error(setup, tmp_path):
    _, seen, _ = setup
    (tmp_path / "items.jsonl").write_text(json.dumps(record(seen[0], "", "seen", False)) + "\n")
    with pytest.raises(FileNotFoundError, match="no open-world answers"):
        diagnose.read_items(tmp_path, "open")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        diagnose.read_items(tmp_path / "items.jsonl", "closed")


def test_unknown_class_is_an_error(setup):
    d, seen, _ = setup
    classes, patterns = diagnose.load_world(d)
    with pytest.raises(ValueError, match="not a class of this world"):
        diagnose.anatomy([dict(record(seen[0], "", "seen", False), ground_truth="Nobody Wren")], classes, patterns)


def test_cli_reports_a_missing_world_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        diagnose.main(["--world", str(tmp_path / "none"), str(tmp_path)])
    assert e.value.code == 2 and "none/world.json: not an embedded world" in capsys.readouterr().err


def test_cli_prints_one_row_per_split_and_decoding(setup, tmp_path, capsys):
    d, seen, unseen = setup
    recs = [record(seen[0], world.rationale(seen[0], [seen[0]], "describe"), "seen", True),
            record(unseen[0], world.rationale(unseen[0], [unseen[0]], "describe"), "unseen", True),
            record(unseen[0], "<answer>x</answer>", "unseen", False, sample=0, temperature=1.0)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    diagnose.main(["--world", str(d), str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    rows = lines[2:]
    assert {line.count("|") for line in lines} == {lines[0].count("|")}  # every row fills every column
    assert [r.split(" | ")[1:3] for r in rows] == [["seen", "greedy"], ["unseen", "greedy"], ["unseen", "sampled@1"]]
