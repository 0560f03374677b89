"""What TRL's config classes take: each field's name and type annotation, and whether a YAML value
is of a type the annotation names. The load-time check of `trainer:` keys (upstack.train.spec)
asks here."""

from __future__ import annotations

import math
import re
from typing import Any


def trainer_fields(config_name: str) -> dict[str, str]:
    """Field name -> type annotation (as a string) of a TRL config class. Importing trl takes
    seconds (torch comes with it), so the fields are cached per TRL version and `upstack status`
    stays quick."""
    from upstack.core.check_cache import library_facts

    def fields() -> dict[str, str]:
        import dataclasses

        import trl

        config = getattr(trl, config_name)
        return {f.name: str(f.type) for f in dataclasses.fields(config) if f.init}

    return library_facts("trl", config_name, fields)


# Where each numeric field of TRL's SFTConfig and DPOConfig (and the TrainingArguments under them)
# means something: (lowest value, whether it is allowed, highest value or None, allowed sentinel
# values). A value outside is refused at load, not met as a ZeroDivisionError (logging_steps: 0),
# an empty loop (learning_rate: 0) or a silent no-op hours later. tests/test_variants.py checks
# that every numeric field of the installed TRL is listed here.
POSITIVE = (0, False, None, ())
NON_NEGATIVE = (0, True, None, ())
FRACTION = (0, True, 1, ())  # [0, 1]
DOMAINS: dict[str, tuple[float, bool, float | None, tuple]] = {
    # optimization
    "learning_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": (0, True, 0.999999, ()),
    "adam_beta2": (0, True, 0.999999, ()),
    "adam_epsilon": POSITIVE,
    "max_grad_norm": NON_NEGATIVE,  # 0 turns clipping off
    "warmup_steps": NON_NEGATIVE,  # below 1: a fraction of the steps
    "label_smoothing_factor": (0, True, 0.999999, ()),
    "neftune_noise_alpha": POSITIVE,
    "router_aux_loss_coef": NON_NEGATIVE,
    # how much and how often
    "per_device_train_batch_size": POSITIVE,
    "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "eval_accumulation_steps": POSITIVE,
    "num_train_epochs": POSITIVE,
    "max_steps": (1, True, None, (-1,)),  # -1: train num_train_epochs instead
    "logging_steps": POSITIVE,  # below 1: a fraction of the steps
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": (1, True, None, ()),
    "torch_empty_cache_steps": POSITIVE,
    "max_length": POSITIVE,
    "pad_to_multiple_of": POSITIVE,
    "precompute_ref_batch_size": POSITIVE,
    # processes and data loading
    "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": POSITIVE,
    "dataset_num_proc": POSITIVE,
    "ddp_timeout": POSITIVE,
    "ddp_bucket_cap_mb": POSITIVE,
    "local_rank": (-1, True, None, ()),  # the launcher's
    "seed": (0, True, 2**32 - 1, ()),
    "data_seed": (0, True, 2**32 - 1, ()),
    # DPO
    "beta": POSITIVE,
    "label_smoothing": (0, True, 0.5, ()),  # cDPO: the share of flipped labels, below a half
    "ref_model_mixup_alpha": FRACTION,
    "ref_model_sync_steps": POSITIVE,
    "discopop_tau": POSITIVE,
    "f_alpha_divergence_coef": FRACTION,
    "ld_alpha": FRACTION,
}


