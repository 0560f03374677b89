"""`upstack import-merge`: a mergekit YAML from a model card as recipe stages, its comments kept.

The card's lines are copied as they are. What changes is said, a line each: a mergekit-multi file
(several documents, each with a `name:`) becomes a stage per document; a name that is no stage
name is made one, and the documents that name it follow; a model name that is none of a stage, a
local path or a Hub id (the card author's `G:\\models\\x`) stays as written for the user to
replace, and the recipe refuses it at load until then."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from upstack.core.errors import UserError
from upstack.core.keys import KeyPath
from upstack.core.recipe import load_recipe
from upstack.core.refs import BEST, HUB_ID, LOOKS_LOCAL
from upstack.core.settings import STAGE_NAME
from upstack.core.yamltext import construct, parse_yaml, read_text
from upstack.models import merging

# `---` between two documents; `%YAML 1.2` and `...` frame one. None of them is copied.
DOCUMENT_START = re.compile(r"^---\s*(#.*)?$")
DOCUMENT_MARKS = re.compile(r"^(%.*|\.\.\.\s*(#.*)?)$")
REPLACE = "replace with a stage, a local path or a Hub id"
# While the recipe is checked, a name to replace stands as a Hub id (resolved, never fetched):
# one per distinct name, so mergekit's checks that compare models (a base among them) still hold.
PLACEHOLDER = "upstack-to-replace/model-{}"


@dataclass
class Document:
    """One YAML document of the card: a mergekit config (and its `name:` in a mergekit-multi file)."""

    lines: list[tuple[int, str]]  # (the card's line number, the line)
    root: yaml.Node  # its nodes carry the card's line numbers
    config: dict[str, Any]
    line: int  # its first key's line
    name: str | None = None
    name_line: int | None = None


@dataclass
class Imported:
    block: str  # the stages' lines, as written into the recipe
    stages: list[str]
    notes: list[str] = field(default_factory=list)  # what the user is to know, a line each


def import_merge(config_path: str, stage: str | None = None, into: str | None = None) -> Imported:
    """The stages for the mergekit config at `config_path`, one per document of a mergekit-multi
    file; `stage` names the final merge (the document without `name:`, else the last; by default
    it keeps its `name:`, else is `merge`). With `into`, they are also written at the end of that
    recipe's `stages:`, after the whole recipe, new stages included, loads.

    Lines are copied each indented the same: YAML reads a block moved right by a constant as the
    same data (block scalars keep their relative indentation, flow scalars fold their line
    breaks), and its comments stay where they were."""
    if stage is not None and not STAGE_NAME.match(stage):
        raise UserError(f"--stage {stage}: a stage name is letters, digits, _ and -")
    documents = [_document(part, config_path) for part in _split(read_text(Path(config_path)))]

    recipe_text = read_text(Path(into)) if into else "name: imported\nstages:\n"
    lines = recipe_text.splitlines(keepends=True)
    stages_line, stage_indent, key_indent = _stages_block(lines, into or "recipe")
    existing = _stage_names_of(recipe_text, into) if into else set()
    names, notes = _stage_names(documents, stage, existing, config_path, into)
    renamed = {d.name: name for d, name in zip(documents, names, strict=True) if d.name is not None}
    known = existing | set(names)

    placeholders: dict[str, str] = {}  # a name to replace -> what stands for it in the check

    def written(model: merging.ModelName) -> str:
        return renamed.get(model.text, model.text)  # mergekit-multi's name of a document: its stage

    def checked(model: merging.ModelName) -> str:
        if model.text in renamed or not _to_replace(model.text, known):
            return written(model)
        return placeholders.setdefault(model.text, PLACEHOLDER.format(len(placeholders) + 1))

    at = _end_of_stages(lines, stages_line)
    if at and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    block: list[str] = []  # as written
    block_checked: list[str] = []  # the same lines, names to replace standing as Hub ids
    origins: list[int | None] = []  # each line's line in the card (None: a line added here)
    marked: list[tuple[int, str, str, tuple]] = []  # (card line, name, stage, key path)
    for document, name in zip(documents, names, strict=True):
        if at > stages_line + 1 or block:  # a blank line between stages, as recipes are written
            block.append("\n")
            block_checked.append("\n")
            origins.append(None)
        changes = _changes(document, merging.with_locations(document.config, written), config_path)
        lines_written, lines_origins = _block(document, name, stage_indent, key_indent, changes)
        changes = _changes(document, merging.with_locations(document.config, checked), config_path)
        lines_checked, _ = _block(document, name, stage_indent, key_indent, changes)
        block += lines_written
        block_checked += lines_checked
        origins += lines_origins
        for model in merging.model_names(document.config):
            if model.text not in renamed and _to_replace(model.text, known):
                node, _ = _scalar(document.root, model.loc)
                line = node.start_mark.line + 1 if node is not None else document.line
                marked.append((line, model.text, name, model.loc))

    source = str(Path(into or config_path))
    checked_text = "".join([*lines[:at], *block_checked, *lines[at:]])
    _check(checked_text, source, config_path, at, origins, placeholders)
    if into:
        new_text = "".join([*lines[:at], *block, *lines[at:]])
        partial = Path(f"{into}.{os.getpid()}.tmp")
        partial.write_text(new_text)
        partial.replace(into)  # atomic: the recipe is the old one or the new one, never half

    in_recipe = {origin: at + i + 1 for i, origin in enumerate(origins) if origin is not None}
    for line, text, name, loc in sorted(marked, key=lambda mark: mark[0]):
        key = f"stages.{name}.{KeyPath(loc)}"
        where = f"{into}:{in_recipe[line]}, {key}" if into and line in in_recipe else key
        notes.append(f"{config_path}:{line}: '{text}': {REPLACE} ({where})")
    return Imported("".join(block), names, notes)


# --------------------------------------------------------------------------- the card


def _split(text: str) -> list[list[tuple[int, str]]]:
    """The card's documents, each as its numbered lines. A part with nothing but comments (a
    header above the first `---`) goes with the document after it."""
    parts: list[list[tuple[int, str]]] = [[]]
    for number, line in enumerate(text.splitlines(), 1):
        if DOCUMENT_START.match(line):
            parts.append([])
        elif not DOCUMENT_MARKS.match(line):
            parts[-1].append((number, line))
    documents: list[list[tuple[int, str]]] = []
    waiting: list[tuple[int, str]] = []
    for part in parts:
        waiting += part
        if any(line.strip() and not line.lstrip().startswith("#") for _, line in part):
            documents.append(waiting)
            waiting = []
    if waiting and documents:  # comments after the last document
        documents[-1] += waiting
    return documents or [waiting]


def _document(lines: list[tuple[int, str]], source: str) -> Document:
    """One document, parsed with the card's line numbers (its lines at their places, the rest
    blank), so each mistake names the card's line."""
    padded = [""] * (lines[-1][0] if lines else 0)
    for number, line in lines:
        padded[number - 1] = line
    text = "\n".join(padded) + "\n"
    root = parse_yaml(text, source)
    config = construct(text, source)
    line = root.start_mark.line + 1 if root is not None else 1
    if not isinstance(config, dict) or "merge_method" not in config:
        if isinstance(config, dict) and "experts" in config:
            raise UserError(
                f"{source}:{line}: a mergekit-moe config (experts:): write an upscale stage with "
                "`method: moe` instead (README, stage kinds); import-merge takes the configs of "
                "mergekit-yaml and mergekit-multi"
            )
        raise UserError(f"{source}:{line}: not a mergekit config (a mapping with merge_method)")
    document = Document(lines, root, config, line)
    if "name" in config:  # a mergekit-multi document: its name becomes the stage's
        key, value = next((k, v) for k, v in root.value if k.value == "name")
        name_line = key.start_mark.line + 1
        if isinstance(value, yaml.CollectionNode):
            raise UserError(f"{source}:{name_line}: name: a document's name is a word, like step1")
        if key.start_mark.column != 0 or value.end_mark.line != key.start_mark.line:
            # the line is kept as a comment under the stage: it must hold the name alone
            raise UserError(
                f"{source}:{name_line}: name: write a document's name on a line of its own "
                "(`name: NAME`)"
            )
        document.name, document.name_line = str(config["name"]), name_line
    return document


