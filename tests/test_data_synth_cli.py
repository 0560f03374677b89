"""`python -m data_synth`: the synthetic data set without upstack, errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def data_synth(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_synth", *args],
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_writes_records_instruct_set_and_tuples_and_resumes(tmp_path):
    (tmp_path / "synth.yaml").write_text(
        "seed: 3\n"
        "seeds: [{source: arith, count: 12}]\n"
        "teacher: {kind: scripted, error_rate: 0.0}\n"
        "augmentations: {rephrase_question: 1, rephrase_answer: 1}\n"
        "pairs: {test_fraction: 0.25}\n"
    )
    first = data_synth("synth.yaml", "--out", "out", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["augmentation"] for r in records} == {"rephrase_question", "rephrase_answer"}
    tuples = (out / "alignment" / "train.jsonl").read_text().splitlines()
    assert tuples and {"prompt", "chosen", "rejected"} == set(json.loads(tuples[0]))
    again = data_synth("synth.yaml", "--out", "out", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert (out / "records.jsonl").read_text().count("\n") == len(records)


def test_cli_bad_setting_is_one_line_exit_2(tmp_path):
    (tmp_path / "synth.yaml").write_text(
        "seeds: [{source: arith}]\nteacher: {kind: scripted, error_rate: 2}\n"
    )
    result = data_synth("synth.yaml", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: synth.yaml: teacher.error_rate: Input should be less than or equal to 1"
    ]
    assert not (tmp_path / "out").exists()
