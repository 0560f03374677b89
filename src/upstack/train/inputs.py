"""What a training stage trains on: the tokenizer (with the stage's chat template) and the data
mixture of its format, loaded and checked before the model is."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upstack.train.spec import TrainingSpec

GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Inputs:
    """What a training stage builds its trainer from, loaded and checked before any step."""

    model_path: str
    tokenizer: Any
    train: Any  # datasets.Dataset
    held_out: Any  # datasets.Dataset, a dict of them by source name (a mixture), or None
    marks_turns: bool  # the chat template marks assistant turns ({% generation %})
    mixture: dict | None = None  # source name -> share, rows, entropies (cpt's `mixture:`)


def prepare(spec: TrainingSpec, ctx, chat_template: str | None = None, mixture=None) -> Inputs:
    """The tokenizer (with the stage's chat template, required for conversations) and the data
    mixture of the stage's format (text, sft, preference), each source checked. With a
    `mixture` (cpt), the sources share the rows as it says and keep their own held-out sets."""
    from accelerate import PartialState

    from upstack.train.data import build_mixture, build_weighted_mixture

    fmt = spec.DATA_FORMAT
    model_path = ctx.ref("model").location
    tokenizer = load_tokenizer(model_path, ctx, chat_template, spec.revision)
    if spec.add_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(spec.add_special_tokens)})
    marks_turns = fmt != "text" and require_chat_template(tokenizer, ctx, model_path)
    # Under accelerate, rank 0 reads (and streams) the data first; the other ranks then find
    # what it wrote (streamed selections, datasets' caches) instead of all reading the corpus.
    with PartialState().main_process_first():
        if mixture is not None:
            train_rows, held_out, report = build_weighted_mixture(
                spec.datasets, mixture, tokenizer, ctx, spec.eval_fraction
            )
            return Inputs(model_path, tokenizer, train_rows, held_out, marks_turns, report)
        train_rows, held_out = build_mixture(
            spec.datasets, fmt, ctx, spec.eval_fraction, tokenizer=tokenizer
        )
    return Inputs(model_path, tokenizer, train_rows, held_out, marks_turns)


def load_tokenizer(
    model_path: str, ctx, chat_template: str | None = None, revision: str | None = None
):
    """The model's tokenizer (upstack.models.checkpoints' loading policy), with `chat_template`
    (a name, a file relative to the recipe, or inline Jinja) in place of its own, and a pad
    token. A named template's turn markers must be tokens of the tokenizer; its end of turn
    becomes the tokenizer's eos, so generation stops where an assistant turn ends."""
    from upstack.models.checkpoints import load_tokenizer as load
    from upstack.train import templates

    fail = lambda message: ctx.fail("model", message)  # noqa: E731
    tokenizer = load(model_path, ctx.recipe, fail, **({"revision": revision} if revision else {}))
    if chat_template:
        recipe_dir = Path(ctx.recipe.source).parent
        problem = templates.problem(chat_template, recipe_dir)
        if problem:
            raise ctx.fail("chat_template", problem)
        missing = templates.missing_tokens(chat_template, tokenizer)
        if missing:
            raise ctx.fail(
                "chat_template",
                f"the {chat_template} template writes {', '.join(missing)}, which the tokenizer "
                f"of {model_path} does not have as tokens: use the model's own template, or a "
                "template of its family",
            )
        tokenizer.chat_template = templates.text(chat_template, recipe_dir)
        end = templates.end_of_turn(chat_template)
        if end:
            tokenizer.eos_token = end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; labels mask it anyway
    return tokenizer


def require_chat_template(tokenizer, ctx, model_path: str) -> bool:
    """Before any training: conversations need a template. True when it marks assistant turns."""
    if not tokenizer.chat_template:
        raise ctx.fail(
            "",
            f"model {model_path} has no chat template; "
            "set `chat_template:` (a Jinja string or a .jinja file)",
        )
    return bool(GENERATION_MARK.search(tokenizer.chat_template))
