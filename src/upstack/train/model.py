"""The model a training stage trains: loaded (4-bit for QLoRA) through upstack.models.checkpoints,
what of it trains (upstack.train.trainable) frozen or adapted, and the LoRA config."""

from __future__ import annotations

from typing import Any

from upstack.train.inputs import Inputs
from upstack.train.settings import loading
from upstack.train.spec import Adapter, TrainingSpec


def model_parts(spec: TrainingSpec, ctx, inputs: Inputs) -> dict[str, Any]:
    """The trainer arguments every stage passes alike: the model with what it does not train
    frozen, its adapter config (limited to the trained layers), the guards."""
    from upstack.train import loop, trainable

    model = load_model(inputs.model_path, spec, ctx)
    if len(inputs.tokenizer) > model.get_input_embeddings().num_embeddings:
        # added special tokens: rows for them, each the mean of the others to start (trained:
        # the settings require it)
        model.resize_token_embeddings(len(inputs.tokenizer), mean_resizing=True)
    parts = trainable_parts(spec, ctx, model)
    peft_config = None
    if spec.adapter is None:
        trainable.freeze(model, parts)
    else:
        targets = adapter_targets(spec, ctx, model, parts)
        peft_config = lora_config(spec.adapter, targets, trainable.modules_to_save(model, parts))
    return {
        "model": model,
        "processing_class": inputs.tokenizer,
        "peft_config": peft_config,
        "callbacks": loop.callbacks(model, ctx),
    }


def trainable_parts(spec: TrainingSpec, ctx, model):
    """What of `model` the stage trains (upstack.train.trainable), checked against the model itself."""
    from upstack.train import trainable

    parts = trainable.resolve(spec, ctx, model.config.num_hidden_layers)
    if trainable.is_tied(model) and parts.embeddings != parts.lm_head:
        raise ctx.fail(
            "train_lm_head" if spec.train_lm_head is not None else "train_embeddings",
            "the model ties lm_head to the embeddings (one tensor): "
            "set train_embeddings and train_lm_head alike",
        )
    return parts


def adapter_targets(spec: TrainingSpec, ctx, model, parts) -> list[str] | str:
    """The modules the adapter adapts: the adapter's own `target_modules`, or with `train_layers`
    those modules of the trained layers only."""
    from upstack.train import routing, trainable

    problem = trainable.adapter_dropout_problem(spec, routing.is_moe(model.config))
    if problem:  # preflight found it where the model's config was known offline
        raise ctx.fail("adapter.dropout", problem)
    targets = spec.adapter.target_modules
    if isinstance(targets, list):  # each name must be a module of this model: peft would say so
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        absent = [t for t in targets if t not in names and not any(n.endswith(t) for n in names)]
        if absent:
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)}
            )
            raise ctx.fail(
                "adapter.target_modules",
                f"{', '.join(absent)}: no module of {type(model).__name__} is named so (its "
                f"Linear modules: {', '.join(linear)}; or all-linear)",
            )
    if spec.train_layers == "all":
        return targets
    targets = trainable.lora_targets(model, parts, targets)
    if not targets and parts.within:
        raise ctx.fail(
            "adapter",
            f"train_layers {spec.train_layers} trains the {parts.within} blocks, whose "
            "experts transformers keeps as fused 3-D tensors, not the Linear modules "
            "upstack limits LoRA to: train them without an adapter (or use "
            "train_layers: all, where peft's all-linear adapts them too)",
        )
    if not targets:
        raise ctx.fail(
            "adapter.target_modules",
            f"no Linear module of layers {list(parts.layers)} matches "
            f"{spec.adapter.target_modules}",
        )
    return targets


def load_model(model_path: str, spec: TrainingSpec, ctx):
    """The model to train; for QLoRA its Linear layers in 4-bit NF4, for lora-8bit in int8
    (bitsandbytes)."""
    adapter = spec.adapter
    import torch
    from transformers import BitsAndBytesConfig

    from upstack.models import checkpoints

    kwargs: dict[str, Any] = loading(spec)
    if adapter is not None and adapter.type == "lora-8bit":
        from accelerate import PartialState

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        on_gpu = torch.cuda.is_available()
        kwargs["device_map"] = {"": PartialState().local_process_index if on_gpu else "cpu"}
    if adapter is not None and adapter.type == "qlora":
        from accelerate import PartialState

        on_gpu = torch.cuda.is_available()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32,
        )
        kwargs["device_map"] = {"": PartialState().local_process_index if on_gpu else "cpu"}
    fail = lambda message: ctx.fail("model", message)  # noqa: E731
    return checkpoints.load_model(model_path, ctx.recipe, fail, **kwargs)


def lora_config(
    adapter: Adapter | None,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
):
    """peft's LoraConfig; `target_modules`: the adapter's, or the full module names of the
    trained layers; `modules_to_save`: embeddings or head trained in full beside the adapter."""
    if adapter is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=target_modules or adapter.target_modules,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear)  # bitsandbytes' Linear4bit is one too
