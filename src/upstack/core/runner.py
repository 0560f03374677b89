"""Runs a recipe's stages in dependency order: skip what is up to date, write atomically, leave a manifest."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import Any

from upstack.core import logs, outputs, registry, signals
from upstack.core.context import StageContext
from upstack.core.errors import Interrupted, StageFailed, UserError
from upstack.core.hashing import stage_hashes
from upstack.core.recipe import Recipe, accelerate_config_problem, locate
from upstack.core.rundir import TRACEBACK, WORKER_ERROR, WORKER_METRICS, RunDir
from upstack.core.settings import StageSpec
from upstack.core.tables import short

PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "mergekit",
    "math-verify",
    "huggingface_hub",
    "upstack",
)


# --------------------------------------------------------------------------- state


def states(recipe: Recipe, hashes: dict[str, str] | None = None) -> dict[str, str]:
    """Every stage's state: done, stale, failed or missing (upstack.core.rundir.RunDir.state)."""
    hashes = hashes or stage_hashes(recipe)
    return {name: recipe.run_dir.state(name, hashes[name]) for name in recipe.order()}


def plan(recipe: Recipe, targets: list[str], force: bool = False) -> list[str]:
    """Stages to run, in order: the targets (all stages if none) and any dependency not done."""
    state = states(recipe)
    wanted = recipe.resolve_targets(targets) if targets else list(recipe.stages)
    chosen: set[str] = set()

    def need(name: str, is_target: bool) -> None:
        if name in chosen:
            return
        if (is_target and force) or state[name] != "done":
            chosen.add(name)
            for dep in recipe.deps(name):
                need(dep, False)

    for name in wanted:
        need(name, True)
    return [n for n in recipe.order() if n in chosen]


# --------------------------------------------------------------------------- running


def run(
    recipe: Recipe,
    targets: list[str],
    force: bool = False,
    dry_run: bool = False,
    fit_check: bool = True,
) -> list[str]:
    if nodes(recipe)["machine_rank"] > 0:
        return secondary_node(recipe, targets, force, dry_run)
    check_output_dir(recipe)
    steps = plan(recipe, targets, force)
    check_ownership(recipe, steps)
    check_launch_config(recipe, steps)
    preflight(recipe, steps)
    if fit_check and recipe.launch.fit_check:
        check_fit(recipe, steps)
    if dry_run or not steps:
        state = states(recipe)
        for name in recipe.resolve_targets(targets) if targets else recipe.stages:
            if name not in steps:
                print(f"up to date: {name}", file=sys.stderr)
        for i, name in enumerate(steps, 1):
            print(
                f"would run [{i}/{len(steps)}] {name} ({recipe.stages[name].kind}, {state[name]})"
            )
        return steps

    make_output_dir(recipe)
    with recipe.run_dir.lock():
        check_ownership(recipe, steps)  # again, now that no other run can change it
        recipe.run_dir.claim(recipe.name)
        recipe.run_dir.clear_leftovers()  # from a run that was killed
        hashes = stage_hashes(recipe)
        for i, name in enumerate(steps, 1):
            print(
                f"==> [{i}/{len(steps)}] {name} ({recipe.stages[name].kind})",
                file=sys.stderr,
                flush=True,
            )
            _run_stage(recipe, name, hashes)
    return steps


def check_output_dir(recipe: Recipe) -> None:
    """Before anything runs: the output dir is a dir, or can become one, that we may write."""
    out = recipe.out_dir
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise UserError(f"{locate(recipe, 'output_dir')}: output_dir ({out}): {problem}")


def check_ownership(recipe: Recipe, steps: list[str]) -> None:
    """Before anything is written: the output dir is this recipe's (or no one's), and no stage
    about to run would replace a directory upstack did not write for this recipe (a user's
    `eval/` beside `output_dir: .`, another recipe's stage of the same name)."""
    problem = recipe.run_dir.check_owner(recipe.name)
    if problem:
        raise UserError(f"{locate(recipe, 'output_dir')}: output_dir: {problem}")
    for name, why in recipe.run_dir.not_ours(recipe.name, steps):
        raise UserError(
            f"{locate(recipe, 'stages', name)}: stages.{name}: {why}, and running the stage "
            "would replace it: move it, rename the stage, or set output_dir elsewhere"
        )


