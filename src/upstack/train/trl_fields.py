"""What TRL's config classes take: each field's name and type annotation, and whether a YAML value
is of a type the annotation names. The load-time check of `trainer:` keys (upstack.train.spec)
asks here."""

from __future__ import annotations

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
