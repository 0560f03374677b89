"""push stage and `upstack push`: a finished stage to the Hub with a model card that tells its whole lineage."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from upstack.core import registry
from upstack.core.errors import UserError, redact
from upstack.core.recipe import Recipe
from upstack.core.results import read_results, results_table
from upstack.core.settings import StageSpec, Strict, names, used_for
from upstack.core.tables import short

# The stage contract (upstack.core.contract)
OUTPUT = "nothing"  # the card it uploaded, for the record
LAYER_MAP = "none"
LAUNCHABLE = False

REPO_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"
# the manifest holds local paths; README.md is the card, written anew
NOT_UPLOADED = ("upstack.json", "README.md")
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class DatasetPush(Strict):
    stage: str = Field(
        description="a synth or pairs stage",
        json_schema_extra={**names("data", "stage"), **used_for("publish")},
    )
    repo_id: str | None = Field(None, pattern=REPO_ID, description="default: <repo_id>-<stage>")


class Spec(StageSpec):
    kind: Literal["push"] = "push"
    model: str = Field(
        description="the model stage to push",
        json_schema_extra={**names("model", "stage"), **used_for("publish")},
    )
    repo_id: str = Field(pattern=REPO_ID, description="org/name on the Hub")
    private: bool = True  # a first push is a draft; make it public on the Hub when it is ready
    license: str | None = Field(
        None, description="default: the base model's, when its card is local"
    )
    datasets: list[DatasetPush] = Field(default_factory=list)


def run(spec: Spec, ctx) -> dict:
    staging = ctx.work_dir / "upload"
    pushed = [
        push_stage(
            ctx.recipe,
            spec.model,
            spec.repo_id,
            private=spec.private,
            license=spec.license,
            staging=staging,
            log=ctx.log,
        )
    ]
    for dataset in spec.datasets:
        repo_id = dataset.repo_id or f"{spec.repo_id}-{dataset.stage}"
        pushed.append(
            push_stage(
                ctx.recipe,
                dataset.stage,
                repo_id,
                private=spec.private,
                license=spec.license,
                staging=staging,
                log=ctx.log,
            )
        )
    (ctx.out_dir / "README.md").write_text(pushed[0].pop("card"))
    for entry in pushed[1:]:
        entry.pop("card")
    (ctx.out_dir / "pushed.json").write_text(json.dumps(pushed, indent=2) + "\n")
    return {"repos": [p["repo_id"] for p in pushed], "files": sum(len(p["files"]) for p in pushed)}


def push_stage(
    recipe: Recipe,
    stage: str,
    repo_id: str,
    *,
    private: bool = True,
    license: str | None = None,
    dry_run: bool = False,
    staging: Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Upload a finished stage (a model, or a synth/pairs data set) with its card; or, on a dry
    run, print what would be uploaded and the card, and send nothing."""
    from upstack.core import runner

    if not re.match(REPO_ID, repo_id):
        raise UserError(f"--repo-id {repo_id}: expected org/name")
    if stage not in recipe.stages:
        raise UserError(f"{recipe.source}: no stage '{stage}' (stages: {', '.join(recipe.stages)})")
    state = runner.states(recipe)[stage]
    if state != "done":
        raise UserError(
            f"{recipe.source}: stages.{stage} is {state}: run `upstack run {recipe.source} {stage}` first"
        )
    stage_dir = recipe.out_dir / stage
    repo_type = "dataset" if registry.kind(recipe.stages[stage].kind).output == "data" else "model"
    card = (dataset_card if repo_type == "dataset" else model_card)(recipe, stage, repo_id, license)
    _refuse_tokens(card)
    files = stage_files(stage_dir)

    if dry_run:
        print(
            f"would create {'private' if private else 'public'} {repo_type} repo {repo_id} and upload:"
        )
        for name in [*files, "README.md"]:
            size = (stage_dir / name).stat().st_size if name in files else len(card.encode())
            print(f"  {name}  ({size:,} bytes)")
        print(f"\n--- README.md (model card) ---\n{card}")
        return {
            "repo_id": repo_id,
            "repo_type": repo_type,
            "files": [*files, "README.md"],
            "card": card,
        }

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # The stage's files and the card go up as one commit from a folder of hard links (no copy of
    # the weights); upload_folder hashes, chunks and batches big files and resumes when rerun.
    staging = Path(staging or recipe.run_dir.internal / "push")
    folder = staging / repo_type / stage
    shutil.rmtree(folder, ignore_errors=True)
    for name in files:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(stage_dir / name, target)
        except OSError:
            shutil.copy2(stage_dir / name, target)
    (folder / "README.md").write_text(card)

    # the token comes from HF_TOKEN or the user's login: never passed, printed or written
    api = HfApi()
    log(f"uploading {len(files) + 1} files to {repo_type} repo {repo_id}")
    try:
        url = api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type=repo_type,
            commit_message=f"upstack: {recipe.name}/{stage}",
        )
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        raise UserError(f"push {repo_id}: the Hub answered {status}{hint}") from None
    return {
        "repo_id": repo_id,
        "repo_type": repo_type,
        "url": str(url),
        "commit": getattr(commit, "oid", None),
        "files": [*files, "README.md"],
        "card": card,
    }