def make_output_dir(recipe: Recipe) -> None:
    """Create the output dir and write in it once: what os.access cannot tell (a read-only
    mount, root on a network share) fails here, before the first stage."""
    out = recipe.out_dir
    try:
        recipe.run_dir.internal.mkdir(parents=True, exist_ok=True)
        probe = recipe.run_dir.internal / f"write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"{locate(recipe, 'output_dir')}: output_dir ({out}): cannot write: "
            f"{err.strerror or err}"
        ) from None


def preflight(recipe: Recipe, steps: list[str]) -> None:
    """Let each stage raise the UserErrors that need its inputs (a source model's layer count, say)
    before anything is written. A module opts in with `preflight(spec, ctx)`; `ctx.pending` are
    the stages this run (re)builds, whose current outputs must not be trusted. Preflights run on
    --dry-run too, so they must stay offline and cheap."""
    hashes = stage_hashes(recipe)
    for name in steps:
        spec = recipe.stages[name]
        registry.kind(spec.kind).preflight(
            spec, context(recipe, name, hashes[name], frozenset(steps))
        )


def check_fit(recipe: Recipe, steps: list[str]) -> None:
    """Before anything is written: each planned stage's `plan` hook on the GPUs training runs on
    (`launch.gpus`, else this machine's: upstack.core.hardware.run_machine); a stage whose
    memory per GPU exceeds theirs is refused in one line, not met as an out-of-memory error
    hours in. Nothing to check on a machine without GPUs that declares none."""
    from upstack.core.hardware import run_machine

    machine = run_machine(recipe.launch)
    if machine is None:
        return
    hashes = stage_hashes(recipe)
    for name in steps:
        spec = recipe.stages[name]
        if not registry.kind(spec.kind).launchable:  # what trains on the GPUs
            continue
        ctx = context(recipe, name, hashes[name], frozenset(steps))
        ctx.machine = machine
        found = registry.kind(spec.kind).plan(spec, ctx)
        if not found or found.get("fits", True):
            continue
        parts = ", ".join(f"{k} {v:.1f}" for k, v in found["components_gb"].items() if v >= 0.05)
        raise UserError(
            f"{locate(recipe, 'stages', name)}: stages.{name}: needs "
            f"{found['memory_per_gpu_gb']:.1f} GiB per GPU ({parts}; {found['launch']}), "
            f"more than the {machine.gpus.memory_gib:g} GiB of each GPU ({machine.gpus.count}x "
            f"{machine.gpus.name}): lower "
            "per_device_train_batch_size or max_length, checkpoint activations, train an "
            "adapter or shard (recipes/accelerate/zero3.yaml); `upstack plan` shows the count, "
            "--no-fit-check (launch.fit_check: false) runs it anyway"
        )


def context(
    recipe: Recipe,
    name: str,
    config_hash: str,
    pending: frozenset[str] = frozenset(),
    out_dir: Path | None = None,
    work: Path | None = None,
) -> StageContext:
    """The one context a stage's preflight and run get (the runner's temp dir by default)."""
    return StageContext(
        recipe=recipe,
        name=name,
        out_dir=out_dir or recipe.run_dir.temp(name),
        work_dir=work or recipe.run_dir.work(name),
        config_hash=config_hash,
        pending=pending,
    )


def _run_stage(recipe: Recipe, name: str, hashes: dict[str, str]) -> None:
    spec, run_dir = recipe.stages[name], recipe.run_dir
    tmp = run_dir.begin(name)
    work = run_dir.work(name)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    logs.to_stage_log(work)
    try:
        with signals.handling(recipe.launch.grace_seconds):
            if _wants_launcher(recipe, spec):
                metrics = _launch(recipe, name, tmp, work)
            else:
                metrics = execute_stage(recipe, name, tmp, work, hashes[name])
        # what the stage wrote must be what its kind promises before it counts as done
        problem = outputs.problem(registry.kind(spec.kind).output, tmp)
        if problem:
            raise recipe.error(("stages", name), problem, StageFailed)
        run_dir.finish(name, tmp, manifest(recipe, name, hashes, metrics, started, t0))
    except BaseException as err:
        run_dir.abandon(tmp)
        run_dir.mark_failed(name, err)
        raise one_line(recipe, name, err, work) from None
    finally:
        log, count = logs.stage_log_done()
        if count:
            print(f"[{name}] {count} library warnings in {log}", file=sys.stderr, flush=True)


