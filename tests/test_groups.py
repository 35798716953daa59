"""groups.py: TAPO's groups drawn from a checkpoint for diagnose.group_signal."""
import json

import pytest

import groups


def test_draw_groups_gives_one_full_group_per_row_and_repeats_per_seed(tiny_world):
    """One group per training row of the sample, n1 + n2 = 10 rollouts each, the row's answer as ground truth;
    the same seed draws the same rollouts (a diagnostic others can rerun)."""
    rows = [json.loads(x) for x in (tiny_world / "rl_train.jsonl").read_text().splitlines()]
    draw = lambda: groups.draw_groups("tiny", tiny_world, rows=2, seed=3, flags=["--max-new-tokens", "8"])  # noqa: E731
    a = draw()
    assert len(a) == 2 and all(len(r) == 10 for _, r in a)
    assert {gt for gt, _ in a} <= {r["answer"] for r in rows}
    assert a == draw()


def test_cli_reports_a_missing_world_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        groups.main(["--world", str(tmp_path / "none"), "tiny"])
    assert e.value.code == 2 and "not an embedded world" in capsys.readouterr().err