def stage_files(stage_dir: Path) -> list[str]:
    """What a stage dir holds for the Hub: everything but the runner's manifest and an old card."""
    return sorted(
        str(p.relative_to(stage_dir))
        for p in stage_dir.rglob("*")
        if p.is_file() and p.name not in NOT_UPLOADED and not p.name.startswith(".")
    )


# --------------------------------------------------------------------------- cards


def lineage(recipe: Recipe, stage: str) -> list[str]:
    """`stage` and every stage it came from, in run order. An eval stage is listed (it picked a
    sweep's best) but what it scored is not an ancestor of the model."""
    wanted: set[str] = set()
    todo = [stage]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            if registry.kind(recipe.stages[name].kind).output != "results":
                todo.extend(recipe.deps(name))
    return [name for name in recipe.order() if name in wanted]


def model_card(recipe: Recipe, stage: str, repo_id: str, license: str | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    stages = lineage(recipe, stage)
    models, data = _outside_sources(recipe, stages)
    tags = ["upstack", "solar"]
    for name in stages:  # what each stage of the lineage says it was (upscale: its method)
        spec = recipe.stages[name]
        tags += registry.kind(spec.kind).card_tags(spec)
    tags = list(dict.fromkeys(tags))
    data_card = ModelCardData(
        model_name=repo_id,
        base_model=models[0] if len(models) == 1 else (models or None),
        datasets=data or None,
        license=license or _local_license(_local_models(recipe, stages)),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    body = [
        f"# {repo_id.split('/')[-1]}",
        f"Built with upstack from recipe `{recipe.name}`, stage `{stage}`: "
        + " → ".join(f"{n} ({recipe.stages[n].kind})" for n in stages)
        + ".",
        _lineage_section(recipe, stages),
        _eval_section(recipe, stage),
        f"## Reproduce\n\n```bash\nupstack run {Path(recipe.source).name} {stage}\n```",
    ]
    return str(
        ModelCard(f"---\n{data_card.to_yaml()}\n---\n\n" + "\n\n".join(s for s in body if s) + "\n")
    )


def dataset_card(recipe: Recipe, stage: str, repo_id: str, license: str | None = None) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData

    stages = lineage(recipe, stage)
    _, data = _outside_sources(recipe, stages)
    teachers = _teachers(recipe, stages)
    rows = sum(_count_lines(p) for p in (recipe.out_dir / stage).rglob("*.jsonl"))
    data_card = DatasetCardData(
        pretty_name=repo_id.split("/")[-1],
        license=license,
        source_datasets=data or None,
        task_categories=["text-generation"],
        tags=["upstack", "synthetic", "math", recipe.stages[stage].kind],
    )
    body = [
        f"# {repo_id.split('/')[-1]}",
        f"Synthetic data from upstack recipe `{recipe.name}`, stage `{stage}` "
        f"({recipe.stages[stage].kind}): {rows:,} jsonl rows."
        + (f" Teacher models: {', '.join(teachers)}." if teachers else ""),
        _lineage_section(recipe, stages),
    ]
    return str(DatasetCard(f"---\n{data_card.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n"))


def _lineage_section(recipe: Recipe, stages: list[str]) -> str:
    parts = ["## Lineage"]
    for i, name in enumerate(stages, 1):
        spec = recipe.stages[name]
        manifest = recipe.run_dir.manifest(name) or {}
        settings = redact(
            spec.model_dump(mode="json", exclude={"kind", "after"}, exclude_defaults=True)
        )
        parts.append(f"### {i}. `{name}` ({spec.kind})")
        if settings:
            parts.append("```yaml\n" + yaml.safe_dump(settings, sort_keys=False).rstrip() + "\n```")
        metrics = {
            k: v for k, v in manifest.get("metrics", {}).items() if isinstance(v, int | float | str)
        }
        if metrics:
            parts.append("Results: " + ", ".join(f"{k}={short(v)}" for k, v in metrics.items()))
        parts += _layer_notes(manifest.get("metrics", {}))
        # upscale and merge leave the exact mergekit config: the layer map or the merge recipe
        merge_config = recipe.out_dir / name / "mergekit_config.yml"
        if merge_config.is_file():
            text = merge_config.read_text().rstrip()
            # local stage dirs become stage names: the card should not show this machine's paths
            for other in sorted(recipe.stages, key=len, reverse=True):
                for path in (recipe.out_dir / other, (recipe.out_dir / other).resolve()):
                    text = text.replace(str(path), other)
            parts.append(f"mergekit config:\n\n```yaml\n{text}\n```")
    return "\n\n".join(parts)


def _layer_notes(metrics: dict) -> list[str]:
    """An upscale stage's layer map as a compact table; what a training stage trained when it
    trained part of the model."""
    from upstack.core.tables import markdown_table
    from upstack.models.layermap import COMPACT_HEADERS, compact

    notes = []
    if metrics.get("layer_origins"):
        table = markdown_table(COMPACT_HEADERS, compact(metrics["layer_origins"]))
        notes.append(f"Layer map (output layers, where they came from, their roles):\n\n{table}")
    trained = metrics.get("trained") or {}
    if trained and trained.get("train_layers") != "all":
        frozen = [k for k in ("embeddings", "lm_head", "final_norm") if not trained.get(k)]
        share = trained.get("parameters_trainable", 0) / max(trained.get("parameters", 0), 1)
        notes.append(
            f"Trained layers {', '.join(map(str, trained['layers']))} "
            f"(`train_layers: {trained['train_layers']}`)"
            + (f"; frozen: {', '.join(frozen)}" if frozen else "")
            + (f"; {share:.1%} of the parameters trained" if trained.get("parameters") else "")
            + "."
        )
    return notes


def _eval_section(recipe: Recipe, stage: str) -> str:
    """The table of every finished eval stage that scored this model."""
    tables = []
    for name, spec in recipe.stages.items():
        results = read_results(recipe.out_dir / name) if spec.kind == "eval" else None
        if results and any(row["model"] == stage for row in results["rows"]):
            tables.append(
                f"From stage `{name}` (this model is `{stage}`):\n\n{results_table(results)}"
            )
    return "## Evaluation\n\n" + "\n\n".join(tables) if tables else ""


def _outside_sources(recipe: Recipe, stages: list[str]) -> tuple[list[str], list[str]]:
    """Hub ids the lineage reads from outside the recipe: (models its weights come from, data
    sets it was trained on). Evaluation and decontamination sets are not training data."""
    models, data = [], []
    for name in stages:
        for ref in recipe.refs(name):
            if ref.origin == "hub" and ref.thing == "model" and ref.use == "weights":
                models.append(ref.text)
            elif ref.origin == "hub" and ref.thing == "data" and ref.use == "train":
                data.append(ref.text)
    return list(dict.fromkeys(models)), list(dict.fromkeys(data))


def _teachers(recipe: Recipe, stages: list[str]) -> list[str]:
    """The models that wrote synthetic data in the lineage, as their manifests recorded them."""
    found = []
    for name in stages:
        if recipe.stages[name].kind == "synth":
            model = (recipe.run_dir.manifest(name) or {}).get("metrics", {}).get("model")
            found += [model] if model else []
    return list(dict.fromkeys(found))


def _local_models(recipe: Recipe, stages: list[str]) -> list[str]:
    return [
        ref.location
        for name in stages
        for ref in recipe.refs(name)
        if ref.origin == "path" and ref.thing == "model" and ref.use == "weights"
    ]


def _local_license(models: list[str]) -> str | None:
    from huggingface_hub import ModelCard

    for model in models:
        card = Path(model) / "README.md"
        if card.is_file():
            return ModelCard.load(card).data.license
    return None


def _refuse_tokens(text: str) -> None:
    for var in TOKEN_VARS:
        token = os.environ.get(var)
        if token and len(token) > 3 and token in text:
            raise UserError(
                f"push: the card would contain the value of {var}: remove it from the recipe"
            )


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())
