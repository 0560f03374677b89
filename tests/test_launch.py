"""Training stages under `accelerate launch`: two CPU processes (gloo), one output, one manifest."""

import json

import pytest
import yaml
from conftest import ROOT, run_cli


@pytest.mark.slow
def test_sft_with_two_processes_writes_one_output(tmp_path, tiny_model):
    # The shipped DDP config; on a machine without GPUs the workers fall back to CPU and gloo.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "output_dir": str(tmp_path / "runs"),
                "stages": {
                    "sft": {
                        "model": str(tiny_model),
                        "datasets": [{"arith": {"problems": 64}}],
                        "trainer": {
                            "max_steps": 6,
                            "per_device_train_batch_size": 4,
                            "learning_rate": 3e-3,
                            "max_length": 128,
                            "logging_steps": 1,
                        },
                    }
                },
            }
        )
    )
    result = run_cli(
        "run",
        str(recipe),
        "sft",
        cwd=tmp_path,
        timeout=300,
        env={
            "ACCELERATE": str(ROOT / "recipes/accelerate/ddp.yaml"),
            "NPROC": "2",
            "OMP_NUM_THREADS": "1",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [".upstack", "sft"]
    assert not list((runs / ".upstack" / "tmp").iterdir())  # no temp dirs left
    assert len(list(runs.rglob("upstack.json"))) == 1
    out = runs / "sft"
    assert not (out / ".metrics.json").exists() and len(list(out.glob("*.safetensors"))) == 1
    metrics = json.loads((out / "upstack.json").read_text())["metrics"]
    assert metrics["processes"] == 2 and metrics["steps"] == 6
    # Both ranks consumed data: 6 steps x 4 rows x 2 processes = 48 of 64 rows, not 24.
    assert metrics["epochs"] == pytest.approx(48 / 64)
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses


@pytest.mark.slow
def test_a_workers_mistake_is_the_launchers_one_line_error(tmp_path, tiny_model):
    """A bad data line found inside the accelerate workers comes back as the run's one-line
    error (file and line, the recipe key), exit 2, not as a RuntimeError with a traceback."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": }\n')
    recipe = tmp_path / "recipe.yaml"
    stage = {
        "model": str(tiny_model),
        "datasets": [{"path": str(data)}],
        "trainer": {"max_steps": 1},
    }
    recipe.write_text(
        yaml.safe_dump(
            {"name": "t", "output_dir": str(tmp_path / "runs"), "stages": {"sft": stage}}
        )
    )
    result = run_cli(
        "run",
        str(recipe),
        cwd=tmp_path,
        timeout=300,
        env={"NPROC": "2", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "stages.sft.datasets.0.path: " in last
    assert f"{data}:2: not valid JSON" in last
    assert not (tmp_path / "runs" / "sft").exists()


@pytest.mark.slow
def test_seam_only_training_with_two_processes(tmp_path, tiny_model):
    """DDP (gloo) over a DUS model with only its seam trainable, in full and with LoRA: the
    frozen parameters take no part in the gradient all-reduce and come out bit-identical; the
    seam layers train."""
    import torch
    from safetensors.torch import load_file

    seam = {
        "datasets": [{"arith": {"problems": 64}}],
        "train_layers": "seam",
        "trainer": {
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "learning_rate": 3e-3,
            "max_length": 64,
            "logging_steps": 1,
        },
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "output_dir": str(tmp_path / "runs"),
                "stages": {
                    "up": {"kind": "upscale", "model": str(tiny_model), "drop_layers": 3},
                    "cpt": {"model": "up", **seam},
                    "lora": {"kind": "cpt", "model": "up", "adapter": {"r": 4}, **seam},
                },
            }
        )
    )
    result = run_cli(
        "run",
        str(recipe),
        cwd=tmp_path,
        timeout=300,
        env={
            "ACCELERATE": str(ROOT / "recipes/accelerate/ddp.yaml"),
            "NPROC": "2",
            "OMP_NUM_THREADS": "1",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs"
    metrics = json.loads((runs / "cpt" / "upstack.json").read_text())["metrics"]
    assert metrics["processes"] == 2
    trained = metrics["trained"]
    assert trained["layers"] == [4, 5] and trained["embeddings"] is False
    assert trained["optimizer_state_parameters"] == trained["parameters_trainable"]
    before = load_file(str(runs / "up" / "model.safetensors"))
    for stage in ("cpt", "lora"):
        after = load_file(str(runs / stage / "model.safetensors"))
        for name, tensor in before.items():
            seam = name.startswith(("model.layers.4.", "model.layers.5."))
            trains = seam and (stage == "cpt" or name.endswith("proj.weight"))
            assert torch.equal(after[name], tensor) != trains, (stage, name)
    lora = json.loads((runs / "lora" / "upstack.json").read_text())["metrics"]
    assert lora["processes"] == 2 and lora["trained"]["adapter"] == "lora"


@pytest.mark.slow
def test_two_machines_write_one_output_from_the_main_one(tmp_path, tiny_model):
    """Two "machines" on 127.0.0.1 (num_machines 2, one process each, NODE_RANK 0 and 1) train
    one cpt stage together into one output dir: one stage dir, one manifest, both ranks'
    data; machine 1 writes no stage dir, manifest, lock or temp dir."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stage = {
        "model": str(tiny_model),
        "datasets": [{"arith": {"problems": 64}}],
        "trainer": {
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "max_length": 64,
            "logging_steps": 1,
        },
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "output_dir": str(tmp_path / "runs"),
                # the recipe's keys; env NNODES/NODE_RANK/MASTER_* would override them
                "launch": {
                    "num_machines": 2,
                    "main_process_ip": "127.0.0.1",
                    "main_process_port": port,
                },
                "stages": {"cpt": stage},
            }
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE": str(ROOT / "recipes/accelerate/ddp.yaml"),
        "NPROC": "1",
    }
    machines = [
        subprocess.Popen(
            [sys.executable, "-m", "upstack", "run", str(recipe)],
            env={**env, "NODE_RANK": str(rank)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=300) for machine in machines]
    for machine, (_, err) in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, err[-3000:]
    assert "machine 1 of 2: runs its ranks of cpt; machine 0 writes the outputs" in outputs[1][1]
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [".upstack", "cpt"]
    assert [p.parent.name for p in runs.rglob("upstack.json")] == ["cpt"]
    assert not list((runs / ".upstack" / "tmp").iterdir())
    metrics = json.loads((runs / "cpt" / "upstack.json").read_text())["metrics"]
    assert metrics["processes"] == 2 and metrics["distributed"] == "ddp" and metrics["steps"] == 3
    # the manifest's status table is machine 0's alone; machine 1 printed none
    assert "| cpt" in outputs[0][0] and outputs[1][0] == ""
