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
    from upstack.core.recipe import load_recipe
    from upstack.core.runner import run

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


# The small architecture the mergekit tests merge: four layers, so a gradient has four positions.
SMALL_ARCHITECTURE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def moved_copy(model_dir: Path, out_dir: Path, seed: int, scale: float = 0.02) -> Path:
    """A copy of a model with every weight moved: a stand-in for a fine-tuned variant."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out_dir, ignore=shutil.ignore_patterns("upstack.json"))
    generator = torch.Generator().manual_seed(seed)
    for shard in out_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        moved = {
            k: v + scale * torch.randn(v.shape, generator=generator) for k, v in tensors.items()
        }
        save_file(moved, shard, metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="session")
def merge_zoo(tmp_path_factory) -> dict[str, Path]:
    """Tiny local models to merge (read them, never write into them): `base`; `a`, `b`, `c`, its
    fine-tuned stand-ins; `wide`, the same architecture with a tokenizer of another vocabulary;
    `lora`, a LoRA adapter of `base` (peft, random nonzero B so it changes the weights)."""
    from upstack.core.recipe import load_recipe
    from upstack.core.runner import run

    root = tmp_path_factory.mktemp("merge_zoo")
    recipe = recipe_from_stages(
        root,
        {
            "base": {
                "kind": "init",
                "tokenizer": {"corpus_problems": 100, "vocab_size": 400},
                "architecture": SMALL_ARCHITECTURE,
            },
            "wide_init": {
                "kind": "init",
                "tokenizer": {"corpus_problems": 300, "vocab_size": 470},
                "architecture": SMALL_ARCHITECTURE,
            },
        },
    )
    run(load_recipe(recipe), [])
    base = root / "runs" / "base"
    zoo = {"base": base}
    for seed, name in enumerate(("a", "b", "c"), 1):
        zoo[name] = moved_copy(base, root / name, seed)
    zoo["wide"] = moved_copy(root / "runs" / "wide_init", root / "wide", 4)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, lora).save_pretrained(root / "lora")
    zoo["lora"] = root / "lora"
    return zoo