def domain_problem(field: str, value: Any) -> str | None:
    """Why a number is outside what field `field` means, or None. A numeric field this table
    does not know (a newer TRL) keeps to the sign of its declared default."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return f"not a finite number (got {value!r})"
    low, inclusive, high, sentinels = DOMAINS.get(field, NON_NEGATIVE)
    if value in sentinels:
        return None
    below = value < low or (value == low and not inclusive)
    if below or (high is not None and value > high):
        sign = ">=" if inclusive else ">"
        wanted = f"{sign} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        also = f" (or {', '.join(map(str, sentinels))})" if sentinels else ""
        return f"must be {wanted}{also}, got {value!r}"
    return None


# `report_to` names -> the package each integration imports (transformers' integrations)
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "swanlab": "swanlab",
    "dvclive": "dvclive",
    "neptune": "neptune",
    "codecarbon": "codecarbon",
    "azure_ml": "azureml",
    "dagshub": "dagshub",
    "flyte": "flytekit",
}


def trackers_problem(value: Any) -> str | None:
    """Why `report_to` would fail when training starts, or None: a tracker transformers does not
    know, or whose package is not installed here."""
    import importlib.util

    names = [value] if isinstance(value, str) else list(value or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in TRACKERS:
            import difflib

            close = difflib.get_close_matches(str(name), list(TRACKERS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            return f"no tracker '{name}' (known: {', '.join(TRACKERS)}, none, all){hint}"
        if importlib.util.find_spec(TRACKERS[name]) is None:
            return f"{name} is not installed here: pip install {TRACKERS[name]}"
    return None


def numeric_fields(config_name: str) -> list[str]:
    """The fields of a TRL config whose annotation names int or float."""
    return [
        name
        for name, annotation in trainer_fields(config_name).items()
        if {"int", "float"} & {_base_name(m) for m in _union_members(annotation)}
    ]


# The types a TRL field annotation names, as YAML gives them; anything else (an enum, a config
# class, Literal) is left for TRL to judge.
YAML_TYPES = {
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "list": (list, str),  # TRL turns a lone string into a one-element list (report_to, loss_type)
    "dict": (dict, str),  # a JSON string is accepted where TRL takes a dict
    "None": (type(None),),
    "NoneType": (type(None),),
}


def wrong_type(annotation: str, value: Any) -> str | None:
    """What a field of this annotation expects, when `value` is none of it; else None."""
    names = [_base_name(member) for member in _union_members(annotation)]
    if any(name not in YAML_TYPES for name in names):
        return None  # a type we cannot judge from YAML: TRL will
    for name in names:
        accepted = YAML_TYPES[name]
        # YAML's true/false are not numbers here, even though bool subclasses int in Python
        if isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted):
            return None
    return " or ".join(dict.fromkeys("null" if n in ("None", "NoneType") else n for n in names))


def _union_members(annotation: str) -> list[str]:
    """'int | None' -> ['int', 'None']; "typing.Optional[int]" -> ['int', 'None']."""
    text = re.sub(r"<class '([\w.]+)'>", r"\1", annotation.strip()).replace("typing.", "")
    match = re.fullmatch(r"(Union|Optional)\[(.*)\]", text)
    members = _split_top(match.group(2), ",") if match else _split_top(text, "|")
    if match and match.group(1) == "Optional":
        members.append("None")
    if len(members) == 1 and members[0] == text:
        return [text]
    return [inner for member in members for inner in _union_members(member)]


def _split_top(text: str, separator: str) -> list[str]:
    """`text` split at `separator` outside brackets: 'dict[str, int], None' -> two parts."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == separator and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def _base_name(member: str) -> str:
    """'dict[str, Any]' -> 'dict'; 'transformers.trainer_utils.SchedulerType' -> 'SchedulerType'."""
    return member.split("[", 1)[0].rsplit(".", 1)[-1]


def trainer_defaults(config_name: str) -> dict[str, Any]:
    """Field name -> declared default of a TRL config class, for the fields whose default is a
    plain value (numbers, strings, booleans, None): what a plan counts with where the recipe's
    `trainer:` says nothing. Cached per TRL version, like `trainer_fields`."""
    from upstack.core.check_cache import library_facts

    def defaults() -> dict[str, Any]:
        import dataclasses

        import trl

        config = getattr(trl, config_name)
        out = {}
        for f in dataclasses.fields(config):
            value = f.default
            if f.init and (value is None or isinstance(value, bool | int | float | str)):
                out[f.name] = getattr(value, "value", value)
        return out

    return library_facts("trl", f"{config_name}-defaults", defaults)
