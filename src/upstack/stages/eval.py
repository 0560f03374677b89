"""eval stage: math accuracy (greedy, math-verify), held-out loss and lm-eval tasks for every model, as one table."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from data_synth.files import read_jsonl, write_jsonl
from data_synth.seeds import ArithSeeds, SeedSource
from upstack.core import registry
from upstack.core.results import PLOT, RESULTS, results_table
from upstack.core.settings import StageSpec, Strict, error_at, names, used_for

# The stage contract (upstack.core.contract)
OUTPUT = "results"  # results.json: one table over every model it scored
LAYER_MAP = "none"
LAUNCHABLE = False

REPORT = "report.md"
NonNegative = Annotated[int, Field(ge=0)]


class MathEval(Strict):
    problems: SeedSource = Field(
        default_factory=lambda: ArithSeeds(split="eval", count=100),
        description="held-out problems: arith eval split, MATH/GSM8K test (hf), CHAMP, a jsonl",
        json_schema_extra=used_for("eval"),
    )
    prompt: Literal["chat", "plain"] = Field(
        "chat", description="chat: the model's chat template; plain: 'Question: ...\\nAnswer:'"
    )
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(32, ge=1)


class LossEval(Strict):
    path: str | None = Field(
        None,
        description="jsonl (a `text` field) or .txt (one row a line); default: arith eval split",
        json_schema_extra={**names("data", "local"), **used_for("eval")},
    )
    text_field: str = "text"
    count: int = Field(100, ge=1, description="rows of the arith eval split when no path is given")
    max_length: int = Field(512, ge=8, description="tokens per row; longer rows are cut")
    batch_size: int = Field(16, ge=1)

    @property
    def GENERATED(self) -> bool:
        """Without a path the rows are the arith generator's eval split."""
        return self.path is None


class LmEval(Strict):
    """lm-evaluation-harness (`pip install upstack[lm-eval]`); its tasks download from the Hub."""

    tasks: list[str] = Field(min_length=1, description="e.g. arc_challenge, hellaswag, mmlu, gsm8k")
    num_fewshot: NonNegative | dict[str, NonNegative] | None = Field(
        None, description="shots for every task, or per task ({arc_challenge: 25, hellaswag: 10})"
    )
    limit: int | None = Field(None, ge=1, description="examples per task, for a quick look")
    batch_size: int = Field(8, ge=1)
    include_path: str | None = Field(None, description="a dir of your own task YAMLs")


class Spec(StageSpec):
    kind: Literal["eval"] = "eval"
    models: list[str] | None = Field(
        None,
        description="stage names or paths; default: every model stage listed in `after`",
        json_schema_extra={**names("model", "local"), **used_for("eval")},
    )
    math: MathEval | None = Field(default_factory=MathEval)
    loss: LossEval | None = Field(default_factory=LossEval)
    lm_eval: LmEval | None = None

    @model_validator(mode="after")
    def _something_to_do(self, info: ValidationInfo) -> Spec:
        kinds = (info.context or {}).get("stages", {})  # stage name -> kind, when loading a recipe
        if self.models is None:
            if not self.after:
                raise ValueError("list `models`, or the model stages in `after`")
            if kinds and not any(_makes_model(kinds.get(name)) for name in self.after):
                message = f"none of {self.after} is a model stage: list them in `models`"
                raise error_at(("after",), message)
        if not (self.math or self.loss or self.lm_eval):
            raise ValueError("nothing to measure: set math, loss or lm_eval")
        return self


def measures(spec: Spec) -> tuple[str, ...]:
    """The columns this stage's table will have (an lm-eval task as `task/`, its metrics after),
    so a sweep scored by it can be refused at load for a metric it never measures."""
    found = ("math_accuracy", "math_correct", "math_total") if spec.math else ()
    found += ("loss", "perplexity") if spec.loss else ()
    return found + tuple(f"{task}/" for task in (spec.lm_eval.tasks if spec.lm_eval else ()))


def models_of(spec: Spec, ctx) -> list[tuple[str, str]]:
    """(name, what to load) of the models to evaluate: `models`, else every model stage in `after`."""
    if spec.models:
        return [(model, ctx.ref(f"models.{i}").location) for i, model in enumerate(spec.models)]
    return [
        (name, str(ctx.stage_dir(name)))
        for name in spec.after
        if _makes_model(ctx.recipe.stages[name].kind)
    ]


