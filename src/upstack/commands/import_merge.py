"""`upstack import-merge`: a mergekit YAML from a model card as a recipe stage, its comments kept."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import yaml

from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe
from upstack.core.settings import STAGE_NAME
from upstack.core.yamltext import parse_yaml, read_text

# Lines that frame a YAML document rather than belong to it: `%YAML 1.2`, `---`, `...`
DOCUMENT_MARKS = re.compile(r"^(%.*|---\s*(#.*)?|\.\.\.\s*(#.*)?)$")


def import_merge(config_path: str, stage: str = "merge", into: str | None = None) -> str:
    """The stage block for the mergekit config at `config_path`; with `into`, also written at
    the end of that recipe's `stages:` (after the whole recipe, block included, loads).

    The config's lines are copied as they are, each indented the same: YAML reads a block moved
    right by a constant as the same data (block scalars keep their relative indentation, flow
    scalars fold their line breaks), and its comments stay where they were."""
    config_text = read_text(Path(config_path))
    config = yaml.safe_load(config_text) if parse_yaml(config_text, config_path) else None
    if not isinstance(config, dict) or "merge_method" not in config:
        raise UserError(f"{config_path}: not a mergekit config (a mapping with merge_method)")
    if not STAGE_NAME.match(stage):
        raise UserError(f"--stage {stage}: a stage name is letters, digits, _ and -")

    recipe_text = read_text(Path(into)) if into else "name: imported\nstages:\n"
    lines = recipe_text.splitlines(keepends=True)
    stages_line, stage_indent, key_indent = _stages_block(lines, into or "recipe")
    recipe = yaml.safe_load(recipe_text) if into else {}
    if stage in ((recipe or {}).get("stages") or {}):
        raise UserError(f"{into}: stages.{stage}: already a stage; name the new one with --stage")

    block, origins = _block(config_text, stage, stage_indent, key_indent)
    at = _end_of_stages(lines, stages_line)
    if at and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    if at > stages_line + 1:  # a blank line between stages, as recipes are written
        block, origins = ["\n", *block], [None, *origins]
    new_text = "".join([*lines[:at], *block, *lines[at:]])
    _check(new_text, into or config_path, config_path, at, origins)
    if into:
        partial = Path(f"{into}.{os.getpid()}.tmp")
        partial.write_text(new_text)
        partial.replace(into)  # atomic: the recipe is the old one or the new one, never half
    return "".join(block)


def _stages_block(lines: list[str], source: str) -> tuple[int, str, str]:
    """The line index of `stages:` and the indentation of its stage names and of their keys."""
    index = next(
        (i for i, line in enumerate(lines) if re.match(r"^stages\s*:\s*(#.*)?$", line)), None
    )
    if index is None:
        raise UserError(
            f"{source}: no `stages:` block at the top level (a flow mapping `stages: {{...}}` "
            "takes the stage by hand)"
        )
    indents = []
    for line in lines[index + 1 :]:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = line[: len(line) - len(line.lstrip())]
        if not indent:
            break
        indents.append(indent)
    stage_indent = min(indents, key=len, default="  ")
    deeper = [i for i in indents if len(i) > len(stage_indent)]
    key_indent = min(deeper, key=len, default=stage_indent * 2)
    return index, stage_indent, key_indent


def _end_of_stages(lines: list[str], stages_line: int) -> int:
    """The index just after the last line of the `stages:` block (comments at the left margin
    that follow it belong to what comes next)."""
    end = stages_line + 1
    for i in range(stages_line + 1, len(lines)):
        line = lines[i]
        if line.strip() and not line[0].isspace() and not line.startswith("#"):
            break  # the next top-level key
        if line.strip() and line[0].isspace():
            end = i + 1
    return end


def _block(
    config_text: str, stage: str, stage_indent: str, key_indent: str
) -> tuple[list[str], list[int | None]]:
    """The stage's lines, and for each the config line it came from (None: a line added here)."""
    block = [f"{stage_indent}{stage}:\n"]
    origins: list[int | None] = [None]
    if stage != "merge":  # a stage's kind defaults to its name
        block.append(f"{key_indent}kind: merge\n")
        origins.append(None)
    for number, line in enumerate(config_text.splitlines(), 1):
        if DOCUMENT_MARKS.match(line):
            continue
        block.append(f"{key_indent}{line}\n" if line.strip() else "\n")
        origins.append(number)
    while block[-1] == "\n":  # blank lines at the end would only push the next stage away
        block.pop()
        origins.pop()
    return block, origins


def _check(new_text: str, recipe_source: str, config_source: str, at: int, origins: list) -> None:
    """Load the recipe with the stage in it; a mistake names the line of the file it is in."""
    directory = Path(recipe_source).parent
    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", dir=directory if os.access(directory, os.W_OK) else None, delete=False
    ) as handle:
        handle.write(new_text)
    try:
        load_recipe(handle.name)
    except UserError as err:
        raise UserError(
            _placed(str(err), handle.name, recipe_source, config_source, at, origins)
        ) from None
    finally:
        Path(handle.name).unlink(missing_ok=True)


def _placed(message: str, temp: str, recipe: str, config: str, at: int, origins: list) -> str:
    """An error about the combined text, pointed at the config's line or the recipe's."""
    match = re.match(rf"^{re.escape(temp)}:(\d+): ", message)
    if match is None:
        return message.replace(temp, recipe)
    line = int(match.group(1))
    rest = message[match.end() :]
    if at < line <= at + len(origins):
        origin = origins[line - at - 1]
        return f"{config}:{origin}: {rest}" if origin else f"{config}: {rest}"
    return f"{recipe}:{line - len(origins) if line > at else line}: {rest}"
