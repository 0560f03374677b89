"""How torch uses the CPU on a machine it shares: OpenMP threads that sleep when idle, and as many
threads as there are cores nobody else is running on (bench/contention.py measures both)."""

from __future__ import annotations

import os
import time

# set UPSTACK_CPU_POLICY=raw to leave torch and OpenMP as they come (the benchmark's baseline)
RAW = "raw"


def configure_process() -> None:
    """Before torch is imported: OpenMP threads wait passively. Spinning threads (the default)
    each burn a core between parallel regions; beside another busy process they and it take
    turns on the same cores, and a step of the tiny recipe went from 0.5 s to 6 s."""
    if os.environ.get("UPSTACK_CPU_POLICY") == RAW:
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def budget_threads() -> bool:
    """Resize torch's threads while training only where upstack set the wait policy (the CLI) and
    nobody fixed the thread count (OMP_NUM_THREADS, a test's torch.set_num_threads via it)."""
    return (
        os.environ.get("UPSTACK_CPU_POLICY") != RAW
        and os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
        and "OMP_NUM_THREADS" not in os.environ
    )


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def others_running(samples: int = 5, interval: float = 0.02) -> int:
    """Processes of others running right now: /proc/loadavg's runnable count (which includes this
    one thread reading it), the least of a few readings so a passing blip is not counted."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as handle:
                counts.append(int(handle.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0
        time.sleep(interval)
    return max(0, min(counts))


def fair_threads() -> int:
    """Threads for torch now: the cores this process may use that no one else is busy on."""
    return max(1, usable_cpus() - others_running())


def thread_budget(every: int = 20):
    """A TrainerCallback that resizes torch's thread pool to `fair_threads()` every `every` steps,
    so a training run yields cores to a job that starts beside it and takes them back after."""
    import torch
    from transformers import TrainerCallback

    class ThreadBudget(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                threads = fair_threads()
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)

    return ThreadBudget()
