"""A run never says done for work it did not do: failing teachers, tuples without signal, text
answers, full disks, workers' errors; and what it can see early it refuses early."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli, write_recipe

from data_synth import echo_server
from upstack.core.errors import StageFailed
from upstack.core.recipe import load_recipe
from upstack.core.runner import run

TEACHER = """
name: fault
output_dir: {out}
seed: 3
stages:
  synth:
    seeds: [{{source: arith, count: 30}}]
    teacher: {{kind: openai, model: echo, base_urls: ["{url}"], concurrency: 4,
               max_retries: 0, timeout_s: 1, backoff_s: 0.01}}
    augmentations: {{rephrase_question: 0, rephrase_answer: 1}}
"""


def served(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.slow
def test_synth_with_the_teacher_down_fails_and_a_rerun_sends_only_what_failed(tmp_path):
    port = echo_server.free_port()
    url = f"http://127.0.0.1:{port}/v1"
    path = write_recipe(tmp_path, TEACHER.format(out=tmp_path / "runs", url=url))
    work = tmp_path / "runs" / ".upstack" / "work" / "synth"

    # 1. nothing listens at the teacher's URL for the whole run
    result = run_cli("run", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    # given up on after the retry budget (here one request timeout), in one line
    assert "stages.synth.teacher: every teacher server has been down for" in last
    assert last.endswith(f"{url}: APIConnectionError")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "synth").exists()  # failed: no manifest, nothing done
    lost = json.loads((work / "failed_requests.json").read_text())
    assert set(lost["request_errors"]) <= {"APIConnectionError"} and lost["kept"] == 0
    assert lost["servers"][url]["answered"] == 0  # the probes, each a request's one try
    assert "| failed" in run_cli("status", str(path), cwd=tmp_path).stdout

    # 2. the teacher is back but flaky: what it answers is cached, the rest still fails the stage
    flaky_log = tmp_path / "flaky.jsonl"
    with echo_server.running(fail_rate=0.4, hang_s=0.0, seed=5, port=port, log=str(flaky_log)):
        result = run_cli("run", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    failed = sum(json.loads((work / "failed_requests.json").read_text())["request_errors"].values())
    assert 0 < failed < 30 and served(flaky_log) == 30 - failed

    # 3. the teacher is healthy: only the failed requests are sent, and the records are complete
    good_log = tmp_path / "good.jsonl"
    with echo_server.running(port=port, log=str(good_log)):
        result = run_cli("run", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert served(good_log) == failed  # nothing answered before was asked again
    metrics = json.loads((tmp_path / "runs" / "synth" / "upstack.json").read_text())["metrics"]
    assert metrics["cache_hits"] == 30 - failed and metrics["requests_sent"] == failed
    records = [json.loads(r) for r in (tmp_path / "runs" / "synth" / "records.jsonl").open()]
    assert len(records) == 30 and len({r["seed_id"] for r in records}) == 30  # none lost or twice
    assert not (work / "failed_requests.json").exists()


def test_pairs_drops_tuples_whose_chosen_is_the_rejected_and_fails_without_tuples(tmp_path):
    def record(seed: int, augmentation: str, answer: str) -> dict:
        return {
            "id": f"s{seed}:{augmentation}:0",
            "seed_id": f"s{seed}",
            "augmentation": augmentation,
            "sample": 0,
            "question": f"Reworded {seed}?",
            "answer": answer,
            "original_solution": f"Add: {seed} + 1 = {seed + 1}. \\boxed{{{seed + 1}}}",
        }

    rows = []
    for s in range(10):
        original = f"Add: {s} + 1 = {s + 1}. \\boxed{{{s + 1}}}"
        # half the "rephrased" answers are the original, once with other whitespace
        answer = (
            f"Add:  {s} + 1 = {s + 1}.\n\\boxed{{{s + 1}}}"
            if s % 2
            else f"{s}+1 is \\boxed{{{s + 1}}}"
        )
        rows += [record(s, "rephrase_question", original), record(s, "rephrase_answer", answer)]
    records = tmp_path / "records"
    records.mkdir()
    (records / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_recipe(
        tmp_path,
        f"name: p\noutput_dir: {tmp_path / 'runs'}\nstages:\n  pairs: {{records: {records}, test_fraction: 0.2}}\n",
    )
    run(load_recipe(path), ["pairs"])
    metrics = json.loads((tmp_path / "runs" / "pairs" / "upstack.json").read_text())["metrics"]
    assert metrics["tuples_dropped"] == {"chosen_equals_rejected": 5}
    assert metrics["alignment_train"] + metrics["alignment_test"] == 5
    assert metrics["instruct_train"] + metrics["instruct_test"] == 10  # still fine SFT data
    for split in ("train", "test"):
        for line in (tmp_path / "runs" / "pairs" / "alignment" / f"{split}.jsonl").open():
            row = json.loads(line)
            assert row["chosen"][0]["content"].split() != row["rejected"][0]["content"].split()

    # every answer the original: no tuple at all, and the stage fails saying why
    same = [r for r in rows if r["augmentation"] == "rephrase_question"]
    same += [record(s, "rephrase_answer", r["original_solution"]) for s, r in enumerate(same)]
    (records / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    with pytest.raises(
        StageFailed, match=r"no DPO tuples: .*10 tuples dropped \(chosen equals rejected\)"
    ):
        run(load_recipe(path), ["pairs"], force=True)


def test_the_scripted_teacher_never_offers_the_original_as_a_rephrased_answer(tmp_path):
    path = write_recipe(
        tmp_path,
        f"""
        name: s
        output_dir: {tmp_path / "runs"}
        stages:
          synth:
            seeds: [{{source: arith, count: 80}}]
            teacher: {{kind: scripted, error_rate: 0.1}}
            augmentations: {{rephrase_question: 2, rephrase_answer: 2}}
          pairs: {{test_fraction: 0.1}}
        """,
    )
    run(load_recipe(path), ["pairs"])
    records = [json.loads(r) for r in (tmp_path / "runs" / "synth" / "records.jsonl").open()]
    answers = [r for r in records if r["augmentation"] == "rephrase_answer"]
    assert answers and all(r["answer"] != r["original_solution"] for r in answers)
    metrics = json.loads((tmp_path / "runs" / "pairs" / "upstack.json").read_text())["metrics"]
    assert metrics["tuples_dropped"] == {}


@pytest.mark.parametrize(
    "gold, prediction, correct",
    [
        ("Paris", "The capital is \\boxed{Sirap}", False),
        ("yes", "\\boxed{sey}", False),
        ("\\text{Paris}", "\\boxed{paris}", True),
        ("yes", "So the answer is \\boxed{Yes}.", True),
        ("\\text{(C)}", "\\boxed{C}", True),
        ("\\frac{3}{4}", "\\boxed{0.75}", True),
        ("10\\text{ cm}", "\\boxed{10}", True),
    ],
)
def test_text_answers_are_compared_as_text(gold, prediction, correct):
    from data_synth.verify import check, grade

    assert grade(gold, prediction)[1] is correct
    assert (check(gold, prediction) is None) is correct  # synth's verifier agrees with eval


def test_a_full_disk_fails_the_stage_in_one_line_and_keeps_nothing(tmp_path, monkeypatch, capsys):
    from upstack.commands import cli
    from upstack.stages import init

    def full(spec, ctx):
        (ctx.out_dir / "part.bin").write_bytes(b"\0")
        raise OSError(
            errno.ENOSPC, "No space left on device", str(ctx.out_dir / "model.safetensors")
        )

    monkeypatch.setattr(init, "run", full)
    path = write_recipe(
        tmp_path, f"name: d\noutput_dir: {tmp_path / 'runs'}\nstages: {{init: {{}}}}\n"
    )
    assert cli.main(["run", str(path)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "stages.init: disk full while writing" in last
    assert "model.safetensors: free space under" in last
    runs = tmp_path / "runs"
    assert not (runs / "init").exists() and not list((runs / ".upstack" / "tmp").glob("*"))
    assert (runs / ".upstack" / "work" / "init" / "failed.json").exists()


def test_help_does_not_list_the_internal_worker_command():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "_stage" not in result.stdout and "SUPPRESS" not in result.stdout


def test_a_locked_output_dir_is_refused_before_the_heavy_imports(tmp_path):
    """A second run on a busy output dir answers at once: no mergekit, no torch imported."""
    import fcntl

    out = tmp_path / "runs"
    (out / ".upstack").mkdir(parents=True)
    path = write_recipe(
        tmp_path,
        f"name: l\noutput_dir: {out}\nstages:\n  init: {{}}\n  merge:\n    merge_method: linear\n"
        "    models: [{model: init, parameters: {weight: 1.0}}]\n",
    )
    code = (
        "import sys; from upstack.commands import cli; "
        f"code = cli.main(['run', {str(path)!r}]); "
        "print(code, 'torch' in sys.modules, 'mergekit' in sys.modules)"
    )
    with (out / ".upstack" / "lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("777")
        held.flush()
        result = subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert "another upstack run is using this output dir (pid 777)" in result.stderr


def test_show_never_prints_a_value_that_looks_like_a_token(tmp_path):
    token = "hf_abcdefghijklmnopqrstuvwxyz012345"
    path = write_recipe(tmp_path, f"name: s\ndescription: {token}\nstages: {{init: {{}}}}\n")
    result = run_cli("show", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout and "<redacted" in result.stdout