def _stage_names(
    documents: list[Document], stage: str | None, existing: set[str], source: str, into: str | None
) -> tuple[list[str], list[str]]:
    """Each document's stage name, and a line for each that is not the document's `name:`."""
    unnamed = [d for d in documents if d.name is None]
    if len(unnamed) > 1:
        raise UserError(
            f"{source}:{unnamed[1].line}: a second document without `name:`; mergekit-multi "
            "takes one, the final merge: name the others"
        )
    final = unnamed[0] if unnamed else documents[-1]
    names: list[str] = []
    notes: list[str] = []
    for document in documents:
        line = document.name_line or document.line
        if document is final and stage is not None:
            name, why = stage, "--stage"
        elif document.name is None:
            name, why = "merge", ""
        elif STAGE_NAME.match(document.name):
            name, why = document.name, ""
        else:
            name = re.sub(r"[^A-Za-z0-9_-]+", "-", document.name).strip("-")[:128] or "merge"
            why = "a stage name is letters, digits, _ and -"
        if name in names:
            raise UserError(
                f"{source}:{line}: two documents would be stage '{name}': give them different "
                "names (the final merge's: --stage)"
            )
        if name in existing:
            if document is final:
                raise UserError(
                    f"{into}: stages.{name}: already a stage; name the new one with --stage"
                )
            raise UserError(
                f"{source}:{line}: name: stages.{name} is already a stage of {into}; rename the "
                "document, and the names that refer to it"
            )
        if document.name is not None and name != document.name:
            notes.append(f"{source}:{line}: name '{document.name}' is stage '{name}' ({why})")
        names.append(name)
    return names, notes


