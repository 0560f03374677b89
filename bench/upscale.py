"""Benchmark: upstack's upscale stage against the mergekit CLI, a plain copy and a naive transformers load-copy-save.

    .venv/bin/python bench/upscale.py                 # ~1.1B Llama (TinyLlama shape), bf16: ~10 GB of disk
    .venv/bin/python bench/upscale.py --size small    # a quick check that the script works

Each contender runs in its own process, timed and measured (peak RSS of that process tree) by a
fresh wrapper process, one after the other on the same source model, with `sync` between them.
Prints a table and ratios, writes bench/out/upscale.json and bench/out/upscale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
BIN = Path(sys.executable).parent
SIZES = {
    # TinyLlama-1.1B's shape: 1.1B parameters, 2.2 GB in bf16
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
TARGETS = {"upstack / mergekit time": 1.2, "upstack / copy time": 2.0, "upstack peak RSS GiB": 1.5}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument("--hidden", type=int, help="override hidden_size (intermediate = 2.75x)")
    parser.add_argument("--drop-layers", type=int, help="DUS m; default n/4 (SOLAR: 8 of 32)")
    parser.add_argument(
        "--shard-size", default="500MB", help="output shard size for every contender"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per contender: fastest time, largest memory"
    )
    args = parser.parse_args()

    arch = dict(SIZES[args.size])
    if args.layers:
        arch["num_hidden_layers"] = args.layers
    if args.hidden:
        arch["hidden_size"] = args.hidden
        arch["intermediate_size"] = int(args.hidden * 2.75) // 64 * 64
    n = arch["num_hidden_layers"]
    drop = args.drop_layers if args.drop_layers is not None else n // 4
    layer_map = list(range(n - drop)) + list(range(drop, n))

    work = OUT / "upscale-work"
    source = OUT / ("upscale-source-" + "-".join(str(v) for v in arch.values()))
    build_source(source, arch)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    recipe = work / "bench.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "bench",
                "output_dir": str(work / "runs"),
                "stages": {
                    "upscale": {
                        "model": str(source),
                        "drop_layers": drop,
                        "shard_size": args.shard_size,
                    }
                },
            }
        )
    )
    upstack = (
        [sys.executable, "-m", "upstack", "run", str(recipe), "upscale", "--force"],
        work / "runs" / "upscale",
    )
    config = work / "mergekit_config.yml"
    runs: dict[str, list[dict]] = {}
    # Round-robin: every contender once per round, so each sees the shared machine's load alike.
    for _ in range(args.repeat):
        runs.setdefault("upstack", []).append(measure(*upstack))
        if not config.exists():
            shutil.copy(upstack[1] / "mergekit_config.yml", config)
        out_bytes = runs["upstack"][0]["output_bytes"]
        clean(upstack[1])
        for name, (cmd, out_dir) in others(
            source, work, config, out_bytes, layer_map, args.shard_size
        ).items():
            runs.setdefault(name, []).append(measure(cmd, out_dir))
            clean(out_dir)
    results = {name: summarize(r) for name, r in runs.items()}
    report(results, arch, drop, layer_map, args.shard_size)


def others(
    source: Path, work: Path, config: Path, out_bytes: int, layer_map: list[int], shard_size: str
) -> dict:
    """The contenders besides upstack: name -> (command, its output dir)."""
    from upstack.models.checkpoints import parse_size

    return {
        "mergekit CLI": (
            [
                str(BIN / "mergekit-yaml"),
                str(config),
                str(work / "mergekit"),
                "--clone-tensors",
                "--copy-tokenizer",
                "--out-shard-size",
                str(parse_size(shard_size)),
            ],
            work / "mergekit",
        ),
        "plain copy": (
            [sys.executable, __file__, "_copy", str(source), str(work / "copy"), str(out_bytes)],
            work / "copy",
        ),
        "transformers load-copy-save": (
            [
                sys.executable,
                __file__,
                "_naive",
                str(source),
                str(work / "naive"),
                json.dumps(layer_map),
                shard_size,
            ],
            work / "naive",
        ),
        # the fixed cost in every Python contender: interpreter, torch, transformers, mergekit
        "imports only": (
            [sys.executable, "-c", "import upstack.commands.cli, mergekit.merge, transformers"],
            work / "none",
        ),
    }


# --------------------------------------------------------------------------- the source model


def build_source(path: Path, arch: dict) -> None:
    """A random-weight Llama written shard by shard: never the whole model in memory."""
    if (path / "model.safetensors.index.json").is_file():
        return
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from upstack.stages.init import Tokenizer, build_tokenizer

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(
        **arch, tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"]
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shard: dict = {}
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for key, shape in shapes.items():
        shard[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        total += shard[key].numel() * 2
        if sum(t.numel() * 2 for t in shard.values()) > 1_000_000_000:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(tmp)
    build_tokenizer(Tokenizer(corpus_problems=500), seed=0).save_pretrained(tmp)
    tmp.rename(path)
    print(f"built {path.name}: {total / 1e9:.2f} GB", file=sys.stderr)


# --------------------------------------------------------------------------- measuring


def measure(cmd: list[str], out_dir: Path) -> dict:
    """Run `cmd` under a fresh wrapper process: wall time and memory of its process tree."""
    clean(out_dir)
    os.sync()  # the previous run's dirty pages are not this one's to write
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    print(f"--> {' '.join(cmd[:4])} ...", file=sys.stderr, flush=True)
    result = subprocess.run(
        [sys.executable, __file__, "_measure", *cmd],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    stats["output_bytes"] = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return stats


def summarize(runs: list[dict]) -> dict:
    """The fastest time (the machine is shared: slower runs measure the neighbours), the largest memory."""
    return {
        "seconds": min(r["seconds"] for r in runs),
        "all_seconds": [r["seconds"] for r in runs],
        "cpu_seconds": min(r["cpu_seconds"] for r in runs),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "peak_anon_bytes": max(r["peak_anon_bytes"] for r in runs),
        "output_bytes": runs[0]["output_bytes"],
    }


def _measure(cmd: list[str]) -> None:
    """Time `cmd`; its peak RSS (kernel's count, includes mapped file pages) and peak anonymous memory
    (RSS minus file-backed pages: what the process itself allocated), summed over its process tree."""
    import psutil

    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=sys.stderr)
    root = psutil.Process(child.pid)
    peak_anon = 0
    while child.poll() is None:
        anon = 0
        try:
            for proc in [root, *root.children(recursive=True)]:
                info = proc.memory_info()
                anon += info.rss - info.shared
        except psutil.Error:
            pass  # a process ended between listing and reading
        peak_anon = max(peak_anon, anon)
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    if child.returncode:
        sys.exit(child.returncode)
    # RUSAGE_CHILDREN: the largest RSS any waited-for descendant reached (Linux reports KiB)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss * 1024
    # CPU seconds barely move with the neighbours' load, unlike wall time: compare both
    cpu = usage.ru_utime + usage.ru_stime
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "peak_rss_bytes": peak,
                "peak_anon_bytes": peak_anon,
                "cpu_seconds": round(cpu, 2),
            }
        )
    )


def _copy(source: str, out: str, total: str) -> None:
    """The disk's limit: copy the source's shards, round and round, until as many bytes are written."""
    shards = sorted(Path(source).glob("*.safetensors"))
    Path(out).mkdir(parents=True)
    left, i = int(total), 0
    while left > 0:
        shard = shards[i % len(shards)]
        with shard.open("rb") as src, (Path(out) / f"{i:05d}.safetensors").open("wb") as dst:
            if shard.stat().st_size <= left:
                shutil.copyfileobj(src, dst, 16 << 20)
                left -= shard.stat().st_size
            else:
                dst.write(src.read(left))
                left = 0
        i += 1


def _naive(source: str, out: str, layer_map: str, shard_size: str) -> None:
    """What one writes without mergekit: load everything, deepcopy layers, save."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(
        copy.deepcopy(layers[j]) for j in json.loads(layer_map)
    )
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(model.model.layers)
    model.save_pretrained(out, max_shard_size=shard_size)


