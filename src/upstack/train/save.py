"""What a training stage leaves in its stage dir: a plain checkpoint (an adapter merged into the
full-precision base) that loads for inference, and a plot of its losses."""

from __future__ import annotations

import shutil
from pathlib import Path

from upstack.train.settings import CHECKPOINTS
from upstack.train.spec import TrainingSpec


def save(trainer, tokenizer, spec: TrainingSpec, ctx) -> None:
    """A plain HF checkpoint at the stage dir's root (adapters merged), plus loss.png.

    Every rank calls this (saving a sharded model is collective); only rank 0 writes files.
    """
    adapter = spec.adapter
    if adapter is None:
        trainer.save_model(str(ctx.out_dir))
    else:
        trainer.save_model(str(ctx.out_dir / "adapter"))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return
    if adapter is not None:
        merge_adapter(spec, tokenizer, ctx.out_dir / "adapter", ctx.out_dir, ctx)
    for pickled in ctx.out_dir.rglob("training_args.bin"):
        pickled.unlink()  # a pickle; the manifest holds the settings as JSON
    finish_checkpoint(ctx.out_dir, tokenizer)
    plot_losses(
        trainer.state.log_history,
        ctx.out_dir / "loss.png",
        f"{ctx.recipe.name} / {ctx.name}",
        eval_sources(trainer),
    )
    # big, and the stage is done: checkpoints and the streamed selections of its data
    shutil.rmtree(ctx.work_dir / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(ctx.work_dir / "streamed", ignore_errors=True)


def merge_adapter(spec: TrainingSpec, tokenizer, adapter_dir: Path, out_dir: Path, ctx) -> None:
    """Base reloaded in full precision (never the 4-bit or int8 copy) + adapter, merged into plain
    weights; with the rows of added tokens, which the adapter trained in full."""
    from peft import PeftModel

    from upstack.models.checkpoints import load_model
    from upstack.train.settings import loading

    base_path = ctx.ref("model").location
    fail = lambda message: ctx.fail("model", message)  # noqa: E731
    base = load_model(base_path, ctx.recipe, fail, **loading(spec))
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)


def finish_checkpoint(out_dir: Path, tokenizer) -> None:
    """What training leaves wrong for inference: use_cache off, generation config without eos/pad."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(out_dir)
    config.use_cache = True  # training turns the KV cache off
    if hasattr(config, "output_router_logits"):
        # TRL turned them on for the aux loss; inference needs none
        config.output_router_logits = False
    config.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(out_dir)
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # with its chat template


def eval_sources(trainer) -> list[str]:
    """The names of a mixture's held-out sets (a dict of eval data sets); none for one set."""
    held_out = trainer.eval_dataset
    return sorted(held_out) if isinstance(held_out, dict) else []


def plot_losses(history: list[dict], path: Path, title: str, sources: list[str] = ()) -> None:
    """Train loss, eval loss and each source's held-out loss by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("loss", "train"), ("eval_loss", "eval")]
    series += [(f"eval_{name}_loss", f"eval {name}") for name in sources]  # one per source
    for key, label in series:
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(
                *zip(*points, strict=True),
                marker="." if label.startswith("eval") else None,
                label=label,
            )
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
