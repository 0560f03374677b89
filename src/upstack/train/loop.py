"""The training loop a stage runs: resumed from the last complete checkpoint of an earlier
attempt, guarded (a non-finite loss stops it), measured for the manifest, then saved."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from upstack.core import signals
from upstack.core.context import is_main_process
from upstack.core.errors import Interrupted
from upstack.train.distributed import described
from upstack.train.save import eval_sources, save
from upstack.train.settings import CHECKPOINTS, changed_fields, on_gpu
from upstack.train.spec import TrainingSpec

# What DPOTrainer logs of its rewards -> the manifest's metric names (<name>_first, <name>_last)
REWARD_METRICS = {
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
}


def train_and_save(trainer, spec: TrainingSpec, ctx) -> dict[str, Any]:
    """Train (resuming when an earlier attempt left a checkpoint), then save a plain checkpoint.
    The manifest gets the effective trainer settings: every field that differs from TRL's default."""
    from upstack.train import trainable

    metrics = train(trainer, ctx)
    metrics.update(router_metrics(trainer, ctx))
    metrics.update(usage_metrics(trainer, ctx))
    layers = trainer.model.config.num_hidden_layers
    trained = trainable.resolve(spec, ctx, layers).record(spec.train_layers)
    trained.update(trainable.counted(trainer), adapter=spec.adapter.type if spec.adapter else None)
    save(trainer, trainer.processing_class, spec, ctx)
    return {**metrics, "trained": trained, "trainer_settings": changed_fields(trainer.args)}