def clean(out_dir: Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)


# --------------------------------------------------------------------------- report


def report(results: dict, arch: dict, drop: int, layer_map: list[int], shard_size: str) -> None:
    gib = 1024**3
    up = results["upstack"]
    print(
        f"\nDUS of a {arch['num_hidden_layers']}-layer Llama (hidden {arch['hidden_size']}, bf16), m={drop} -> "
        f"{len(layer_map)} layers; shards {shard_size}; {os.cpu_count()} cores\n"
    )
    print(
        "| contender | wall s (all runs) | CPU s | peak RSS GiB | peak anon GiB | output GB | wall / upstack |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        runs = ", ".join(f"{t:.0f}" for t in r["all_seconds"])
        print(
            f"| {name} | {r['seconds']:.1f} ({runs}) | {r['cpu_seconds']:.1f} | {r['peak_rss_bytes'] / gib:.2f} "
            f"| {r['peak_anon_bytes'] / gib:.2f} | {r['output_bytes'] / 1e9:.2f} | {r['seconds'] / up['seconds']:.2f} |"
        )
    imports = results["imports only"]["seconds"]
    ratios = {
        "upstack / mergekit time": up["seconds"] / results["mergekit CLI"]["seconds"],
        "upstack / copy time": up["seconds"] / results["plain copy"]["seconds"],
        # the Python, torch, transformers and mergekit imports, paid by upstack and the mergekit CLI alike
        "upstack minus imports / copy time": (up["seconds"] - imports)
        / results["plain copy"]["seconds"],
        "upstack / mergekit CPU": up["cpu_seconds"] / results["mergekit CLI"]["cpu_seconds"],
        "upstack / copy CPU": up["cpu_seconds"] / results["plain copy"]["cpu_seconds"],
        "upstack peak RSS GiB": up["peak_rss_bytes"] / gib,
        # RSS counts the pages of the source shard mergekit has mapped (reclaimable page cache);
        # anonymous memory is what the merge itself allocated
        "upstack peak anon GiB": up["peak_anon_bytes"] / gib,
        "upstack / mergekit RSS": up["peak_rss_bytes"] / results["mergekit CLI"]["peak_rss_bytes"],
        "upstack / naive time": up["seconds"] / results["transformers load-copy-save"]["seconds"],
        "upstack / naive RSS": up["peak_rss_bytes"]
        / results["transformers load-copy-save"]["peak_rss_bytes"],
    }
    print("\n| ratio | value | target |")
    print("|---|---:|---|")
    for name, value in ratios.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"< {target}: {'met' if value < target else 'MISSED'}"
        print(f"| {name} | {value:.2f} | {verdict} |")

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "upscale.json").write_text(
        json.dumps(
            {
                "architecture": arch,
                "drop_layers": drop,
                "layers_after": len(layer_map),
                "shard_size": shard_size,
                "cpu_count": os.cpu_count(),
                "results": results,
                "ratios": ratios,
                "targets": TARGETS,
            },
            indent=2,
        )
    )
    plot(results)
    print(f"\nwrote {OUT / 'upscale.json'} and {OUT / 'upscale.png'}")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    rows = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    left.barh(
        [r - 0.2 for r in rows],
        [results[n]["seconds"] for n in names],
        0.4,
        label="wall (fastest run)",
    )
    left.barh(
        [r + 0.2 for r in rows],
        [results[n]["cpu_seconds"] for n in names],
        0.4,
        label="CPU (user+sys)",
    )
    left.set_xlabel("seconds")
    gib = 1024**3
    right.barh(
        [r - 0.2 for r in rows],
        [results[n]["peak_rss_bytes"] / gib for n in names],
        0.4,
        label="peak RSS (incl. mapped source pages)",
    )
    right.barh(
        [r + 0.2 for r in rows],
        [results[n]["peak_anon_bytes"] / gib for n in names],
        0.4,
        label="peak anonymous (allocated)",
    )
    right.axvline(
        TARGETS["upstack peak RSS GiB"], color="gray", linestyle="--", label="1.5 GiB target"
    )
    right.set_xlabel("GiB")
    left.set_yticks(list(rows), names)
    left.invert_yaxis()
    for axis in (left, right):
        axis.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        "upscale (DUS), each contender in its own process: upstack vs mergekit CLI vs copy vs transformers"
    )
    fig.tight_layout()
    fig.savefig(OUT / "upscale.png", dpi=120)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_measure", "_copy", "_naive"):
        mode, rest = sys.argv[1], sys.argv[2:]
        {
            "_measure": lambda: _measure(rest),
            "_copy": lambda: _copy(*rest),
            "_naive": lambda: _naive(*rest),
        }[mode]()
    else:
        main()