def one_line(recipe: Recipe, name: str, err: BaseException, work: Path) -> BaseException:
    """What a stage's failure becomes for the person at the terminal: its own one line when it
    is upstack's (a UserError says what to fix), else one line naming the stage and the error,
    the traceback kept in the work dir for a bug report; a rerun resumes either way."""
    where = f"{locate(recipe, 'stages', name)}: stages.{name}"
    if isinstance(err, UserError):
        return err
    if isinstance(err, KeyboardInterrupt | Interrupted):
        return Interrupted(f"{where}: interrupted; its checkpoints are kept: rerun to resume")
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return StageFailed(
            f"{where}: disk full while writing {err.filename or work}: free space under "
            f"{recipe.out_dir} and rerun (checkpoints and request caches are kept)"
        )
    if isinstance(err, SystemExit):
        return StageFailed(f"{where}: a library it called exited ({err.code})")
    trace = work / TRACEBACK
    with suppress(OSError):
        trace.write_text("".join(traceback.format_exception(err)))
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    origin = type(err).__module__.split(".")[0]
    shown = f"{type(err).__name__}" if origin == "builtins" else f"{origin}: {type(err).__name__}"
    return StageFailed(f"{where}: {shown}: {first} (traceback: {trace})")


def manifest(
    recipe: Recipe,
    name: str,
    hashes: dict[str, str],
    metrics: dict,
    started: dt.datetime,
    t0: float,
) -> dict[str, Any]:
    """What a finished stage records: its settings and their hash, its inputs, versions, time."""
    spec = recipe.stages[name]
    return {
        "stage": name,
        "kind": spec.kind,
        "recipe": recipe.name,
        "config": registry.kind(spec.kind).settings(spec),
        "config_hash": hashes[name],
        "seed": recipe.seed,
        "inputs": {dep: hashes[dep] for dep in recipe.deps(name)},
        "versions": package_versions(),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 2),
        # the runner's own peak, or an accelerate worker's when the stage was launched
        "peak_rss_mb": round(
            max(
                resource.getrusage(who).ru_maxrss
                for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            )
            / 1024,
            1,
        ),
        "metrics": metrics or {},
    }


def execute_stage(recipe: Recipe, name: str, out_dir: Path, work: Path, config_hash: str) -> dict:
    """Call the stage's `run` in this process (also what each accelerate worker does)."""
    spec = recipe.stages[name]
    ctx = context(recipe, name, config_hash, out_dir=out_dir, work=work)
    return registry.kind(spec.kind).run(spec, ctx) or {}


def _wants_launcher(recipe: Recipe, spec: StageSpec) -> bool:
    if not registry.kind(spec.kind).launchable:
        return False
    nproc = os.environ.get("NPROC") or recipe.launch.num_processes or 1
    return bool(
        os.environ.get("ACCELERATE")
        or recipe.launch.accelerate_config
        or int(nproc) > 1
        or nodes(recipe)["num_machines"] > 1
    )


def nodes(recipe: Recipe) -> dict[str, Any]:
    """The machines of a multi-node launch: env NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
    (what Slurm and torchrun scripts set), else the recipe's `launch:` keys; one machine, rank 0,
    by default."""
    launch = recipe.launch

    def number(env: str, value: int | None, default: int) -> int:
        text = os.environ.get(env)
        if text is None or text == "":
            return value if value is not None else default
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{env}={text}: not a whole number") from None

    found = {
        "num_machines": number("NNODES", launch.num_machines, 1),
        "machine_rank": number("NODE_RANK", launch.machine_rank, 0),
        "main_process_ip": os.environ.get("MASTER_ADDR") or launch.main_process_ip,
        "main_process_port": number("MASTER_PORT", launch.main_process_port, 0) or None,
    }
    if not 0 <= found["machine_rank"] < max(found["num_machines"], 1):
        raise UserError(
            f"NODE_RANK/launch.machine_rank {found['machine_rank']} is not below "
            f"NNODES/launch.num_machines {found['num_machines']}"
        )
    if found["num_machines"] > 1 and not found["main_process_ip"]:
        raise UserError(
            f"{found['num_machines']} machines need the main one's address: MASTER_ADDR= or "
            "launch.main_process_ip"
        )
    return found


