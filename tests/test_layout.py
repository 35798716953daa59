"""The project's layering and its one configuration mechanism."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

import sft
import tapo

ROOT = Path(__file__).resolve().parents[1]
# Each module may import only modules of a LOWER layer (README "Files"); stages sit on top.
LAYERS = [
    ("distributed", "reward", "report"),
    ("data", "checkpoint", "diagnose"),
    ("world",),
    ("presets",),
    ("policy",),
    ("rollout", "training", "imagefolder", "supervised"),
    ("sft", "tapo", "eval", "bench"),
    ("intervene", "groups"),
]
LAYER = {m: i for i, ms in enumerate(LAYERS) for m in ms}


def imports_of(path):
    """(module imported, whether the import statement sits inside a function) for every import of ours."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, in_def):
        for child in ast.iter_child_nodes(node):
            inner = in_def or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name.split(".")[0], inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.append((child.module.split(".")[0], inner))
            visit(child, inner)
    visit(tree, False)
    return [(m, inner) for m, inner in out if m in LAYER]


@pytest.mark.parametrize("module", sorted(m for m in LAYER if m != "bench"))
def test_imports_only_point_down(module):
    """A module imports only modules of lower layers, and never inside a function (no hidden cycle)."""
    for dep, inner in imports_of(ROOT / f"{module}.py"):
        assert not inner, f"{module}.py imports {dep} inside a function"
        assert LAYER[dep] < LAYER[module], f"{module}.py (layer {LAYER[module]}) imports {dep} (layer {LAYER[dep]})"


def test_every_python_module_has_a_layer():
    """Every top-level module is placed in LAYERS (a new file must say where it sits)."""
    assert {p.stem for p in ROOT.glob("*.py")} <= set(LAYER)


def test_release_values_are_the_defaults_when_a_model_is_given(tmp_path):
    """With --model / --data, flags left unset take the released scripts' values."""
    a = tapo.get_args(["--model", "tiny", "--data", str(tmp_path / "rl.jsonl")])
    assert (a.defaults, a.lr, a.rollout_batch, a.update_batch, a.max_new_tokens) == ("release", 1e-6, 384, 128, 2048)
    s = sft.get_args(["--model", "tiny", "--data", str(tmp_path / "x.json")])
    assert (s.defaults, s.lr, s.batch_size, s.epochs, s.max_length) == ("release", 5e-6, 64, 10, 4096)


def test_world_values_only_when_asked_or_embedded(tmp_path):
    """--defaults world selects the WORLD dict; explicit flags still win over it."""
    a = tapo.get_args(["--model", "tiny", "--data", str(tmp_path / "rl.jsonl"), "--defaults", "world", "--lr", "3e-5"])
    assert a.defaults == "world" and a.lr == 3e-5 and a.rollout_batch == tapo.WORLD["rollout_batch"]
    s = sft.get_args(["--variant", "pretrain"])  # the embedded default: no --model, no --data
    assert s.defaults == "world" and s.lr == sft.WORLD["pretrain"]["lr"] and s.model == sft.BASE_PRESET



def test_run_sh_trains_the_base_sft_py_would():
    """run.sh's default base model (preset, epochs) is the one `python sft.py --variant pretrain` trains."""
    text = (ROOT / "run.sh").read_text()
    preset = re.search(r"--model \$\{PRESET:-([\w.-]+)\}", text)
    epochs = re.search(r"--epochs \$\{BASE_EPOCHS:-([\d.]+)\}", text)
    assert preset and epochs, "run.sh no longer passes --model ${PRESET:-...} --epochs ${BASE_EPOCHS:-...}"
    assert preset.group(1) == sft.BASE_PRESET
    assert float(epochs.group(1)) == sft.WORLD["pretrain"]["epochs"]


def test_run_sh_work_line_sums_stage_seconds_times_processes(tmp_path):
    """run.sh's stage() records each stage's processes (torchrun --nproc_per_node, else 1) and its closing work
    line is the sum of seconds x processes over timings.txt, half of it the 2-core bound (README "Stop 32")."""
    text = (ROOT / "run.sh").read_text()
    stage = re.search(r"^stage\(\) \{.*?^\}$", text, re.S | re.M)
    work = re.search(r"^awk '/\^== .*?\"\$OUT/timings.txt\"$", text, re.S | re.M)
    assert stage and work, "run.sh no longer defines stage() and the closing awk work line"
    script = (f"set -euo pipefail\nOUT={tmp_path}\n{stage.group(0)}\n"
              "stage two /nonexistent true torchrun --standalone --nproc_per_node 2 sft.py --x\n"  # `true` runs, no torchrun
              "stage one /nonexistent true python eval.py\n"
              f"stage done {tmp_path} true python never.py\n"  # output exists: skipped, not timed
              "echo '== base: 421 s on 2 processes' >> $OUT/timings.txt\n"
              "echo '== sft_cot: 73 s on 1 process' >> $OUT/timings.txt\n"
              "echo '== tapo_old: 99 s' >> $OUT/timings.txt\n"  # ablate.sh's lines carry no process count
              f"{work.group(0)}\n")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    lines = (tmp_path / "timings.txt").read_text().splitlines()
    timed = [re.fullmatch(r"== (two|one): (\d+) s on (\d) process(es)?", x) for x in lines[:2]]
    assert all(timed) and [(m[1], m[3]) for m in timed] == [("two", "2"), ("one", "1")], lines
    work = 421 * 2 + 73 + sum(int(m[2]) * int(m[3]) for m in timed)  # `true` may straddle a second boundary
    assert f"== work: {work} core-seconds" in out and f"at least {work // 2} s" in out, out


def test_bare_resume_means_newest_checkpoint(tmp_path):
    """`--resume` with no value means the newest checkpoint in --out, in both training stages."""
    assert tapo.get_args(["--model", "tiny", "--data", "x.jsonl", "--resume"]).resume == "newest"
    assert sft.get_args(["--model", "tiny", "--data", "x.json", "--resume"]).resume == "newest"
