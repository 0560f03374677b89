"""Runs a recipe's stages in dependency order: skip what is up to date, write atomically, leave a manifest."""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import functools
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

from upstack.context import StageContext
from upstack.errors import StageFailed, UserError
from upstack.recipe import Recipe, StageSpec, locate, stage_module
from upstack.tables import short

MANIFEST = "upstack.json"  # written last inside a stage dir: its presence means the stage finished
FAILED = "failed.json"  # in the stage's work dir when its last attempt raised
WORKER_ERROR = ".error.json"  # an accelerate worker's one-line error, for the launcher to print
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


def stage_hashes(recipe: Recipe) -> dict[str, str]:
    """A hash per stage of its settings, the recipe seed and its inputs' hashes, so a change
    anywhere upstream makes every stage below it stale before anything is rerun. A stage that
    reads the tiny world's generated data also hashes the code that generates it."""
    hashes: dict[str, str] = {}
    for name in recipe.order():
        spec = recipe.stages[name]
        settings = spec.model_dump(mode="json", exclude={"after"})
        payload = {
            "kind": spec.kind,
            "spec": settings,
            "seed": recipe.seed,
            "inputs": {dep: hashes[dep] for dep in recipe.deps(name)},
        }
        if spec.kind == "init" or _reads_generated(settings):  # init: its BPE trains on arith
            payload["generator"] = generator_fingerprint()
        blob = json.dumps(payload, sort_keys=True).encode()
        hashes[name] = hashlib.sha256(blob).hexdigest()[:16]
    return hashes


# The code behind generated data (data_synth's tasks, their splits, the scripted teacher): the
# same settings give other data when it changes, so a stage cached before would be stale while
# saying "done". Only stages that read such data hash it, so an upgrade never reruns a stage on
# a user's own data.
GENERATOR_FILES = ("arith.py", "listops.py", "splits.py", "teachers.py")


def _reads_generated(settings: Any) -> bool:
    """Whether a stage's settings name generated data anywhere: a `datasets` entry `arith:` or
    `generated:`, a seed or eval set `source: arith|listops`, or the scripted teacher."""
    if isinstance(settings, dict):
        if settings.get("arith") is not None or settings.get("generated") is not None:
            return True
        if settings.get("source") in ("arith", "listops") or settings.get("kind") == "scripted":
            return True
        return any(_reads_generated(value) for value in settings.values())
    if isinstance(settings, list):
        return any(_reads_generated(value) for value in settings)
    return False


@functools.cache
def generator_fingerprint() -> str:
    import importlib.util

    # found, not imported: the kernel stays free of data_synth's imports
    package = Path(importlib.util.find_spec("data_synth").origin).parent
    digest = hashlib.sha256()
    for name in GENERATOR_FILES:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, ValueError):  # absent, unreadable, half-written: not a finished stage
        return None


def stage_state(recipe: Recipe, name: str, expected_hash: str) -> str:
    manifest = read_manifest(recipe.out_dir / name)
    if manifest is not None:
        return "done" if manifest.get("config_hash") == expected_hash else "stale"
    if (work_dir(recipe, name) / FAILED).exists():
        return "failed"
    return "missing"


def work_dir(recipe: Recipe, name: str) -> Path:
    return recipe.out_dir / ".work" / name


def plan(recipe: Recipe, targets: list[str], force: bool = False) -> list[str]:
    """Stages to run, in order: the targets (all stages if none) and any dependency not done."""
    hashes = stage_hashes(recipe)
    wanted = recipe.resolve_targets(targets) if targets else list(recipe.stages)
    chosen: set[str] = set()

    def need(name: str, is_target: bool) -> None:
        if name in chosen:
            return
        if (is_target and force) or stage_state(recipe, name, hashes[name]) != "done":
            chosen.add(name)
            for dep in recipe.deps(name):
                need(dep, False)

    for name in wanted:
        need(name, True)
    return [n for n in recipe.order() if n in chosen]


# --------------------------------------------------------------------------- running


def run(
    recipe: Recipe, targets: list[str], force: bool = False, dry_run: bool = False
) -> list[str]:
    check_output_dir(recipe)
    steps = plan(recipe, targets, force)
    preflight(recipe, steps)
    if dry_run or not steps:
        hashes = stage_hashes(recipe)
        for name in recipe.resolve_targets(targets) if targets else recipe.stages:
            if name not in steps:
                print(f"up to date: {name}", file=sys.stderr)
        for i, name in enumerate(steps, 1):
            state = stage_state(recipe, name, hashes[name])
            print(f"would run [{i}/{len(steps)}] {name} ({recipe.stages[name].kind}, {state})")
        return steps

    make_output_dir(recipe)
    with _lock(recipe.out_dir):
        for leftover in recipe.out_dir.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # from a run that was killed
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


def make_output_dir(recipe: Recipe) -> None:
    """Create the output dir and write in it once: what os.access cannot tell (a read-only
    mount, root on a network share) fails here, before the first stage."""
    out = recipe.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
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
        check = getattr(stage_module(recipe.stages[name].kind), "preflight", None)
        if check is not None:
            check(recipe.stages[name], context(recipe, name, hashes[name], frozenset(steps)))


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
        out_dir=out_dir or recipe.out_dir / f".tmp-{name}-{os.getpid()}",
        work_dir=work or work_dir(recipe, name),
        config_hash=config_hash,
        pending=pending,
    )