def _makes_model(kind: str | None) -> bool:
    return kind is not None and registry.known(kind) and registry.kind(kind).output == "model"


def preflight(spec: Spec, ctx) -> None:
    """Before anything runs: every model is a checkpoint upstack can load (or a Hub model it can
    reach), and the local files the measures read exist."""
    from data_synth import DataSynthError
    from data_synth.seeds import JsonlSeeds, load_problems
    from upstack.models.checkpoints import check_model

    for ref in ctx.refs():
        if ctx.is_pending(ref):
            continue
        if ref.thing == "model":
            check_model(ctx, ref.key, tokenizer=True)
        elif ref.origin in ("path", "stage") and not Path(ref.location).exists():
            raise ctx.fail(ref.key, f"{ref.text}: no such file")
    problems = spec.math.problems if spec.math else None
    if isinstance(problems, JsonlSeeds) and not ctx.is_pending(ctx.ref("math.problems.path")):
        try:  # its columns and every line, now rather than after the stages before it ran
            load_problems(problems, ctx.seed, ctx.location)
        except DataSynthError as err:
            raise ctx.fail(f"math.problems.{err.setting or 'path'}", str(err)) from None
    if spec.lm_eval:
        unknown = unknown_tasks(spec.lm_eval)
        if unknown:
            raise ctx.fail("lm_eval.tasks", unknown)


def run(spec: Spec, ctx) -> dict:
    from data_synth import DataSynthError
    from data_synth.seeds import describe, load_problems

    problems = []
    if spec.math:
        try:
            problems = load_problems(spec.math.problems, ctx.seed, ctx.location)
        except DataSynthError as err:
            raise ctx.fail(f"math.problems.{err.setting or ''}".rstrip("."), str(err)) from None
    texts = loss_texts(spec.loss, ctx) if spec.loss else []

    rows = []
    for name, path in models_of(spec, ctx):
        started = time.perf_counter()
        row: dict[str, Any] = {"model": name}
        model, tokenizer = load_model(path, ctx, key=name)
        if problems:
            records = solve(model, tokenizer, problems, spec.math, desc=name)
            write_jsonl(ctx.out_dir / "predictions" / f"{_file_name(name)}.jsonl", records)
            correct = sum(r["correct"] for r in records)
            row.update(
                math_accuracy=round(correct / len(records), 4),
                math_correct=correct,
                math_total=len(records),
            )
        if texts:
            loss = mean_loss(model, tokenizer, texts, spec.loss)
            row.update(loss=round(loss, 4), perplexity=round(math.exp(min(loss, 50)), 3))
        del model  # before the next one loads: two big models need not fit at once
        free_accelerator_memory()
        if spec.lm_eval:
            row.update(lm_eval_scores(path, spec.lm_eval, ctx))
        row["seconds"] = round(time.perf_counter() - started, 1)
        ctx.log(", ".join(f"{k}={v}" for k, v in row.items()))
        rows.append(row)

    results = {
        "rows": rows,
        "problems": describe(spec.math.problems) if spec.math else None,
        "loss_rows": len(texts),
    }
    (ctx.out_dir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    plot(rows, ctx.out_dir / PLOT)
    (ctx.out_dir / REPORT).write_text(
        f"# Eval: {ctx.recipe.name}/{ctx.name}\n\n{results_table(results)}\n\n![eval]({PLOT})\n"
    )
    best = max(rows, key=lambda r: r.get("math_accuracy", -1))
    return {
        "models": len(rows),
        "best": best["model"],
        **({"best_math_accuracy": best["math_accuracy"]} if "math_accuracy" in best else {}),
        "rows": rows,
    }


# --------------------------------------------------------------------------- math accuracy


def load_model(path: str, ctx=None, key: str = "models"):
    """The model and its tokenizer, for generation (left padding). With a stage context, what
    keeps them from loading is a one-line error naming the stage's `key`."""
    import torch

    from upstack.core.errors import UserError
    from upstack.models import checkpoints

    def fail(message: str) -> UserError:
        return ctx.fail(_model_key(ctx, key), message) if ctx else UserError(message)

    policy = ctx.recipe if ctx else checkpoints.SAFE
    tokenizer = checkpoints.load_tokenizer(path, policy, fail)
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = checkpoints.load_model(path, policy, fail).to(device)
    model.eval()
    return model, tokenizer


def _model_key(ctx, name: str) -> str:
    """The key path that names model `name`: its entry in `models`, else `after`."""
    ref = next((r for r in ctx.refs() if r.key.startswith("models.") and r.text == name), None)
    return ref.key if ref else "after"


def free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts_for(tokenizer, questions: list[str], style: str) -> list[str]:
    if style == "chat" and tokenizer.chat_template:
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in questions
        ]
    from data_synth.arith import plain_prompt  # the pretraining text's format

    return [plain_prompt(q) for q in questions]


