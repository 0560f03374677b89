"""Benchmark: the merge stage's peak memory and time against a naive load-average-save merge.

    .venv/bin/python bench/merge.py                # two ~270M-parameter Llamas (bf16, ~0.55 GB each)
    .venv/bin/python bench/merge.py --size small   # a quick check that the script works

A linear 0.5/0.5 merge of two models (SOLAR-10.7B-Instruct's recipe), run by: the upstack merge
stage (mergekit, tensors loaded lazily, one output shard at a time) with a large and a small
`out_shard_size`, and transformers (load both models, average the state dicts, save). Each runs
in its own process; peak RSS is that process's. Prints a table and ratios, writes
bench/out/merge.json and bench/out/merge.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
SIZES = {
    "270m": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 8000,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=SIZES, default="270m")
    args = parser.parse_args()

    work = OUT / "merge-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    arch = SIZES[args.size]
    sources = [build_model(OUT / f"merge-source-{args.size}-{seed}", arch, seed) for seed in (1, 2)]
    model_bytes = sum(p.stat().st_size for p in sources[0].glob("*.safetensors"))

    contenders = {
        "upstack merge, out_shard_size 5B": upstack_command(work, sources, "5B"),
        "upstack merge, out_shard_size 50M": upstack_command(work, sources, "50M"),
        "transformers load-average-save": (
            [sys.executable, __file__, "_naive", *map(str, sources), str(work / "naive")],
            work / "naive",
        ),
        "imports only (upstack + mergekit)": (
            [sys.executable, "-c", "import upstack.stages.merge, mergekit.merge, transformers"],
            work / "none",
        ),
    }
    results = {}
    for name, (cmd, out_dir) in contenders.items():
        results[name] = measure(cmd)
        results[name]["output_files"] = len(list(out_dir.glob("*.safetensors")))
        shutil.rmtree(out_dir, ignore_errors=True)
    report(results, arch, model_bytes)


def upstack_command(work: Path, sources: list[Path], shard_size: str) -> tuple[list[str], Path]:
    name = f"shard{shard_size}"
    recipe = work / f"{name}.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": name,
                "output_dir": str(work / name),
                "stages": {
                    "merge": {
                        "merge_method": "linear",
                        "out_shard_size": shard_size,
                        "models": [
                            {"model": str(sources[0]), "parameters": {"weight": 0.5}},
                            {"model": str(sources[1]), "parameters": {"weight": 0.5}},
                        ],
                    }
                },
            }
        )
    )
    return [sys.executable, "-m", "upstack", "run", str(recipe), "merge"], work / name / "merge"


def build_model(path: Path, arch: dict, seed: int) -> Path:
    """A random-weight bf16 Llama checkpoint, written one tensor group at a time."""
    if (path / "config.json").is_file():
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **arch, tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"]
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {
        k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16)
        for k, s in shapes.items()
    }
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tmp.rename(path)
    return path


def naive(first: str, second: str, out_dir: str) -> None:
    """What a merge looks like without mergekit: both models whole in memory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(first, dtype="auto")
    other = AutoModelForCausalLM.from_pretrained(second, dtype="auto").state_dict()
    merged = {k: (v + other[k]) / 2 for k, v in model.state_dict().items()}
    model.load_state_dict(merged)
    model.save_pretrained(out_dir)


def measure(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one command, run in a fresh wrapper so only it is counted."""
    probe = (
        "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
        "print(json.dumps({'seconds': time.perf_counter() - t, 'returncode': code, "
        "'peak_rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin"}
    output = subprocess.run(
        [sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, check=True
    ).stdout
    result = json.loads(output)
    if result["returncode"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return {
        "seconds": round(result["seconds"], 2),
        "peak_rss_gb": round(result["peak_rss_kb"] / 2**20, 3),
    }


def report(results: dict, arch: dict, model_bytes: int) -> None:
    from upstack.core.tables import markdown_table

    model_gb = model_bytes / 2**30
    naive_rss = results["transformers load-average-save"]["peak_rss_gb"]
    rows = [
        [
            name,
            r["seconds"],
            r["peak_rss_gb"],
            f"{r['peak_rss_gb'] / model_gb:.2f}",
            f"{r['peak_rss_gb'] / naive_rss:.2f}",
            r["output_files"],
        ]
        for name, r in results.items()
    ]
    print(f"linear merge of two models of {model_gb:.2f} GiB each ({arch})")
    print(
        markdown_table(
            [
                "contender",
                "seconds",
                "peak RSS GiB",
                "RSS / one model",
                "RSS / naive",
                "output shards",
            ],
            rows,
        )
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "merge.json").write_text(
        json.dumps({"arch": arch, "model_gib": model_gb, "results": results}, indent=2)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 3.5))
    names = list(results)
    bars = axis.barh(names, [results[n]["peak_rss_gb"] for n in names])
    axis.bar_label(bars, fmt="%.2f GiB")
    axis.axvline(model_gb, color="gray", linestyle="--", label="one input model")
    axis.set_xlabel("peak RSS (GiB)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(OUT / "merge.png", dpi=100)
    print(f"wrote {OUT / 'merge.json'} and {OUT / 'merge.png'}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_naive":
        naive(*sys.argv[2:])
    else:
        main()
