"""Training on a busy CPU: pretraining step time alone and beside a CPU hog, per thread policy.

    .venv/bin/python bench/contention.py [--steps 40] [--repeats 2]

The tiny recipe's pretraining (the 1.9M-parameter Llama, arith text, batch 8, 256 tokens) runs a
fixed number of steps through upstack's cpt stage, each run its own subprocess: once on a quiet
machine and once while another process spins on one core (what a second job, a test suite or a
browser does to a laptop). Policies: torch/OpenMP as they come (`OMP_WAIT_POLICY` unset, the
upstack default before this bench), OpenMP threads that sleep when idle (`PASSIVE`), one thread,
and upstack's own (`upstack`: whatever the CLI sets, see upstack/cpu.py). The ratio busy/quiet per
policy is the number to watch; the quiet column shows what a policy costs when nothing competes.
Writes bench/out/contention.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from upstack.core.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WORK = OUT / "contention"
# env per policy; "raw" asks the CLI to leave threads and OpenMP as torch sets them
POLICIES = {
    "torch default": {"UPSTACK_CPU_POLICY": "raw"},
    "passive wait": {"UPSTACK_CPU_POLICY": "raw", "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"UPSTACK_CPU_POLICY": "raw", "OMP_NUM_THREADS": "1"},
    "upstack": {},
}


def recipe(steps: int) -> Path:
    import yaml

    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "recipe.yaml"
    stages = {
        "init": {},
        "pretrain": {
            "kind": "cpt",
            "model": "init",
            "datasets": [{"arith": {"problems": 2000}}],
            "trainer": {
                "max_steps": steps,
                "per_device_train_batch_size": 8,
                "max_length": 256,
                "learning_rate": 3e-3,
                "logging_steps": steps,
            },
        },
    }
    path.write_text(
        yaml.safe_dump({"name": "contention", "output_dir": str(WORK / "runs"), "stages": stages})
    )
    return path


def one_run(path: Path, env: dict) -> float:
    """Seconds per step of one cpt run in its own process (the trainer loop only)."""
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    result = subprocess.run(
        [sys.executable, "-m", "upstack", "run", str(path), "pretrain", "--force"],
        env={**full, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    metrics = json.loads((WORK / "runs" / "pretrain" / "upstack.json").read_text())["metrics"]
    return metrics["train_seconds"] / metrics["steps"]


def hog() -> subprocess.Popen:
    """Another process busy on one core, for the whole of a run."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    path = recipe(args.steps)
    subprocess.run(
        [sys.executable, "-m", "upstack", "run", str(path), "init"], check=True, capture_output=True
    )

    times: dict[str, dict[str, list[float]]] = {p: {"quiet": [], "busy": []} for p in POLICIES}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        # alternate the order so drift on the machine hits every policy alike
        order = list(POLICIES) if repeat % 2 == 0 else list(reversed(POLICIES))
        for policy in order:
            times[policy]["quiet"].append(one_run(path, POLICIES[policy]))
            spinner = hog()
            try:
                times[policy]["busy"].append(one_run(path, POLICIES[policy]))
            finally:
                spinner.kill()
                spinner.wait()
            print(
                f"  {policy}: quiet {times[policy]['quiet'][-1]:.3f} s/step, busy {times[policy]['busy'][-1]:.3f}",
                flush=True,
            )

    rows, summary = [], {}
    for policy, runs in times.items():
        quiet, busy = min(runs["quiet"]), min(runs["busy"])  # the least disturbed of the repeats
        summary[policy] = {
            "quiet_s_per_step": quiet,
            "busy_s_per_step": busy,
            "busy_over_quiet": busy / quiet,
        }
        rows.append([policy, f"{quiet * 1000:.0f}", f"{busy * 1000:.0f}", f"{busy / quiet:.2f}"])
    print(markdown_table(["policy", "quiet ms/step", "beside a hog ms/step", "busy / quiet"], rows))
    print(
        f"({time.perf_counter() - started:.0f} s, {os.cpu_count()} CPUs, {args.steps} steps per run)"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "contention.json").write_text(
        json.dumps({"steps": args.steps, "runs": times, "summary": summary}, indent=2) + "\n"
    )
    plot(summary, OUT / "contention.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for offset, key, label in (
        (-width / 2, "quiet_s_per_step", "quiet"),
        (width / 2, "busy_s_per_step", "beside a hog"),
    ):
        bars = axis.bar(
            [i + offset for i in range(len(names))],
            [summary[n][key] * 1000 for n in names],
            width,
            label=label,
        )
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_xticks(range(len(names)), names)
    axis.set(ylabel="ms per step", title="tiny pretraining step, 2-core machine")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