def train(trainer, ctx) -> dict[str, Any]:
    """Train (resuming if an earlier attempt left a checkpoint), evaluate; metrics for the manifest."""
    checkpoint = resume_checkpoint(ctx)
    tokens_before = 0
    if checkpoint is not None:
        ctx.log(f"resuming from {checkpoint.name}")
        tokens_before = json.loads((checkpoint / "trainer_state.json").read_text()).get(
            "num_input_tokens_seen", 0
        )
    start = time.perf_counter()
    with signals.accepting():  # SIGTERM, Ctrl-C: a checkpoint at the end of the step, then stop
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if signals.requested():
        step = trainer.state.global_step
        raise ctx.fail(
            "",
            f"stopped on {signals.requested()} at step {step}, its checkpoint saved: rerun to "
            "resume from it",
            error=Interrupted,
        )
    seconds = time.perf_counter() - start
    evaluated = trainer.evaluate() if trainer.eval_dataset is not None else {}
    eval_loss, by_source = held_out_losses(evaluated, eval_sources(trainer))

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = trainer.state.num_input_tokens_seen
    metrics = {
        # the first four scalars are what `upstack status` shows
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "eval_loss": eval_loss,
        "steps": trainer.state.global_step,
        "train_loss_mean": result.training_loss,
        "processes": trainer.accelerator.num_processes,
        "distributed": described(trainer.accelerator),
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "resumed_from_step": int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0,
        "tokens_seen": tokens,
        "tokens_per_second": round((tokens - tokens_before) / max(seconds, 1e-9), 1),
        "train_seconds": round(seconds, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "loss_curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
    }
    if by_source:  # each source's held-out loss at every eval step: is a domain starved?
        metrics["eval_loss_by_source"] = {name: round(v, 5) for name, v in by_source.items()}
        metrics["eval_curves"] = eval_curves(history, list(by_source))
    return {**metrics, **reward_metrics(history)}


def held_out_losses(evaluated: dict, sources: list[str]) -> tuple[float | None, dict[str, float]]:
    """(eval loss, each source's) of the final evaluation. One held-out set logs eval_loss; a
    mixture's sets log eval_<source>_loss each, and its eval loss is the sources' mean. Named
    from the sets, not read from the keys: a mixture of experts also logs eval_aux_loss."""
    by_source = {
        name: evaluated[f"eval_{name}_loss"] for name in sources if f"eval_{name}_loss" in evaluated
    }
    eval_loss = evaluated.get("eval_loss")
    if eval_loss is None and by_source:
        eval_loss = sum(by_source.values()) / len(by_source)
    return eval_loss, by_source


def eval_curves(history: list[dict], sources: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Each source's held-out loss by step. The last evaluation at a step wins (the final
    evaluate() repeats the last eval step)."""
    curves = {}
    for name in sources:
        key = f"eval_{name}_loss"
        curves[name] = sorted({h["step"]: h[key] for h in history if key in h}.items())
    return curves


def reward_metrics(history: list[dict]) -> dict[str, float]:
    """DPO's reward accuracy and margin at the first and last logged training step."""
    metrics = {}
    for key, name in REWARD_METRICS.items():
        values = [h[key] for h in history if key in h and "loss" in h]
        if values:
            metrics[f"{name}_first"], metrics[f"{name}_last"] = values[0], values[-1]
    return metrics


def peak_memory_mb() -> float:
    """The GPU's peak allocation, or without one the process's peak resident memory."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resume_checkpoint(ctx) -> Path | None:
    """The last complete checkpoint of an earlier attempt with the same settings, if any.

    The Trainer writes trainer_state.json last, after weights, optimizer and RNG state; a
    checkpoint dir without a readable one for its own step was cut off mid-save and is skipped.
    One whose files are damaged (a disk that filled, a copy cut short) is set aside, never
    deleted, and the one before it is used: every rerun would fail on it the same way.
    """
    root = ctx.work_dir / CHECKPOINTS
    stamp = root / "config_hash"
    if is_main_process():
        if root.exists() and (not stamp.exists() or stamp.read_text() != ctx.config_hash):
            shutil.rmtree(root)  # checkpoints of other settings would resume the wrong run
        root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(ctx.config_hash)

    def step_of(path: Path) -> int:
        tail = path.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    for checkpoint in sorted(root.glob("checkpoint-*"), key=step_of, reverse=True):
        try:
            state = json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            ctx.log(f"skipping {checkpoint.name}: incomplete (no readable trainer_state.json)")
            continue
        if state.get("global_step") != step_of(checkpoint):
            ctx.log(f"skipping {checkpoint.name}: its trainer_state.json is for another step")
            continue
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        aside = checkpoint.with_name(f"{checkpoint.name}.damaged")
        if is_main_process():
            shutil.rmtree(aside, ignore_errors=True)
            checkpoint.rename(aside)
        ctx.log(f"skipping {checkpoint.name}: {problem}; set aside as {aside.name}")
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint's files cannot be resumed from, or None: a safetensors file whose header
    does not cover it, or a torch.save file (optimizer, scheduler, RNG state: zip archives)
    without its closing directory, which a file cut short lacks."""
    import zipfile

    from upstack.models.checkpoints import safetensors_problem

    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
            if problem:
                return f"{path.name} is damaged"
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{path.name} is cut short or damaged (not a complete torch.save archive)"
    return None


# --------------------------------------------------------------------------- callbacks


def callbacks(model, ctx) -> list:
    """What rides along the loop: the NaN guard; for a mixture of experts, the router-load meter;
    for a PEER model, the expert-usage meter; on CPU, where upstack budgets threads, the thread
    budget."""
    from upstack.core.cpu import budget_threads
    from upstack.train import retrieval, routing

    found = [nan_guard(ctx), stop_and_save(ctx.recipe.launch.checkpoint_minutes * 60)]
    if routing.is_moe(model.config):  # how the routers spread the tokens, for the manifest
        found.append(routing.router_load(model))
    if retrieval.peer_layers(model):  # which experts the product keys retrieve
        found.append(retrieval.expert_usage(model))
    if not on_gpu() and budget_threads():
        from upstack.core.cpu import thread_budget

        found.append(thread_budget())  # share the CPU with whatever else runs beside
    return found


def stop_and_save(every_s: float):
    """A TrainerCallback that saves a checkpoint at least every `every_s` seconds, whatever
    save_steps says (a kill costs at most that much work), and at the end of the step in which a
    stop was requested (SIGTERM, Ctrl-C: upstack.core.signals), then stops the loop. Under
    several processes the request is agreed on by all of them, since saving is collective."""
    from transformers import TrainerCallback

    class StopAndSave(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if _anyone(signals.requested() is not None):
                control.should_save = True
                control.should_training_stop = True
            elif time.monotonic() - self.last >= every_s:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()

    return StopAndSave()


def _anyone(flag: bool) -> bool:
    """`flag` or'ed over every process of a distributed run (just `flag` in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def nan_guard(ctx):
    """A TrainerCallback that stops training at the first non-finite loss or gradient norm."""
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(value):
                    raise ctx.fail(
                        "",
                        f"training {key} is {value} at step {state.global_step}; "
                        "lower trainer.learning_rate or check the data",
                    )

    return StopOnNonFinite()


def _callback(trainer, class_name: str):
    """The trainer's callback of that class (a counter the stage added), or None."""
    return next(
        (c for c in trainer.callback_handler.callbacks if type(c).__name__ == class_name), None
    )


def router_metrics(trainer, ctx) -> dict[str, Any]:
    """A mixture of experts: the tokens each expert got per layer (upstack.train.routing), logged as a
    table, and the load-balancing loss weight TRL trained with."""
    from upstack.train import routing

    counter = _callback(trainer, "RouterLoad")
    if counter is None:
        return {}
    load = routing.load_metrics(counter, trainer.accelerator)
    for mode in ("train", "eval"):
        if mode in load:
            ctx.log(
                f"router load ({mode}: fraction of routed tokens per expert)\n"
                + routing.load_table(load, mode)
            )
    load["router_aux_loss_coef"] = getattr(trainer, "router_aux_loss_coef", None)
    load["aux_loss_enabled"] = getattr(trainer, "aux_loss_enabled", None)
    return {"router_load": load}


def usage_metrics(trainer, ctx) -> dict[str, Any]:
    """A PEER model: the experts each PEER layer retrieved (upstack.train.retrieval), logged as
    tables."""
    from upstack.train import retrieval

    counter = _callback(trainer, "ExpertUsage")
    if counter is None:
        return {}
    usage = retrieval.usage_metrics(counter, trainer.accelerator)
    for mode in ("train", "eval"):
        if mode in usage:
            ctx.log(
                f"PEER expert usage ({mode}: of {usage['experts']} experts per layer)\n"
                + retrieval.usage_table(usage, mode)
            )
    return {"expert_usage": usage}
