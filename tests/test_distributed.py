"""FSDP2 on two CPU processes (gloo): full-state saves, the same training as one process, frozen
layers untouched, resume after a kill of the whole launch or of one rank."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from safetensors.torch import load_file

from upstack.core.recipe import load_recipe
from upstack.core.runner import run

FSDP = str(ROOT / "recipes/accelerate/fsdp.yaml")
TRAINER = {
    "per_device_train_batch_size": 2,
    "learning_rate": 3e-3,
    "max_length": 64,
    "logging_steps": 1,
}


def _env(**extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _recipe(directory: Path, stages: dict, name: str = "recipe.yaml", **launch) -> Path:
    path = directory / name
    data = {"name": "t", "output_dir": str(directory / "runs"), "stages": stages}
    if launch:
        data["launch"] = launch
    path.write_text(yaml.safe_dump(data))
    return path


def _upstack(path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "upstack", "run", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _metrics(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "upstack.json").read_text())["metrics"]


def _pairs(path: Path, count: int = 16) -> str:
    with path.open("w") as handle:
        for i in range(count):
            a, b = i % 9 + 1, (i * 7) % 9 + 1
            row = {
                "prompt": f"Ana has {a} pens and gets {b} more. How many?",
                "chosen": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
                "rejected": "Marbles and shells are in rows of cards.",
            }
            handle.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.slow
def test_fsdp2_stages_save_full_models_that_match_one_process(
    tmp_path, tiny_model, one_torch_thread
):
    """cpt, sft (LoRA and train_layers) and dpo (reference log-probs precomputed) under FSDP2 on
    two processes: each leaves one full safetensors model that AutoModelForCausalLM loads; cpt
    trains as one process with the same global batch does; frozen weights stay bit-identical."""
    from transformers import AutoModelForCausalLM

    text = [{"arith": {"problems": 64}}]
    cpt = {"model": str(tiny_model), "datasets": text, "trainer": {**TRAINER, "max_steps": 4}}
    layers = {"model": str(tiny_model), "datasets": text, "train_layers": [6, 7]}
    layers["trainer"] = {**TRAINER, "max_steps": 2}
    stages = {
        "cpt": cpt,
        "lora": {"kind": "sft", **layers, "adapter": {"r": 4}},
        "part": {"kind": "sft", **layers},
        "dpo": {
            "model": str(tiny_model),
            "datasets": [{"path": _pairs(tmp_path / "pairs.jsonl")}],
            "trainer": {**TRAINER, "max_length": 96, "max_steps": 2, "beta": 0.1},
        },
    }
    path = _recipe(tmp_path, stages, accelerate_config=FSDP, num_processes=2)
    result = subprocess.run(
        [sys.executable, "-m", "upstack", "run", str(path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs"
    base = load_file(str(tiny_model / "model.safetensors"))
    for name in stages:
        out = runs / name
        metrics = _metrics(out)
        # FSDP2 really ran (accelerate alone falls back to DDP on CPU: upstack.train.distributed)
        assert metrics["distributed"] == "fsdp2" and metrics["processes"] == 2, name
        assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"], name
        assert not list(out.rglob("*fsdp*")), name  # no sharded or FSDP-format leftovers
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.model.embed_tokens.weight.shape == base["model.embed_tokens.weight"].shape

    # frozen layers: gathered from the shards bit-identical, only layers 6 and 7 moved
    for name in ("lora", "part"):
        after = load_file(str(runs / name / "model.safetensors"))
        for key, tensor in base.items():
            trained = key.startswith(("model.layers.6.", "model.layers.7."))
            if name == "lora":  # the adapter merges into the Linear weights only
                trained = trained and key.endswith("proj.weight")
            assert torch.equal(after[key], tensor) != trained, (name, key)

    # the reference log-probs precomputed under FSDP are the policy's own at step 1 (TRL issue
    # 2985: a reference computed on shards would differ): the first DPO loss is exactly ln 2
    assert _metrics(runs / "dpo")["train_loss_first"] == pytest.approx(math.log(2), abs=1e-5)

    # One process, micro-batch 4 = two processes x 2: the same rows per step (accelerate hands
    # rank r the r-th micro-batch of the same sampler order) and the same token-mean loss
    # (average_tokens_across_devices). What differs is the order of float32 sums: the gradient
    # reduce-scatter adds two halves where one process adds the whole batch. Measured here: loss
    # curves equal to the last printed digit (max relative difference ~1e-7), weights after 4
    # AdamW steps at lr 3e-3 within 2.2e-5 (Adam divides by sqrt(v), which magnifies the
    # last-bit differences of near-zero gradients), so 1e-5 on losses and 1e-4 on weights.
    single = tmp_path / "single"
    single.mkdir()
    alone = {**cpt, "trainer": {**cpt["trainer"], "per_device_train_batch_size": 4}}
    run(load_recipe(_recipe(single, {"cpt": alone})), ["cpt"])
    one, two = _metrics(single / "runs" / "cpt"), _metrics(runs / "cpt")
    assert one["distributed"] == "single"
    assert [s for s, _ in one["loss_curve"]] == [s for s, _ in two["loss_curve"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(one["loss_curve"], two["loss_curve"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    a = load_file(str(single / "runs" / "cpt" / "model.safetensors"))
    b = load_file(str(runs / "cpt" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"single vs fsdp2: losses {one['loss_curve']} vs {two['loss_curve']}, weights {worst}")
    assert worst < 1e-4, worst


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (the accelerate launcher, its workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"_stage" not in cmdline:
        return None
    return next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _last_complete(checkpoints: Path) -> int:
    return max(
        int(p.parent.name.split("-")[1])
        for p in checkpoints.glob("checkpoint-*/trainer_state.json")
    )


@pytest.mark.slow
def test_fsdp2_run_survives_a_dead_rank_and_a_killed_launch(tmp_path, tiny_model):
    """kill -9 of one rank: the launch fails within seconds (torchrun's monitor stops the other
    rank, which gloo had left waiting on the dead peer) with one line naming the rank. kill -9
    of the whole launch: nothing runs on. Each rerun resumes from the last complete checkpoint
    (model and optimizer saved by FSDP, loaded back onto the shards) and the stage ends as an
    uninterrupted run does."""
    steps = 16
    cpt = {
        "model": str(tiny_model),
        # ~110 packed rows: the 16 steps x 4 rows stay in the first epoch, whose last batch
        # two processes fill up from the start (accelerate's even_batches) and one does not
        "datasets": [{"arith": {"problems": 128}}],
        "trainer": {**TRAINER, "max_steps": steps, "save_steps": 2},
    }
    path = _recipe(tmp_path, {"cpt": cpt}, accelerate_config=FSDP, num_processes=2)
    checkpoints = tmp_path / "runs" / ".upstack" / "work" / "cpt" / "checkpoints"

    # 1. one rank dies
    proc = _upstack(path, _env())
    _wait_for(checkpoints / "checkpoint-4" / "trainer_state.json", proc)
    rank1 = [pid for pid in _descendants(proc.pid) if _rank(pid) == 1]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - killed
    assert proc.returncode == 1 and took < 30, took  # measured: ~1 s
    last = stderr.strip().splitlines()[-1]
    assert "stages.cpt: rank 1 (local rank 1 on " in last, last
    assert "was killed by SIGKILL" in last and "rerun to resume" in last, last
    first = _last_complete(checkpoints)
    assert 4 <= first < steps and not (tmp_path / "runs" / "cpt").exists()

    # 2. the rerun resumes, then the whole launch is killed
    proc = _upstack(path, _env())
    _wait_for(checkpoints / f"checkpoint-{first + 4}" / "trainer_state.json", proc)
    tree = [proc.pid, *_descendants(proc.pid)]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    time.sleep(0.5)
    assert not [pid for pid in tree if Path(f"/proc/{pid}").exists() and _rank(pid) is not None]
    second = _last_complete(checkpoints)
    assert second > first and not (tmp_path / "runs" / "cpt").exists()

    # 3. the last rerun resumes from there and finishes
    result = subprocess.run(
        [sys.executable, "-m", "upstack", "run", str(path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(tmp_path / "runs" / "cpt")
    assert metrics["distributed"] == "fsdp2"
    assert metrics["resumed_from_step"] == second and metrics["steps"] == steps
    resumed = dict(map(tuple, metrics["loss_curve"]))
    assert sorted(resumed) == list(range(1, steps + 1))

    # an uninterrupted run (one process, the same global batch): the resumed steps agree, so
    # the optimizer state and data position came back (tolerance: the comparison above, grown
    # over more steps)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    alone = {**cpt, "trainer": {**cpt["trainer"], "per_device_train_batch_size": 4}}
    run(load_recipe(_recipe(fresh, {"cpt": alone})), ["cpt"])
    reference = dict(map(tuple, _metrics(fresh / "runs" / "cpt")["loss_curve"]))
    worst = max(abs(resumed[s] - reference[s]) for s in range(second + 1, steps + 1))
    print(f"resumed at {second} vs uninterrupted: max loss difference {worst}")
    assert worst < 1e-3, worst