def solve(model, tokenizer, problems, settings: MathEval, desc: str = "eval") -> list[dict]:
    """Greedy answers to every problem, in batches, each scored against its gold answer."""
    import torch
    from tqdm.auto import tqdm

    from data_synth import verify

    records = []
    with tqdm(total=len(problems), desc=f"math {desc}", unit="problem") as bar:
        for start in range(0, len(problems), settings.batch_size):
            batch = problems[start : start + settings.batch_size]
            prompts = prompts_for(tokenizer, [p.question for p in batch], settings.prompt)
            # the chat template already holds the special tokens it needs
            encoded = tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=False
            )
            encoded = encoded.to(model.device)
            with torch.inference_mode():
                output = model.generate(
                    **encoded,
                    max_new_tokens=settings.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            answers = tokenizer.batch_decode(
                output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for problem, prediction in zip(batch, answers, strict=True):
                extracted, correct = verify.grade(problem.answer, prediction)
                records.append(
                    {
                        "id": problem.id,
                        "question": problem.question,
                        "gold": problem.answer,
                        "prediction": prediction,
                        "extracted": extracted,
                        "correct": correct,
                    }
                )
            bar.update(len(batch))
    return records


# --------------------------------------------------------------------------- held-out loss


def loss_texts(settings: LossEval, ctx) -> list[str]:
    from data_synth import DataSynthError, arith

    if settings.path is None:
        return [
            arith.plain_text(p.question, p.solution)
            for p in arith.problems(settings.count, ctx.seed, "eval")
        ]
    path = Path(ctx.ref("loss.path").location)
    if not path.is_file():
        raise ctx.fail("loss.path", f"{path}: file not found")
    if path.suffix != ".jsonl":
        return [line for line in path.read_text().splitlines() if line.strip()]
    texts = []
    try:
        for lineno, row in read_jsonl(path):
            if settings.text_field not in row:
                raise ctx.fail(
                    "loss.text_field",
                    f"{path}:{lineno}: no '{settings.text_field}' field (has: {', '.join(row)})",
                )
            texts.append(str(row[settings.text_field]))
    except DataSynthError as err:
        raise ctx.fail("loss.path", str(err)) from None
    return texts


def mean_loss(model, tokenizer, texts: list[str], settings: LossEval) -> float:
    """Token-weighted mean next-token loss over `texts` (perplexity is its exp)."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "right"
    total, tokens = 0.0, 0
    try:
        for start in tqdm(range(0, len(texts), settings.batch_size), desc="loss", unit="batch"):
            batch = tokenizer(
                texts[start : start + settings.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=settings.max_length,
            )
            batch = batch.to(model.device)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            with torch.inference_mode():
                logits = model(**batch).logits.float()
            shifted = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                shifted.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += losses.item()
            tokens += int((shifted != -100).sum())
    finally:
        tokenizer.padding_side = "left"
    return total / max(tokens, 1)


# --------------------------------------------------------------------------- lm-eval-harness


def unknown_tasks(settings: LmEval) -> str | None:
    """What is wrong with the tasks asked of lm-eval, from its own registry: indexing its ~15k
    task files takes ~20 s, so the built-in names are kept per lm-eval version (check_cache),
    and a recipe's own task dir is indexed alone."""
    from upstack.core.check_cache import library_facts

    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        return "lm-eval is not installed: pip install 'upstack[lm-eval]'"
    known = set(library_facts("lm_eval", "tasks", lambda: sorted(TaskManager().all_tasks)))
    if settings.include_path:
        own = TaskManager(include_path=settings.include_path, include_defaults=False)
        known |= set(own.all_tasks)
    missing = [task for task in settings.tasks if task not in known]
    if not missing:
        return None
    import difflib

    hints = [
        f"{task} (did you mean {close[0]}?)" if close else task
        for task in missing
        for close in [difflib.get_close_matches(task, sorted(known), n=1)]
    ]
    return f"lm-eval has no task {', '.join(hints)}" + (
        f" (nor {settings.include_path})" if settings.include_path else ""
    )


def lm_eval_scores(path: str, settings: LmEval, ctx) -> dict[str, float]:
    """Each asked task's metrics as lm-eval reports them: {'arc_challenge/acc_norm': 0.61, ...}."""
    import torch

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ctx.fail(
            "lm_eval", "lm-eval is not installed: pip install 'upstack[lm-eval]'"
        ) from None
    # Indexing lm-eval's ~15k built-in task files takes ~20 s: skip it when the user's dir has them all.
    manager = None
    if settings.include_path:
        manager = TaskManager(include_path=settings.include_path, include_defaults=False)
        if not all(task in manager.all_tasks for task in settings.tasks):
            manager = None
    manager = manager or TaskManager(include_path=settings.include_path)
    unknown = [task for task in settings.tasks if task not in manager.all_tasks]
    if unknown:
        raise ctx.fail(
            "lm_eval.tasks",
            f"lm-eval has no task {', '.join(unknown)}"
            + (f" (nor {settings.include_path})" if settings.include_path else ""),
        )
    shots = settings.num_fewshot
    by_shots: dict[int | None, list[str]] = {}
    for task in settings.tasks:
        by_shots.setdefault(shots.get(task) if isinstance(shots, dict) else shots, []).append(task)
    scores = {}
    for num_fewshot, tasks in by_shots.items():  # one lm-eval run per shot count
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": path, "trust_remote_code": ctx.recipe.trust_remote_code},
            device="cuda" if torch.cuda.is_available() else "cpu",  # lm-eval assumes cuda
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=settings.limit,
            batch_size=settings.batch_size,
            task_manager=manager,
        )
        for task in tasks:  # a group (mmlu) also reports its subtasks: keep what was asked
            for key, value in output["results"].get(task, {}).items():
                metric, _, filter_name = key.partition(",")
                if filter_name and "_stderr" not in metric and isinstance(value, int | float):
                    suffix = "" if filter_name == "none" else f"[{filter_name}]"
                    scores[f"{task}/{metric}{suffix}"] = round(float(value), 4)
    return scores


# --------------------------------------------------------------------------- outputs


def plot(rows: list[dict], path: Path) -> None:
    """Bars per model: math accuracy above held-out loss, one panel each, models in recipe order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (key, label)
        for key, label in (("math_accuracy", "math accuracy"), ("loss", "held-out loss"))
        if any(key in row for row in rows)
    ]
    if not panels:
        return
    names = [row["model"] for row in rows]
    # stacked panels and a width that grows gently with the models: readable at 3 or at 15 models
    figure, axes = plt.subplots(
        len(panels), 1, figsize=(max(6.0, 0.8 * len(rows) + 2), 3.2 * len(panels)), squeeze=False
    )
    for axis, (key, label) in zip(axes[:, 0], panels, strict=True):
        values = [row.get(key, 0) for row in rows]
        bars = axis.bar(names, values, color="tab:blue" if key == "math_accuracy" else "tab:orange")
        axis.bar_label(bars, fmt="%.3g", fontsize=8)
        axis.set_title(label)
        axis.tick_params(axis="x", rotation=30, labelsize=8)
        # room for the labels above the tallest bar; accuracy never reads above 100%
        top = max(values, default=0) * 1.2 or 1.0
        axis.set_ylim(0, min(top, 1.0) if key == "math_accuracy" else top)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _file_name(model: str) -> str:
    return model.strip("/").replace("/", "__")
