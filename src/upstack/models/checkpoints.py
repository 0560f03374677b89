"""Model checkpoints: what upstack loads and how. The one owner of the loading policy
(safetensors only unless the recipe sets `allow_pickle`; a model's own code only with
`trust_remote_code`), of the check that a model a stage names can be loaded, and of what upstack
reads from a checkpoint's files without loading a tensor (parameter counts, headers)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{path}/config.json is not readable JSON ({err}): it may be cut short"
    if not isinstance(config, dict) or not config.get("model_type"):
        return f"{path}/config.json names no model_type: transformers cannot tell what it is"
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


@dataclass(frozen=True)
class Policy:
    """What a load may do; a recipe is one too (its `trust_remote_code` and `allow_pickle`)."""

    trust_remote_code: bool = False
    allow_pickle: bool = False


SAFE = Policy()  # a load outside any recipe (benches, tools): safetensors, no model code


def model_problem(ref, recipe, pending: bool = False) -> str | None:
    """Why the model reference `ref` (upstack.core.refs) cannot be loaded, or None; checked
    before a run. A model this run builds first (`pending`) is not there yet; a Hub model is
    checked only offline (it must be in the cache then)."""
    if pending:
        return None
    if ref.origin == "hub":
        return hub_model_problem(ref.location)
    return model_dir_problem(Path(ref.location), recipe.allow_pickle)


def check_model(ctx, key: str = "model", tokenizer: bool = False) -> None:
    """A stage's preflight: the model at `key` can be loaded (and, for a stage that tokenizes,
    has a tokenizer), else its one-line error."""
    ref = ctx.ref(key)
    problem = model_problem(ref, ctx.recipe, ctx.is_pending(ref))
    if problem is None and tokenizer and ref.origin != "hub" and not ctx.is_pending(ref):
        problem = tokenizer_problem(Path(ref.location))
    if problem:
        raise ctx.fail(key, problem)


def config_json(ref) -> dict | None:
    """The config.json of a model reference (upstack.core.refs) that is not a stage: a local
    dir's, or a Hub model's if it is in the local cache (nothing is fetched); None otherwise."""
    if ref.origin == "stage":
        return None
    if ref.origin == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref.location, "config.json")
        path = Path(cached) if isinstance(cached, str) else None
    else:
        path = Path(ref.location, "config.json")
    try:
        config = json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def wrapper_problem(config: dict | None) -> str | None:
    """Why the model of this config.json is not one upstack grows, trains or merges: a multimodal
    wrapper (Gemma 3 4B and up, Llama 4, Mistral 3, the Qwen-VLs), which keeps its language
    model's settings in `text_config` and its weights beside a vision tower.

    Refused rather than trained in place: every layer-aware step (train_layers, layer maps,
    growth, routers) reads the decoder from the top-level config, and mergekit's definitions of
    the wrappers name the tensors as transformers 4 saved them, not as transformers 5 writes
    them back, so the next merge of a trained wrapper would fail. Its text model is a causal LM
    of its own (Gemma3ForCausalLM for gemma3_text), which every stage takes."""
    text = (config or {}).get("text_config")
    if not isinstance(text, dict) or "num_hidden_layers" in config:
        return None
    name = (config.get("architectures") or [config.get("model_type")])[0]
    text_type = text.get("model_type")
    bring = f" (model_type {text_type})" if text_type else ""
    return (
        f"{name} is a multimodal wrapper (its language model's settings are in text_config): "
        f"upstack grows, trains and merges causal language models only; bring its text "
        f"model{bring} instead"
    )


# What a saved tokenizer consists of: one of these holds its vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def tokenizer_problem(path: Path) -> str | None:
    """Why the model dir has no tokenizer transformers can load, or None."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return (
            f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): copy the base "
            "model's tokenizer files beside the weights"
        )
    return None


def chat_template_problem(path: Path) -> str | None:
    """Why conversations cannot be rendered with the model dir's tokenizer, or None: it has no
    chat template (tokenizer_config.json's `chat_template`, chat_template.jinja or .json)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return None
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("chat_template"):
        return None
    return (
        f"model {path} has no chat template; set `chat_template:` (a Jinja string or a .jinja file)"
    )


def load_model(location: str, recipe, fail, **kwargs):
    """A causal LM under the recipe's loading policy (safetensors only unless allow_pickle, its
    own code only with trust_remote_code), in the dtype it was saved in unless `kwargs` say
    otherwise; what keeps it from loading is one line through `fail(message)`."""
    from transformers import AutoModelForCausalLM

    policy = {
        "dtype": "auto",
        "trust_remote_code": recipe.trust_remote_code,
        "use_safetensors": None if recipe.allow_pickle else True,
    }
    return from_pretrained(AutoModelForCausalLM, location, fail, **{**policy, **kwargs})


def load_tokenizer(location: str, recipe, fail, **kwargs):
    from transformers import AutoTokenizer

    return from_pretrained(
        AutoTokenizer, location, fail, trust_remote_code=recipe.trust_remote_code, **kwargs
    )


def from_pretrained(loader, location: str, fail, **kwargs):
    """`loader.from_pretrained(location, **kwargs)`; what keeps it from loading (a missing file,
    the Hub out of reach, a broken shard) becomes one line through `fail(message)`."""
    from safetensors import SafetensorError

    from upstack.models import peer

    peer.register()  # a PEER model loads by upstack's own classes, not the code beside it
    try:
        return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if Path(location).exists() else hub_hint()
        raise fail(f"cannot load {location}: {reason}{hint}") from None


# --------------------------------------------------------------------------- files beside the weights

SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]?)B?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, as mergekit's own sizes)."""
    number, unit = SIZE.match(text.strip()).groups()
    return int(float(number) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[unit.upper()])


def update_config(model_dir: Path, settings: dict[str, Any]) -> None:
    """Set keys of a checkpoint's config.json."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update(settings)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def fix_dtype(model_dir: Path, dtype: str | None) -> None:
    """config.json says the dtype asked for, under the name transformers 5 reads (`dtype`)."""
    if not dtype:
        return
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
