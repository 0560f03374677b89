"""The stage-contract hooks (upstack.core.contract) cpt, sft and dpo share; each stage module
re-exports them by name."""

from __future__ import annotations

from pathlib import Path

from upstack.train.data import check_sources
from upstack.train.spec import TrainingSpec


def preflight(spec: TrainingSpec, ctx) -> None:
    """The runner's preflight for cpt, sft and dpo: the model is a checkpoint upstack can load
    and train (not a multimodal wrapper), every data source is where it says and has the columns
    the stage needs, `train_layers` names layers the model has, the adapter's settings work on
    it."""
    from upstack.models.checkpoints import (
        chat_template_problem,
        check_model,
        config_json,
        wrapper_problem,
    )

    check_model(ctx, tokenizer=True)
    ref = ctx.ref("model")
    problem = wrapper_problem(config_json(ref))  # a stage never writes one: each refuses them
    if problem:
        raise ctx.fail("model", problem)
    local = ref.origin != "hub" and not ctx.is_pending(ref)
    template = getattr(spec, "chat_template", None)
    if local and spec.DATA_FORMAT != "text" and template is None:
        problem = chat_template_problem(Path(ref.location))  # conversations need one
        if problem:
            raise ctx.fail("", problem)
    if local and template is not None:
        missing = missing_markers(template, Path(ref.location))
        if missing:
            raise ctx.fail(
                "chat_template",
                f"the {template} template writes {', '.join(missing)}, which the tokenizer of "
                f"{ref.text} does not have as tokens: use the model's own template, or a "
                "template of its family",
            )
    check_sources(spec.datasets, ctx, spec.DATA_FORMAT)
    check_train_layers(spec, ctx)
    check_adapter(spec, ctx)


def missing_markers(template: str, model_dir: Path) -> list[str]:
    """A named template's turn markers absent from a local model's tokenizer.json (read with
    `tokenizers`, no transformers import); none known without that file."""
    from upstack.train import templates

    markers = templates.NAMED.get(template, ())
    file = model_dir / "tokenizer.json"
    if not markers or not file.is_file():
        return []
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(file))
    return [token for token in markers if vocab.token_to_id(token) is None]


def check_train_layers(spec: TrainingSpec, ctx) -> None:
    """Before anything runs: `train_layers` names layers the model will have. The layer count
    comes from the recipe (upstack.models.shapes) and a keyword's layers from the layer map the upscale
    ancestor recorded, or will record (planned from the recipe); where neither is known offline
    (a Hub model, a seam an analysis places in this run) the check waits for the stage's start."""
    from upstack.models import layermap
    from upstack.models.shapes import planned_shape

    if spec.train_layers == "all":
        return
    ref = ctx.ref("model")
    shape = planned_shape(ctx.recipe, ref, ctx.pending) or {}
    layermap.train_layers(spec.train_layers, ctx, shape.get("num_hidden_layers"))


def check_at_load(spec: TrainingSpec, recipe, name: str) -> None:
    """A revision names a version of a Hub model: on a stage or a local dir it would do nothing."""
    if spec.revision is None:
        return
    ref = next(r for r in recipe.refs(name) if r.key == "model")
    if ref.origin != "hub":
        raise recipe.error(
            ("stages", name, "revision"),
            f"a revision is a Hub model's branch, tag or commit; model {ref.text} is a "
            f"{'stage' if ref.origin == 'stage' else 'local dir'}",
        )


def check_adapter(spec: TrainingSpec, ctx) -> None:
    """Before anything runs: the adapter's settings work on the model (a mixture of experts' is
    known from the recipe's planned shape, or a local or cached config.json)."""
    from upstack.models.checkpoints import config_json
    from upstack.models.shapes import expert_count, planned_shape
    from upstack.train.trainable import adapter_dropout_problem

    if spec.adapter is None:
        return
    ref = ctx.ref("model")
    shape = planned_shape(ctx.recipe, ref, ctx.pending) or config_json(ref) or {}
    problem = adapter_dropout_problem(spec, bool(expert_count(shape)))
    if problem:
        raise ctx.fail("adapter.dropout", problem)


def output_shape(spec: TrainingSpec, input_shape):
    """Training keeps its model's shape."""
    return input_shape("model")
