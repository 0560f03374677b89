"""The runner: skip what is done, rerun what is stale, never take a killed stage for a finished one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, write_recipe

from upstack.core import runner
from upstack.core.errors import Interrupted, StageFailed
from upstack.core.recipe import load_recipe

# Two tiny init stages, `b` ordered after `a`: fast, real stages, and a dependency edge.
RECIPE = """\
name: chain
output_dir: {out}
stages:
  a:
    kind: init
    tokenizer: {{corpus_problems: 100, vocab_size: 400}}
    architecture: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                   num_attention_heads: 2, num_key_value_heads: 2}}
  b:
    kind: init
    after: [a]
    tokenizer: {{corpus_problems: 100, vocab_size: 400}}
    architecture: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                   num_attention_heads: 2, num_key_value_heads: 2}}
"""


@pytest.fixture
def chain(tmp_path):
    return write_recipe(tmp_path, RECIPE.format(out=tmp_path / "runs")), tmp_path / "runs"


def _states(recipe):
    return {row[0]: row[2] for row in runner.status_rows(recipe)}


def test_finished_stage_is_skipped_and_a_change_makes_it_and_dependents_stale(chain):
    path, out = chain
    recipe = load_recipe(path)
    assert _states(recipe) == {"a": "missing", "b": "missing"}
    assert runner.run(recipe, ["b"]) == ["a", "b"]  # a target pulls in its missing dependency
    manifest = json.loads((out / "a" / "upstack.json").read_text())
    assert manifest["config_hash"] and manifest["versions"]["torch"] and manifest["seconds"] > 0
    assert json.loads((out / "b" / "upstack.json").read_text())["inputs"] == {
        "a": manifest["config_hash"]
    }

    assert runner.run(load_recipe(path), []) == []  # everything up to date: nothing reruns
    assert json.loads((out / "a" / "upstack.json").read_text()) == manifest

    changed = load_recipe(path, ["stages.a.architecture.num_hidden_layers=3"])
    assert _states(changed) == {"a": "stale", "b": "stale"}
    assert runner.plan(changed, ["b"]) == ["a", "b"]
    assert runner.plan(load_recipe(path, ["stages.b.dtype=bfloat16"]), []) == ["b"]
    assert runner.plan(load_recipe(path), ["a"], force=True) == ["a"]


def test_a_changed_generator_makes_stages_on_generated_data_stale_and_no_others(monkeypatch):
    """The tiny world's data comes from code (data_synth.arith, listops, splits, the scripted
    teacher): a stage cached on the old code is stale, while a recipe on Hub data is untouched."""
    from upstack.core import hashing

    tiny = load_recipe(ROOT / "recipes" / "tiny.yaml", deep=False)
    solar = load_recipe(ROOT / "recipes" / "solar-10.7b.yaml", deep=False)
    before = runner.stage_hashes(tiny), runner.stage_hashes(solar)

    monkeypatch.setattr(hashing, "generator_fingerprint", lambda: "a-changed-generator")
    after = runner.stage_hashes(tiny), runner.stage_hashes(solar)
    # every tiny stage descends from init, whose tokenizer trains on generated arith text
    assert all(after[0][name] != before[0][name] for name in tiny.order())
    assert after[1] == before[1]

    # which settings read generated data: the ones whose settings models are marked, at any depth
    from data_synth.scripted import ScriptedTeacher
    from data_synth.seeds import JsonlSeeds, ListopsSeeds
    from data_synth.teachers import OpenAITeacher
    from upstack.train.data import Source

    assert hashing.reads_generated([Source(arith={"problems": 5})])
    assert hashing.reads_generated({"d": [Source(generated={"task": "listops", "problems": 3})]})
    assert hashing.reads_generated(ListopsSeeds())
    assert hashing.reads_generated([JsonlSeeds(path="p.jsonl"), ScriptedTeacher()])
    teacher = OpenAITeacher(model="m", base_urls=["http://localhost:1/v1"])
    assert not hashing.reads_generated([Source(hub="HuggingFaceTB/smollm-corpus"), teacher])
    # a held-out loss on the default rows (the arith eval split) reads generated text; on a
    # file of the user's, not
    from upstack.stages.eval import LossEval

    assert hashing.reads_generated(LossEval()) and not hashing.reads_generated(
        LossEval(path="mine.jsonl")
    )


def test_the_generator_fingerprint_covers_the_generators_only(tmp_path, monkeypatch):
    """Editing a real teacher's code (the OpenAI client's retries) leaves stages on generated
    data done; editing the scripted teacher makes them stale."""
    import shutil

    import data_synth
    from data_synth import generated

    package = Path(data_synth.__file__).parent
    copy = tmp_path / "data_synth"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(generated, "__file__", str(copy / "generated.py"))
    generated.fingerprint.cache_clear()
    try:
        before = generated.fingerprint()
        with (copy / "teachers.py").open("a") as handle:
            handle.write("\n# a change to the OpenAI client\n")
        assert generated.fingerprint.__wrapped__() == before
        with (copy / "scripted.py").open("a") as handle:
            handle.write("\n# a change to the scripted teacher\n")
        assert generated.fingerprint.__wrapped__() != before
    finally:
        generated.fingerprint.cache_clear()


def test_targets_by_kind_and_dry_run(chain, capsys):
    path, out = chain
    recipe = load_recipe(path)
    assert runner.plan(recipe, ["init"]) == ["a", "b"]
    assert runner.run(recipe, ["init"], dry_run=True) == ["a", "b"]
    assert "would run [1/2] a (init, missing)" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.slow
def test_killed_stage_leaves_nothing_that_counts_as_finished(chain):
    path, out = chain
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "upstack", "run", str(path), "a"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list((out / ".upstack" / "tmp").glob("a-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list((out / ".upstack" / "tmp").glob("a-*")), "the stage never started"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-stage: the temp dir exists, the manifest does not
    proc.wait()

    recipe = load_recipe(path)
    assert not (out / "a").exists()
    assert _states(recipe)["a"] == "missing"
    assert runner.run(recipe, ["a"]) == ["a"]
    assert (out / "a" / "upstack.json").exists()
    assert not list(
        (out / ".upstack" / "tmp").glob("*")
    )  # the killed run's leftovers were cleaned up


def test_a_failed_stage_is_reported_failed_and_leaves_no_output(chain, monkeypatch):
    path, out = chain
    from upstack.stages import init as init_model

    def broken(spec, ctx):
        (ctx.out_dir / "half-written.bin").write_bytes(b"\0")
        raise RuntimeError("disk full")

    monkeypatch.setattr(init_model, "run", broken)
    recipe = load_recipe(path)
    # not upstack's own error: one line naming the stage and the error, exit 1, the traceback
    # kept for a bug report
    with pytest.raises(StageFailed, match=r"stages\.a: RuntimeError: disk full") as caught:
        runner.run(recipe, ["a"])
    assert caught.value.exit_code == 1 and "\n" not in str(caught.value)
    trace = recipe.run_dir.work("a") / "traceback.txt"
    assert str(trace) in str(caught.value) and "in broken" in trace.read_text()
    assert _states(recipe)["a"] == "failed"
    assert not (out / "a").exists() and not list((out / ".upstack" / "tmp").glob("*"))


def test_a_model_with_nan_weights_is_not_done(chain, monkeypatch):
    """A stage that writes a non-finite model fails instead of saying done."""
    from safetensors.torch import load_file, save_file

    path, out = chain
    from upstack.stages import init as init_model

    real = init_model.run

    def poisoned(spec, ctx):
        metrics = real(spec, ctx)
        weights = ctx.out_dir / "model.safetensors"
        tensors = load_file(weights)
        tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
        return metrics

    monkeypatch.setattr(init_model, "run", poisoned)
    recipe = load_recipe(path)
    with pytest.raises(
        StageFailed, match=r"NaN or infinite values in model\.layers\.1\.mlp\.up_proj"
    ):
        runner.run(recipe, ["a"])
    assert _states(recipe)["a"] == "failed" and not (out / "a").exists()


def test_ctrl_c_in_a_stage_marks_it_interrupted(chain, monkeypatch):
    path, _ = chain
    from upstack.stages import init as init_model

    def interrupted(spec, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(init_model, "run", interrupted)
    recipe = load_recipe(path)
    with pytest.raises(Interrupted, match="interrupted; its checkpoints are kept") as caught:
        runner.run(recipe, ["a"])
    assert caught.value.exit_code == 130
    assert _states(recipe)["a"] == "interrupted"


def test_a_second_concurrent_run_is_refused(chain):
    path, out = chain
    (out / ".upstack").mkdir(parents=True)
    import fcntl

    with (out / ".upstack" / "lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("12345")
        held.flush()
        result = run_cli("run", str(path), "a")
    assert result.returncode == 2
    assert "another upstack run is using this output dir (pid 12345)" in result.stderr
    assert not (out / "a").exists()
