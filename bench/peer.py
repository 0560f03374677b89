"""The PEER layer as its expert count grows: time per token and peak memory beside a dense FFN of
the same active width, side by side.

    PYTHONPATH=src:. .venv/bin/python bench/peer.py [--tokens 2048] [--repeats 5]

One PEER layer (upstack.models.modeling_peer.PEER: hidden 256, 8 heads x top 16 = 128 active
neurons a token, key_dim 128, batch-normed queries) with N = 64^2, 128^2, 256^2 and 512^2
experts, against a dense FFN of 128 neurons (d -> 128 -> d, GELU: what the retrieved neurons
compute, without the retrieval), and, to show the cost PEER avoids, the scores of all N experts
(x times the N x d table, per token). Each measurement runs in its own subprocess, one thread:
the time of a forward pass (inference, no gradient) and of a forward and backward pass (training)
per token, the median of `--repeats`; the peak memory of one inference forward over `--tokens`
tokens above what the layer's parameters hold (the rise of the process's peak RSS). Writes
bench/out/peer.json and bench/out/peer.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
HIDDEN = 256
HEADS, TOP_K, KEY_DIM = 8, 16, 128  # h k = 128 neurons a token
EXPERTS = [64**2, 128**2, 256**2, 512**2]
NAIVE_TOKENS = 128  # all N scores of a token: a tokens x N matrix, so fewer tokens


def build(kind: str, experts: int):
    import torch

    from upstack.models.modeling_peer import PEER

    torch.manual_seed(0)
    if kind == "dense":
        return torch.nn.Sequential(
            torch.nn.Linear(HIDDEN, HEADS * TOP_K, bias=False),
            torch.nn.GELU(),
            torch.nn.Linear(HEADS * TOP_K, HIDDEN, bias=False),
        )
    settings = {"experts": experts, "heads": HEADS, "top_k": TOP_K, "key_dim": KEY_DIM}
    layer = PEER(HIDDEN, settings)
    with torch.no_grad():
        layer.up.normal_(std=HIDDEN**-0.5)  # a trained branch: v no longer 0
    return layer


def forward(kind: str, layer, x):
    if kind == "naive":  # every expert's neuron input: the N x d product per token
        return x @ layer.down.T
    return layer(x)


def measure_one(kind: str, experts: int, tokens: int, repeats: int) -> dict:
    """In this process: peak memory of one forward first (before anything else raises the peak),
    then the timings."""
    import psutil
    import torch

    torch.set_num_threads(1)
    layer = build(kind, experts).eval()
    tokens = NAIVE_TOKENS if kind == "naive" else tokens
    x = torch.randn(tokens, HIDDEN)
    with torch.no_grad():
        forward(kind, layer, x[:2])  # the kernels' own first-call allocations
    rss = psutil.Process().memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        forward(kind, layer, x)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_mb = max(0, peak_after - max(rss, peak_before)) / 2**20

    def timed(train: bool) -> float:
        layer.train(train)
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            if train:
                forward(kind, layer, x.requires_grad_()).sum().backward()
            else:
                with torch.no_grad():
                    forward(kind, layer, x)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - start)
        return statistics.median(times) / tokens * 1e6  # microseconds per token

    params = sum(p.numel() for p in layer.parameters())
    result = {
        "kind": kind,
        "experts": experts,
        "tokens": tokens,
        "parameters": params,
        "forward_us_per_token": timed(False),
        "peak_mb": peak_mb,
    }
    if kind != "naive":
        result["train_us_per_token"] = timed(True)
    return result


def run_one(kind: str, experts: int, tokens: int, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, __file__, "--one", kind, str(experts), str(tokens), str(repeats)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, experts, tokens, repeats = args.one
        print(json.dumps(measure_one(kind, int(experts), int(tokens), int(repeats))))
        return 0
    from upstack.core.tables import markdown_table

    dense = run_one("dense", 0, args.tokens, args.repeats)
    rows, runs = [], {"dense": dense, "peer": [], "naive": []}
    for experts in EXPERTS:
        peer, naive = (run_one(k, experts, args.tokens, args.repeats) for k in ("peer", "naive"))
        runs["peer"].append(peer)
        runs["naive"].append(naive)
        first = runs["peer"][0]
        rows.append(
            [
                f"{round(experts**0.5)}^2 = {experts:,}",
                f"{peer['parameters'] / 1e6:.1f}M",
                f"{peer['forward_us_per_token']:.2f}",
                f"{peer['forward_us_per_token'] / dense['forward_us_per_token']:.1f}x",
                f"{peer['forward_us_per_token'] / first['forward_us_per_token']:.2f}x",
                f"{peer['train_us_per_token'] / dense['train_us_per_token']:.1f}x",
                f"{peer['peak_mb']:.1f}",
                f"{peer['peak_mb'] / max(dense['peak_mb'], 0.1):.1f}x",
                f"{naive['forward_us_per_token'] / first['forward_us_per_token']:.2f}x",
                f"{experts / EXPERTS[0]:.0f}x",
            ]
        )
    headers = [
        "experts N",
        "PEER params",
        "PEER fwd us/token",
        "fwd vs dense",
        "fwd vs N=64^2",
        "fwd+bwd vs dense",
        "PEER peak MB",
        "peak vs dense",
        "all-N scores vs PEER N=64^2",
        "N vs 64^2",
    ]
    table = markdown_table(headers, rows)
    print(
        f"PEER layer, hidden {HIDDEN}, {HEADS} heads x top {TOP_K} = {HEADS * TOP_K} active "
        f"neurons, key_dim {KEY_DIM}; dense FFN of {HEADS * TOP_K} neurons: "
        f"{dense['forward_us_per_token']:.2f} us/token forward, {dense['peak_mb']:.1f} MB peak "
        f"({args.tokens} tokens, one thread)\n"
    )
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    record = {
        "hidden": HIDDEN,
        "heads": HEADS,
        "top_k": TOP_K,
        "key_dim": KEY_DIM,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores, one thread used",
        "runs": runs,
        "table": table,
    }
    (OUT / "peer.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(runs, OUT / "peer.png")
    print("\nwrote bench/out/peer.json, bench/out/peer.png")
    return 0


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [run["experts"] for run in runs["peer"]]
    time_axis.plot(
        xs, [r["forward_us_per_token"] for r in runs["peer"]], "o-", label="PEER forward"
    )
    time_axis.plot(xs, [r["train_us_per_token"] for r in runs["peer"]], "o-", label="PEER fwd+bwd")
    time_axis.plot(
        xs, [r["forward_us_per_token"] for r in runs["naive"]], "s--", label="all N scores"
    )
    for key, label in (
        ("forward_us_per_token", "dense forward"),
        ("train_us_per_token", "dense fwd+bwd"),
    ):
        time_axis.axhline(runs["dense"][key], linestyle=":", color="gray")
        time_axis.annotate(label, (xs[0], runs["dense"][key]), fontsize=8)
    memory_axis.plot(xs, [r["peak_mb"] for r in runs["peer"]], "o-", label="PEER forward")
    memory_axis.axhline(
        runs["dense"]["peak_mb"], linestyle=":", color="gray", label="dense forward"
    )
    for axis in (time_axis, memory_axis):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("experts N")
        axis.legend(fontsize=8)
    time_axis.set_yscale("log")
    time_axis.set_ylabel("microseconds per token (one thread)")
    memory_axis.set_ylabel("peak MB above the parameters")
    time_axis.set_title("time per token")
    memory_axis.set_title("peak memory of one forward")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