def launch_command(recipe: Recipe, name: str, tmp: Path, work: Path) -> list[str]:
    """`accelerate launch` of one stage's worker (`upstack _stage`): the accelerate config, the
    processes (NPROC per machine, so accelerate's --num_processes is NPROC x machines) and the
    machines, then the recipe's extra_args."""
    config = os.environ.get("ACCELERATE") or recipe.launch.accelerate_config
    nproc = os.environ.get("NPROC") or recipe.launch.num_processes
    machines = nodes(recipe)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        cmd += ["--config_file", config]
    if nproc:
        cmd += ["--num_processes", str(int(nproc) * machines["num_machines"])]
    if machines["num_machines"] > 1:
        cmd += ["--num_machines", str(machines["num_machines"])]
        cmd += ["--machine_rank", str(machines["machine_rank"])]
        cmd += ["--main_process_ip", machines["main_process_ip"]]
        if machines["main_process_port"]:
            cmd += ["--main_process_port", str(machines["main_process_port"])]
    cmd += [
        *recipe.launch.extra_args,
        "-m",
        "upstack",
        "_stage",
        recipe.source,
        name,
        "--out-dir",
        str(tmp),
        "--work-dir",
        str(work),
    ]
    for item in recipe.overrides:
        cmd += ["--set", item]
    return cmd


def secondary_node(recipe: Recipe, targets: list[str], force: bool, dry_run: bool) -> list[str]:
    """`upstack run` on a machine other than the main one (machine_rank > 0): it runs its share
    of each training stage the main machine runs, and writes nothing in the output dir: no lock,
    no stage dir, no manifest (on a shared file system the main machine's are the ones). Its
    workers get a private scratch dir as --out-dir, which only a rank 0 would write into; they
    share the stage's work dir, where each rank keeps its part of a checkpoint (RNG state) and
    from where all of them resume. The main machine's stages that no launcher runs (upscale,
    merge...) it leaves to the main machine: the rendezvous of the next training stage waits."""
    import tempfile

    machine = nodes(recipe)
    steps = [
        name
        for name in plan(recipe, targets, force)
        if _wants_launcher(recipe, recipe.stages[name])
    ]
    print(
        f"machine {machine['machine_rank']} of {machine['num_machines']}: runs its ranks of "
        f"{', '.join(steps) or 'no training stage'}; machine 0 writes the outputs",
        file=sys.stderr,
        flush=True,
    )
    check_launch_config(recipe, steps)
    if dry_run or not steps:
        return steps
    for name in steps:
        print(f"==> {name} ({recipe.stages[name].kind})", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"upstack-{name}-") as scratch:
            _run_launcher(recipe, name, Path(scratch), recipe.run_dir.work(name))
            written = sorted(p.name for p in Path(scratch).iterdir())
            if written:  # a rank that is not 0 wrote outputs: a bug, not the user's
                raise StageFailed(
                    f"stages.{name}: machine {machine['machine_rank']} wrote {written}"
                )
    return steps


def _launch(recipe: Recipe, name: str, tmp: Path, work: Path) -> dict:
    """Run one training stage under `accelerate launch`; workers write into `tmp`, rank 0 the metrics."""
    _run_launcher(recipe, name, tmp, work)
    metrics_file = tmp / WORKER_METRICS
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    metrics_file.unlink(missing_ok=True)
    return metrics


def _run_launcher(recipe: Recipe, name: str, tmp: Path, work: Path) -> None:
    """The launch itself; a failure becomes the stage's one line."""
    cmd = launch_command(recipe, name, tmp, work)
    # A stop request is passed on to the workers, which save a checkpoint and stop (each runs
    # under signals.handling); this process waits for them within the grace period. Their
    # stderr passes through as it comes; its tail is kept to name a rank that died.
    with signals.accepting():
        process = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        tail = _Tee(process.stderr)
        forwarded = None
        while process.poll() is None:
            if signals.requested() and forwarded is None:
                forwarded = signals.requested()
                process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        tail.join()
    if forwarded:
        raise Interrupted(f"stages.{name}: {forwarded}")
    if process.returncode != 0:
        where = f"{locate(recipe, 'stages', name)}: stages.{name}"
        # a worker's one-line error, if it left one (cli._run_worker)
        try:
            error = json.loads((tmp / WORKER_ERROR).read_text())
        except (OSError, ValueError):
            error = None
        if error is not None:
            raise (StageFailed if error["exit_code"] == 1 else UserError)(error["message"])
        dead = failed_rank(tail.text())
        if dead:
            raise StageFailed(
                f"{where}: {dead}; the launcher stopped the other ranks: rerun to resume from "
                "the last checkpoint"
            )
        raise StageFailed(
            f"{where}: accelerate launch exited with {process.returncode} (the workers' output "
            "above says why)"
        )


