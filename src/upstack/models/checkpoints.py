"""Model checkpoints on disk, read from their safetensors headers without loading a tensor."""

from __future__ import annotations

from pathlib import Path


def count_parameters(model_dir: Path | str) -> int:
    """Parameters in a checkpoint's safetensors shards."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                count = 1
                for size in handle.get_slice(key).get_shape():
                    count *= size
                total += count
    return total


# Weights saved with pickle: loading one runs whatever code the file holds.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def model_dir_problem(path: Path, allow_pickle: bool = False) -> str | None:
    """Why `path` is not a checkpoint upstack can load, or None: a missing dir or config.json,
    no weights, a truncated or corrupted safetensors shard, or pickled weights only."""
    path = Path(path)
    if not path.exists():
        return f"{path}: no such directory"
    if not path.is_dir():
        return f"{path} is a file, not a model dir"
    if not (path / "config.json").is_file():
        return f"{path} has no config.json: not a transformers model dir"
    shards = sorted(path.glob("*.safetensors"))
    for shard in shards:
        problem = safetensors_problem(shard)
        if problem:
            return problem
    if shards:
        return None
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and not allow_pickle:
        return (
            f"{path} holds only pickled weights ({pickled[0]}), which upstack does not load "
            '(unpickling runs code from the file): convert them once with `python -c "from '
            "transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}')\"`, or set "
            "`allow_pickle: true` in the recipe if you trust the file"
        )
    return None if pickled else f"{path} has no weights (*.safetensors)"


def safetensors_problem(shard: Path) -> str | None:
    """None when the shard's header parses and covers the file (so it is not cut short)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(shard, framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (
            f"{shard}: not a readable safetensors file ({reason}); it may be truncated or "
            "corrupted: write or download it again"
        )
    return None


def hub_hint() -> str:
    """What to add to an error about a Hub model or data set that could not be fetched."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return " (HF_HUB_OFFLINE is set: only files already in the local cache can be used)"
    return " (no network, or no access: log in with `hf auth login`, or set HF_HUB_OFFLINE=1 to use the cache)"


def hub_model_problem(repo_id: str) -> str | None:
    """Offline (HF_HUB_OFFLINE), a Hub model must already be in the local cache: say so before
    the run rather than when the stage reaches it."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return None  # online: whether it exists is known only by asking, when the stage runs
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    return f"{repo_id} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"


def from_pretrained(loader, location: str, fail, **kwargs):
    """`loader.from_pretrained(location, **kwargs)`; what keeps it from loading (a missing file,
    the Hub out of reach, a broken shard) becomes one line through `fail(message)`."""
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if Path(location).exists() else hub_hint()
        raise fail(f"cannot load {location}: {reason}{hint}") from None
