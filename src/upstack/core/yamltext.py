"""The YAML a user wrote: read as UTF-8, parsed with its line numbers kept, bounded (alias bombs,
tags), its keys located (`FILE:LINE`, or the `--set` that gave them), and `--set KEY=VALUE`
overrides applied."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from upstack.core.errors import UserError, looks_like_secret
from upstack.core.keys import KeyPath


def read_text(path: Path) -> str:
    """The recipe's text; a missing file or bytes that are not UTF-8 are one-line errors."""
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the recipe as UTF-8"
        ) from None


# A recipe has hundreds of values; YAML aliases (*name) can make a few lines stand for billions.
MAX_VALUES = 100_000


def parse_yaml(text: str, source: str) -> yaml.Node | None:
    """The YAML node tree (kept for line numbers), refusing syntax errors, alias bombs and
    duplicate keys."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        message = problem or str(err).splitlines()[0]
        if context_mark is not None and (mark is None or "end of stream" in (problem or "")):
            # an unclosed quote or bracket runs to the end of the file: name where it opened
            mark, message = context_mark, f"{context} that is never closed"
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{source}{line}: not valid YAML: {message}") from None
    values = _expanded_size(root)
    if values > MAX_VALUES:
        raise UserError(
            f"{source}: its aliases (*name) expand it to over {MAX_VALUES:,} values "
            f"({values:,}); a recipe is never that large: write the repeated part once"
        )
    _refuse_duplicate_keys(root, source, ())
    return root


def construct(text: str, source: str) -> Any:
    """The YAML's plain data (parse_yaml has refused what cannot be read or is too large)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:  # a tag (!python/object, !foo) only a full loader would take
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{source}{line}: not plain YAML data: {problem}") from None


def _expanded_size(root: yaml.Node | None) -> int:
    """How many values the YAML holds once every alias is expanded (shared nodes counted each
    time they are used), computed without expanding: a few loops over the distinct nodes."""
    if root is None:
        return 0
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = (
            [part for pair in node.value for part in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        if children_done or not children:
            sizes[id(node)] = min(1 + sum(sizes.get(id(c), 1) for c in children), 2**62)
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def leaves(data: Any, loc: tuple = ()):
    """(key path, value) of every plain value in YAML data."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from leaves(value, (*loc, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from leaves(value, (*loc, i))
    else:
        yield loc, data


FLOAT_TEXT = re.compile(
    r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$"
)  # 1e999: what YAML 1.1 leaves a string


def finite(value: Any) -> bool:
    """False for a float that is NaN or infinite, or a number written so large it overflows."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str) and FLOAT_TEXT.match(value.strip()):
        return math.isfinite(float(value))
    return True


def _refuse_duplicate_keys(node: yaml.Node | None, source: str, loc: tuple) -> None:
    """YAML keeps the last of two equal keys and drops the first without a word: a stage block
    copied and not renamed would vanish. Both lines are named instead."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key == "<<":  # a merge key (`<<: *anchor`): its keys may be overridden here
                continue
            if key in seen:
                path = KeyPath((*loc, key))
                raise UserError(
                    f"{source}:{line}: {path}: given twice (lines {seen[key]} and {line}); "
                    "YAML would keep only the last"
                )
            seen[key] = line
            _refuse_duplicate_keys(value_node, source, (*loc, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, source, (*loc, i))


def located(root: yaml.Node | None, source: str, overrides, loc: tuple[str | int, ...]) -> str:
    """Where a key came from: the `--set` that touched it, else the file and line that hold it."""
    keys = tuple(str(k) for k in loc)
    for item in overrides:
        key_path = tuple(item.split("=", 1)[0].split("."))
        if keys[: len(key_path)] == key_path or key_path[: len(keys)] == keys:
            return f"--set {shown_override(item)}"
    line = line_of(root, loc)
    return f"{source}:{line}" if line else source


def shown_override(item: str) -> str:
    """A `--set KEY=VALUE` as errors print it: a value that looks like a secret is not repeated."""
    key, sep, value = item.partition("=")
    return f"{key}=<redacted>" if sep and looks_like_secret(value) else item


_OVERRIDE = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)*)=(.*)$", re.S)


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    match = _OVERRIDE.match(item)
    if not match:
        raise UserError(
            f"--set {shown_override(item)}: expected key.path=value, e.g. stages.sft.trainer.learning_rate=1e-5"
        )
    try:
        value = yaml.safe_load(match.group(2)) if match.group(2) else ""
    except yaml.YAMLError:
        value = match.group(2)  # not YAML: keep the literal text
    return tuple(match.group(1).split(".")), value


def set_path(raw: dict, key_path: tuple[str, ...], value: Any, item: str) -> None:
    node: Any = raw
    for i, key in enumerate(key_path[:-1]):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise UserError(
                f"--set {shown_override(item)}: {KeyPath(key_path[:i])} is not a mapping"
            )
        node = node.setdefault(key, {})
    last = key_path[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {shown_override(item)}: {KeyPath(key_path[:-1])} is not a mapping")


def line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest part of `loc` that exists in the YAML tree."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line
