"""upstack touches nothing it did not write: a whole run of the tiny stack with `output_dir: .`, in a
directory full of a user's files, leaves every one of them as it was, and what it adds is its
stage directories, its report files and `.upstack/`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

# recipes/tiny.yaml's stages, each kind once, with a few steps each: a minute on 2 cores
SMALL = {
    "pretrain": {"trainer": {"max_steps": 3}, "datasets": [{"arith": {"problems": 200}}]},
    "cpt": {"trainer": {"max_steps": 2}, "datasets": [{"arith": {"problems": 100}}]},
    "synth": {"seeds": [{"source": "arith", "split": "synth", "count": 20}]},
    "sft": {"trainer": {"max_steps": 2}},
    "dpo": {"trainer": {"max_steps": 2}},
    "dpo_b": {"trainer": {"max_steps": 2}},
}


def tiny_here(directory: Path) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["output_dir"] = "."
    for name, settings in SMALL.items():
        stage = recipe["stages"][name]
        for key, value in settings.items():
            stage[key] = {**stage.get(key, {}), **value} if isinstance(value, dict) else value
    recipe["stages"]["sft"]["datasets"][1] = {"arith": {"problems": 50}}
    recipe["stages"]["synth"]["decontaminate"]["against"][0]["count"] = 20
    recipe["stages"]["eval"]["math"] = {
        "problems": {"source": "arith", "split": "eval", "count": 10},
        "max_new_tokens": 8,
        "batch_size": 10,
    }
    recipe["stages"]["eval"]["loss"] = {"count": 10}
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def user_files(directory: Path) -> dict[str, str]:
    """A user's project: notes, data, a report of their own, dot files, a dir of results."""
    files = {
        "README.md": "# my project\n",
        "report.md": "my own report, not upstack's\n",
        "notes/eval/problems.jsonl": '{"question": "1+1?", "answer": "2"}\n',
        "data/train.jsonl": '{"text": "hello"}\n',
        ".work/keep.txt": "another tool's work dir\n",
        ".tmp-mine/keep.txt": "a temp dir of mine\n",
        "results/eval-eval.png": "not a png\n",
        "eval-eval.png.bak": "a backup\n",
    }
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return snapshot(directory)


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_whole_run_in_a_users_directory_touches_none_of_their_files(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    before = user_files(project)
    recipe = tiny_here(project)
    before[recipe.name] = hashlib.sha256(recipe.read_bytes()).hexdigest()

    result = run_cli("run", "tiny.yaml", cwd=project, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # the report is upstack's own file: it refuses to replace the user's report.md
    report = run_cli("report", "tiny.yaml", cwd=project)
    assert report.returncode == 2
    assert "report.md was not written by upstack" in report.stderr.strip().splitlines()[-1]

    after = snapshot(project)
    assert {name: after.get(name) for name in before} == before  # every user file as it was
    stages = set(yaml.safe_load(recipe.read_text())["stages"])
    added = {name.split("/")[0] for name in set(after) - set(before)}
    assert added <= stages | {".upstack"}, added - stages
    assert stages <= added  # every stage ran and wrote its dir


def test_a_stage_named_like_a_users_dir_is_refused_before_anything_runs(tmp_path):
    """The reported case: `output_dir: .`, a stage `eval`, and the user's ./eval/problems.jsonl."""
    project = tmp_path / "project"
    (project / "eval").mkdir(parents=True)
    (project / "eval" / "problems.jsonl").write_text('{"question": "2+2?"}\n')
    recipe = project / "r.yaml"
    recipe.write_text(
        "name: r\noutput_dir: .\nstages:\n  init:\n    architecture: {hidden_size: 64, "
        "intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 2, "
        "num_key_value_heads: 2}\n  eval: {models: [init], loss: null}\n"
    )
    before = snapshot(project)
    result = run_cli("run", "r.yaml", cwd=project)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "r.yaml:6: stages.eval: eval exists and upstack did not write it" in line, line
    assert snapshot(project) == before and not (project / ".upstack").exists()