class _Tee:
    """Copies a pipe to this process's stderr as it comes, keeping the last `keep` bytes."""

    def __init__(self, pipe, keep: int = 64 * 1024) -> None:
        import threading

        self.pipe, self.keep, self.kept = pipe, keep, bytearray()
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
        while chunk := os.read(self.pipe.fileno(), 65536):
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stderr.write(chunk.decode(errors="replace"))
            self.kept += chunk
            del self.kept[: -self.keep]

    def join(self) -> None:
        self.thread.join(timeout=10)
        self.pipe.close()

    def text(self) -> str:
        return self.kept.decode(errors="replace")


def failed_rank(launcher_stderr: str) -> str | None:
    """Which rank brought the launch down, from torchrun's failure report (its `Root Cause`:
    the first worker to fail; the others it stopped itself): "rank 1 (local rank 1 on host)
    was killed by SIGKILL", or None when the report is not there."""
    import re

    found = re.search(
        r"Root Cause.*?host\s*:\s*(\S+)\s+rank\s*:\s*(\d+) \(local_rank: (\d+)\)\s+"
        r"exitcode\s*:\s*(-?\d+)",
        launcher_stderr,
        re.DOTALL,
    )
    if not found:
        return None
    host, rank, local, code = found.groups()
    code = int(code)
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with {code}"
    return f"rank {rank} (local rank {local} on {host}) {how}"


def refuse_if_locked(recipe_path: str, overrides: list[str]) -> None:
    """A quick look, before the recipe is loaded and checked (seconds of imports): is another
    run holding this recipe's output dir? Anything unreadable here is left to the full load."""
    import yaml

    from upstack.core.recipe import output_dir_of

    try:
        out_dir = output_dir_of(yaml.safe_load(Path(recipe_path).read_text()), overrides)
    except (OSError, ValueError, yaml.YAMLError, UserError):
        return
    if out_dir is not None:
        RunDir(out_dir).is_locked()  # raises the holder's one line


def check_launch_config(recipe: Recipe, steps: list[str]) -> None:
    """Before anything runs: the accelerate config the launched stages get (ACCELERATE= in
    place of the recipe's launch.accelerate_config) is one upstack can pass on and agrees with
    each stage's trainer settings on this machine (upstack.core.recipe.accelerate_config_problem:
    precision, DeepSpeed's gradient accumulation, a save that is the full model)."""
    launched = [name for name in steps if _wants_launcher(recipe, recipe.stages[name])]
    config = os.environ.get("ACCELERATE") or recipe.launch.accelerate_config
    if not launched or not config:
        return
    settings = {
        name: registry.kind(recipe.stages[name].kind).effective_settings(recipe.stages[name]) or {}
        for name in launched
    }
    problem = accelerate_config_problem(config, settings)
    if not problem:
        return
    if os.environ.get("ACCELERATE"):
        raise UserError(f"ACCELERATE={config}: {problem.removeprefix(config + ': ')}")
    raise recipe.error(("launch", "accelerate_config"), problem)


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        with suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


# --------------------------------------------------------------------------- status

STATUS_HEADERS = ["stage", "kind", "state", "seconds", "metrics"]


def status_rows(recipe: Recipe) -> list[list[str]]:
    rows = []
    for name, state in states(recipe).items():
        manifest = recipe.run_dir.manifest(name) or {}
        metrics = manifest.get("metrics", {})
        shown = ", ".join(f"{k}={short(v)}" for k, v in list(_scalars(metrics).items())[:4])
        seconds = manifest.get("seconds")
        rows.append(
            [
                name,
                recipe.stages[name].kind,
                state,
                f"{seconds:.1f}" if seconds is not None else "",
                shown,
            ]
        )
    return rows


def _scalars(metrics: dict) -> dict:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float | str) and not isinstance(v, bool)
    }
