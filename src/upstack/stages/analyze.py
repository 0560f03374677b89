"""analyze stage: how much each block of layers changes the hidden state on the recipe's text
(angular distance, Block Influence), and the block cheapest to drop or to duplicate at a seam."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from upstack.core.settings import StageSpec, names
from upstack.models.checkpoints import check_model
from upstack.train.data import Source, check_sources

# The stage contract (upstack.core.contract)
OUTPUT = "analysis"  # analysis.json: an upscale's `analysis:` reads it
LAYER_MAP = "none"
LAUNCHABLE = False


class Spec(StageSpec):
    kind: Literal["analyze"] = "analyze"
    model: str = Field(
        description="the model to measure: a stage of this recipe, a local dir or a Hub id",
        json_schema_extra=names("model"),
    )
    datasets: list[Source] = Field(
        min_length=1, description="text to run the model over: a `text` column, as cpt reads"
    )
    # Gromov et al. found the distances stable from a few hundred thousand tokens on 7B-70B
    # models; 64 x 256 = 16k tokens ranks the blocks of a small model the same way run to run.
    samples: int = Field(64, ge=1, description="sequences measured, each max_length tokens")
    max_length: int = Field(256, ge=2, description="tokens per sequence (documents packed)")
    batch_size: int = Field(8, ge=1)


def preflight(spec: Spec, ctx) -> None:
    """Before anything runs: the model is a checkpoint upstack can load, the text is there."""
    check_model(ctx, tokenizer=True)
    check_sources(spec.datasets, ctx, "text")


def run(spec: Spec, ctx) -> dict:
    import torch

    from upstack.models import layer_analysis
    from upstack.models.checkpoints import load_model
    from upstack.train.data import build_mixture
    from upstack.train.inputs import load_tokenizer

    path = ctx.ref("model").location
    model = load_model(path, ctx.recipe, lambda message: ctx.fail("model", message)).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    tokenizer = load_tokenizer(path, ctx)
    rows, _ = build_mixture(spec.datasets, "text", ctx)
    # row by row: a large corpus is read only as far as the sample needs
    sequences = packed(tokenizer, (row["text"] for row in rows), spec.samples, spec.max_length)
    if not sequences:
        raise ctx.fail("datasets", f"the text gives fewer than max_length={spec.max_length} tokens")
    chunks = (
        torch.tensor(sequences[i : i + spec.batch_size], device=device)
        for i in range(0, len(sequences), spec.batch_size)
    )
    batches = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in chunks)
    try:
        results = layer_analysis.measure(model, batches)
    except ValueError as err:
        raise ctx.fail("model", str(err)) from None
    results = {
        "model": ctx.ref("model").text,
        "samples": len(sequences),
        "max_length": spec.max_length,
        **results,
        "blocks": layer_analysis.cheapest_blocks(results["angular_distance"]),
    }

    (ctx.out_dir / layer_analysis.RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    table = layer_analysis.table(results)
    (ctx.out_dir / layer_analysis.TABLE).write_text(f"# {ctx.name}: {results['model']}\n\n{table}")
    layer_analysis.plot(
        results, ctx.out_dir / layer_analysis.PLOT, f"{ctx.recipe.name} / {ctx.name}"
    )
    ctx.log(table)
    single = results["blocks"][0]
    return {
        "layers": results["layers"],
        "tokens": results["tokens"],
        "cheapest_layer": single["start"],
        "cheapest_layer_distance": single["angular_distance"],
        "cheapest_blocks": {b["size"]: b["start"] for b in results["blocks"]},
    }


def packed(tokenizer, texts, samples: int, length: int) -> list[list[int]]:
    """Up to `samples` sequences of exactly `length` tokens: documents joined by eos and cut,
    as cpt packs them, so every position is a real token and no padding is measured."""
    ids: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        if len(ids) >= samples * length:
            break
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:samples]
