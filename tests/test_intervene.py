"""intervene.py: the rationale's candidates replaced by the prompt's options, the rest continued by the model."""
import json

import pytest

import intervene
from conftest import random_image
from data import closed_prompt

OPTIONS = ["Tessel Wren", "Fennick Wren", "Calder Wren", "Garrow Wren"]
OWN = ("<think> Visual analysis: the bird has a red head, plain blue wings and a yellow body. Candidates: Fennick "
       "Wren, Fennick Wren. Comparison: Fennick Wren has a red head. Prediction: Fennick Wren. </think>\n\n"
       "<answer>Fennick Wren</answer>")


def record(tmp_path, key, output=OWN, mode="closed", **extra):
    img = tmp_path / f"{key}.png"
    random_image(112, 112, len(key)).save(img)
    q = "What is the bird featured in this picture?"
    return dict(key=key, split="unseen", mode=mode, image=str(img), prompt=closed_prompt(q, OPTIONS),
                options=OPTIONS, ground_truth="Tessel Wren", output=output, correct=False, **extra)


def test_forced_prefix_keeps_the_own_analysis_and_lists_the_options():
    p = intervene.forced_prefix(OWN, OPTIONS)
    assert p == OWN[:OWN.index("Candidates:")] + "Candidates: Tessel Wren, Fennick Wren, Calder Wren, Garrow Wren."
    assert intervene.forced_prefix("<think> The bird has a red head. </think>", OPTIONS) is None


def test_only_greedy_closed_answers_with_candidates_are_forced(tmp_path):
    """Sampled answers, open-world answers and answers without candidates are left out."""
    recs = [record(tmp_path, "a"), record(tmp_path, "b", sample=0, temperature=1.0),
            record(tmp_path, "c", mode="open"), record(tmp_path, "d", output="<answer>Tessel Wren</answer>")]
    assert [r["key"] for r in intervene.eligible(recs)] == ["a"]


def test_forced_answers_are_scored_on_the_prefix_and_the_continuation(tiny, tmp_path, monkeypatch):
    """The model continues after the forced candidates; Prediction and correctness are read from prefix + text."""
    model, proc = tiny
    cont = " Comparison: Tessel Wren has a red head. Prediction: Tessel Wren. </think>\n\n<answer>Tessel Wren</answer>"
    seen = []

    def fake_decode(tok, ro):  # the real generate ran on the prefixed prompts; its text is replaced by a known one
        seen.append(ro.tokens.shape[0])
        return [cont] * ro.tokens.shape[0]
    monkeypatch.setattr(intervene, "decode", fake_decode)
    rows = intervene.force_candidates(model, proc, [record(tmp_path, "a"), record(tmp_path, "bb")], batch_size=2,
                                      max_new_tokens=3)
    assert seen == [2] and len(rows) == 2
    r = rows[0]
    assert r["forced"] == intervene.forced_prefix(OWN, OPTIONS) + cont
    assert (r["prediction_own"], r["prediction_forced"]) == ("Fennick Wren", "Tessel Wren")
    assert (r["correct_own"], r["correct_forced"]) == (False, True)


def test_an_evaluation_of_other_weights_is_refused(tmp_path, capsys):
    """The eval folder's run.json names the weights that wrote it; another checkpoint's is a CLI error."""
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "items.jsonl").write_text(json.dumps(record(tmp_path, "a")) + "\n")
    (ev / "run.json").write_text(json.dumps({"model": "tiny", "weights": "0123456789abcdef"}))
    with pytest.raises(SystemExit) as e:
        intervene.main([str(ev)])
    assert e.value.code == 2 and "not the weights that wrote" in capsys.readouterr().err