def _run_stage(recipe: Recipe, name: str, hashes: dict[str, str]) -> None:
    spec = recipe.stages[name]
    tmp = recipe.out_dir / f".tmp-{name}-{os.getpid()}"
    work = work_dir(recipe, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / FAILED).unlink(missing_ok=True)

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    try:
        if _wants_launcher(recipe, spec):
            metrics = _launch(recipe, name, tmp, work)
        else:
            metrics = execute_stage(recipe, name, tmp, work, hashes[name])
        _finish(recipe, name, hashes, tmp, metrics, started, t0)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        with suppress(OSError):  # a full disk must not hide the error that filled it
            (work / FAILED).write_text(
                json.dumps(
                    {
                        "error": f"{type(err).__name__}: {err}",
                        "at": dt.datetime.now(dt.timezone.utc).isoformat(),
                    }
                )
            )
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise StageFailed(
                f"{locate(recipe, 'stages', name)}: stages.{name}: disk full while writing "
                f"{err.filename or tmp}: free space under {recipe.out_dir} and rerun "
                "(checkpoints and request caches in .work are kept)"
            ) from None
        raise


def _finish(
    recipe: Recipe,
    name: str,
    hashes: dict[str, str],
    tmp: Path,
    metrics: dict,
    started: dt.datetime,
    t0: float,
) -> None:
    """Write the manifest last, then swap the new output in."""
    spec = recipe.stages[name]
    manifest = {
        "stage": name,
        "kind": spec.kind,
        "recipe": recipe.name,
        "config": spec.model_dump(mode="json"),
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
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    # Swap in the new output: the old dir (if any) is moved aside first, so at every instant the
    # stage dir is either absent or complete.
    final = recipe.out_dir / name
    old = recipe.out_dir / f".tmp-{name}-old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def execute_stage(recipe: Recipe, name: str, out_dir: Path, work: Path, config_hash: str) -> dict:
    """Call the stage's `run` in this process (also what each accelerate worker does)."""
    spec = recipe.stages[name]
    ctx = context(recipe, name, config_hash, out_dir=out_dir, work=work)
    return stage_module(spec.kind).run(spec, ctx) or {}


def _wants_launcher(recipe: Recipe, spec: StageSpec) -> bool:
    if not getattr(stage_module(spec.kind), "LAUNCHABLE", False):
        return False
    nproc = os.environ.get("NPROC") or recipe.launch.num_processes or 1
    return bool(os.environ.get("ACCELERATE") or recipe.launch.accelerate_config or int(nproc) > 1)


def _launch(recipe: Recipe, name: str, tmp: Path, work: Path) -> dict:
    """Run one training stage under `accelerate launch`; workers write into `tmp`, rank 0 the metrics."""
    config = os.environ.get("ACCELERATE") or recipe.launch.accelerate_config
    nproc = os.environ.get("NPROC") or recipe.launch.num_processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        if not Path(config).is_file():
            raise UserError(f"launch.accelerate_config: {config}: file not found")
        cmd += ["--config_file", config]
    if nproc:
        cmd += ["--num_processes", str(nproc)]
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
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        # a worker's one-line error, if it left one (cli._run_worker), else the exit code
        try:
            error = json.loads((tmp / WORKER_ERROR).read_text())
        except (OSError, ValueError):
            raise StageFailed(
                f"{locate(recipe, 'stages', name)}: stages.{name}: accelerate launch exited "
                f"with {result.returncode} (the workers' output above says why)"
            ) from None
        raise (StageFailed if error["exit_code"] == 1 else UserError)(error["message"])
    metrics_file = tmp / ".metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    metrics_file.unlink(missing_ok=True)
    return metrics


def refuse_if_locked(recipe_path: str, overrides: list[str]) -> None:
    """A quick look, before the recipe is loaded and checked (seconds of imports): is another
    run holding this recipe's output dir? Anything unreadable here is left to the full load."""
    import yaml

    from upstack.recipe import output_dir_of

    try:
        out_dir = output_dir_of(yaml.safe_load(Path(recipe_path).read_text()), overrides)
    except (OSError, ValueError, yaml.YAMLError, UserError):
        return
    if out_dir is None or not (out_dir / ".lock").is_file():
        return
    with _lock(out_dir):
        pass  # free: the real lock is taken when the run starts


@contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    """One run per output dir: a second one would race on the same temp and stage dirs."""
    path = out_dir / ".lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"{out_dir}: another upstack run is using this output dir (pid {holder}); "
            "wait for it or stop it"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        with suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


# --------------------------------------------------------------------------- status

STATUS_HEADERS = ["stage", "kind", "state", "seconds", "metrics"]


def status_rows(recipe: Recipe) -> list[list[str]]:
    hashes = stage_hashes(recipe)
    rows = []
    for name in recipe.order():
        state = stage_state(recipe, name, hashes[name])
        manifest = read_manifest(recipe.out_dir / name) or {}
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