def _to_replace(text: str, stages: set[str]) -> bool:
    """Whether a model name is none of what a recipe takes (upstack.core.refs): a stage (or a
    sweep's pick), an existing local path, a Hub id."""
    if text in stages or text.removesuffix(BEST) in stages:
        return False
    try:
        if Path(text).expanduser().exists():
            return False
    except (OSError, RuntimeError, ValueError):  # `~nobody/x`, a name too long, a NUL byte
        pass
    return not HUB_ID.match(text) or bool(LOOKS_LOCAL.search(text))


def _scalar(node: yaml.Node | None, loc: tuple) -> tuple[yaml.ScalarNode | None, tuple]:
    """The YAML scalar that holds the model name at `loc` (a ModelName's key path), and its key
    path: `base+lora` is one scalar, `{path: x, revision: r}` holds it under `path`."""
    keys, path = list(loc), []
    while node is not None and (keys or isinstance(node, yaml.MappingNode)):
        key = keys.pop(0) if keys else "path"
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            node = node.value[key] if key < len(node.value) else None
        else:
            break  # the adapter after `+`: part of its model's scalar
        path.append(key)
    return (node if isinstance(node, yaml.ScalarNode) else None), tuple(path)


def _changes(
    document: Document, new_config: dict, source: str
) -> dict[int, list[tuple[int, int, str]]]:
    """Where the document's text must change to read as `new_config` (model names changed): per
    card line, (first column, end column, the new scalar)."""
    found: dict[tuple[int, int], tuple[int, str]] = {}  # by where the scalar starts: one each
    for model in merging.model_names(document.config):
        node, path = _scalar(document.root, model.loc)
        old, new = _value(document.config, path), _value(new_config, path)
        if node is None or old == new:
            continue
        if node.end_mark.line != node.start_mark.line:
            raise UserError(
                f"{source}:{node.start_mark.line + 1}: a model name over several lines: write "
                "it on one"
            )
        plain = isinstance(new, str) and re.fullmatch(r"[A-Za-z0-9_][\w./@+-]*", new)
        text = new if plain else json.dumps(new)  # a JSON string is a YAML double-quoted one
        found[(node.start_mark.line + 1, node.start_mark.column)] = (node.end_mark.column, text)
    changes: dict[int, list[tuple[int, int, str]]] = {}
    for (line, start), (end, text) in found.items():
        changes.setdefault(line, []).append((start, end, text))
    return changes


def _value(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def _block(
    document: Document,
    stage: str,
    stage_indent: str,
    key_indent: str,
    changes: dict[int, list[tuple[int, int, str]]],
) -> tuple[list[str], list[int | None]]:
    """The stage's lines, and for each the card line it came from (None: a line added here)."""
    block = [f"{stage_indent}{stage}:\n"]
    origins: list[int | None] = [None]
    if stage != "merge":  # a stage's kind defaults to its name
        block.append(f"{key_indent}kind: merge\n")
        origins.append(None)
    for number, line in document.lines:
        if number == document.name_line:
            line = f"# {line}"  # the stage's name now, kept in sight as the card wrote it
        for start, end, text in sorted(changes.get(number, []), reverse=True):
            line = line[:start] + text + line[end:]
        block.append(f"{key_indent}{line}\n" if line.strip() else "\n")
        origins.append(number)
    while block[-1] == "\n":  # blank lines at the end would only push the next stage away
        block.pop()
        origins.pop()
    return block, origins


# --------------------------------------------------------------------------- the recipe


def _stage_names_of(recipe_text: str, source: str) -> set[str]:
    recipe = construct(recipe_text, source) if parse_yaml(recipe_text, source) else None
    stages = recipe.get("stages") if isinstance(recipe, dict) else None
    return {str(name) for name in stages} if isinstance(stages, dict) else set()


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


def _check(
    text: str, source: str, config: str, at: int, origins: list, placeholders: dict[str, str]
) -> None:
    """Load the recipe with the stages in it, from memory (nothing is written beside the user's
    files to check it); a mistake names the line of the file it is in, and a name to replace
    as the card wrote it."""
    try:
        load_recipe(source, text=text)
    except UserError as err:
        message = str(err)
        for name, placeholder in placeholders.items():
            message = message.replace(placeholder, name)
        raise UserError(_placed(message, source, config, at, origins)) from None


def _placed(message: str, source: str, config: str, at: int, origins: list) -> str:
    """An error about the combined text, pointed at the config's line or the recipe's."""
    match = re.match(rf"^{re.escape(source)}:(\d+): ", message)
    if match is None:
        return message
    line = int(match.group(1))
    rest = message[match.end() :]
    if at < line <= at + len(origins):
        origin = origins[line - at - 1]
        return f"{config}:{origin}: {rest}" if origin else f"{config}: {rest}"
    return f"{source}:{line - len(origins) if line > at else line}: {rest}"
