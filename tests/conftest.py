"""Shared fixtures: tiny models built here (never downloaded) and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_recipe(directory: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The real `upstack` command in a subprocess, importing this checkout's sources."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT), full_env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-m", "upstack", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def recipe_from_stages(directory: Path, stages: dict, name: str = "recipe.yaml") -> Path:
    """A recipe file named `t` with these stages, writing under `directory/runs`."""
    path = directory / name
    path.write_text(
        yaml.safe_dump({"name": "t", "output_dir": str(directory / "runs"), "stages": stages})
    )
    return path


@pytest.fixture
def one_torch_thread():
    """A 1.9M-parameter model gains nothing from threads, and two threads on two busy cores
    spin against each other (the tiny model's matmuls ran ~50x slower here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tiny_model(out_dir: Path, **architecture) -> Path:
    """Run the init stage in-process: a locally trained tokenizer and a random tiny Llama."""
    from upstack.recipe import load_recipe
    from upstack.runner import run

    recipe = {
        "name": "tiny-fixture",
        "output_dir": str(out_dir / "runs"),
        "stages": {"init": {"architecture": architecture}},
    }
    path = out_dir / "init.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run(load_recipe(path), ["init"])
    return out_dir / "runs" / "init"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An 8-layer, 1.9M-parameter Llama with a chat template: read it, never write into it."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
