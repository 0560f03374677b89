"""Seed problems for rephrasing and for held-out evaluation: MATH/GSM8K/MetaMathQA-shaped sets, CHAMP, a jsonl file, arith."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from data_synth.config import Strict, names
from data_synth.errors import DataSynthError
from data_synth.files import load_local, read_jsonl

if TYPE_CHECKING:
    from data_synth.arith import ArithProblem


@dataclass
class Problem:
    """One seed: a question, its original worked solution and its gold final answer."""

    id: str
    question: str
    solution: str
    answer: str  # gold final answer as written by the source, e.g. "239" or "\frac{3}{4}"
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- final answers


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None  # unbalanced: the answer was cut off


def gsm8k_answer(text: str) -> str | None:
    """GSM8K's final line is `#### 1,234`; commas are thousands separators."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "") or None


def metamath_answer(text: str) -> str | None:
    """MetaMathQA responses end with `The answer is: X`."""
    marker = "The answer is:"
    if marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip().rstrip(".").strip() or None


AnswerFrom = Literal["column", "boxed", "gsm8k", "metamath"]
EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": last_boxed,
    "gsm8k": gsm8k_answer,
    "metamath": metamath_answer,
}


# --------------------------------------------------------------------------- sources


class Columns(Strict):
    """Which field holds what. `answer` is read only when `answer_from: column`."""

    question: str = "question"
    solution: str = "solution"
    answer: str | None = "answer"
    id: str | None = Field(None, description="a field with a stable id; default: the row index")


# Built-in column mappings for the sets SOLAR/MetaMath seed from (see DESIGN.md for their shapes).
PRESETS: dict[str, tuple[Columns, AnswerFrom]] = {
    "math": (Columns(question="problem", solution="solution", answer=None), "boxed"),
    "gsm8k": (Columns(question="question", solution="answer", answer=None), "gsm8k"),
    # `query` is already a MetaMath augmentation; `original_question` is kept in metadata.
    "metamathqa": (Columns(question="query", solution="response", answer=None), "metamath"),
}


class HfSeeds(Strict):
    """A Hugging Face dataset by id, or a local dataset dir / json(l) / parquet / csv file."""

    source: Literal["hf"] = "hf"
    path: str = Field(
        description="Hub id (org/name), a local file or dir, or a stage of this recipe",
        json_schema_extra=names("data"),
    )
    name: str | None = Field(None, description="dataset config name, e.g. 'main' for openai/gsm8k")
    split: str = "train"
    preset: Literal["math", "gsm8k", "metamathqa"] | None = Field(
        None,
        description="built-in column mapping and answer extractor; overrides columns/answer_from",
    )
    columns: Columns = Field(default_factory=Columns)
    answer_from: AnswerFrom = "column"
    limit: int | None = Field(None, ge=1, description="keep the first N (after shuffling, if on)")
    shuffle: bool = False


class ChampSeeds(Strict):
    """CHAMP (270 competition problems, MIT) as shipped by the `champ-dataset` package: works offline."""

    source: Literal["champ"] = "champ"
    categories: list[str] | None = Field(
        None, description="e.g. [Combinatorics, Number-Theory]; default all"
    )
    limit: int | None = Field(None, ge=1)
    shuffle: bool = False


class JsonlSeeds(Strict):
    """The user's own file: one JSON object per line, fields mapped by `columns`."""

    source: Literal["jsonl"] = "jsonl"
    path: str = Field(description="a local .jsonl file", json_schema_extra=names("data", "local"))
    columns: Columns = Field(default_factory=Columns)
    answer_from: AnswerFrom = "column"
    limit: int | None = Field(None, ge=1)
    shuffle: bool = False


class ArithSeeds(Strict):
    """Generated arithmetic word problems (data_synth.arith): train, synth and eval splits never
    share a problem (synth: the seeds to rephrase, apart from the problems SFT trains on)."""

    GENERATED: ClassVar[bool] = True  # data_synth.generated

    source: Literal["arith"] = "arith"
    split: Literal["train", "synth", "eval"] = "train"
    count: int = Field(300, ge=1)
    seed: int | None = Field(None, ge=0, description="default: the caller's seed")


class ListopsSeeds(Strict):
    """Generated list and string instructions (data_synth.listops), split like arith's."""

    GENERATED: ClassVar[bool] = True  # data_synth.generated

    source: Literal["listops"] = "listops"
    split: Literal["train", "synth", "eval"] = "train"
    count: int = Field(300, ge=1)
    seed: int | None = Field(None, ge=0, description="default: the caller's seed")


SeedSource = Annotated[
    HfSeeds | ChampSeeds | JsonlSeeds | ArithSeeds | ListopsSeeds, Field(discriminator="source")
]


def describe(source: SeedSource) -> str:
    """A short name for tables and logs."""
    if isinstance(source, HfSeeds | JsonlSeeds):
        return f"{source.source}:{source.path}"
    if isinstance(source, ArithSeeds | ListopsSeeds):
        return f"{source.source}:{source.split}"
    return source.source


# --------------------------------------------------------------------------- loading


def load_problems(
    source: SeedSource, seed: int, resolve: Callable[[str], str] | None = None
) -> list[Problem]:
    """The problems of one seed source, in a fixed order for a fixed seed.

    `resolve` maps a `path` to what to load (upstack turns a stage name into its output dir).
    Bad data raises DataSynthError, its `setting` relative to the source (`path`, `categories`).
    """
    resolve = resolve or (lambda ref: ref)
    if isinstance(source, ArithSeeds):
        return _arith(source, seed)
    if isinstance(source, ListopsSeeds):
        return _listops(source, seed)
    if isinstance(source, ChampSeeds):
        problems = _champ(source)
    elif isinstance(source, JsonlSeeds):
        problems = _jsonl(source, Path(resolve(source.path)))
    else:
        problems = _hf(source, resolve(source.path))
    if source.shuffle:
        random.Random(seed).shuffle(problems)
    return problems[: source.limit] if source.limit else problems


def arith_problem(problem: Problem) -> ArithProblem:
    """The generated arith problem an `arith` seed was made from (its metadata holds it)."""
    from data_synth.arith import ArithProblem

    meta = problem.metadata
    return ArithProblem(
        id=problem.id,
        kind=meta["kind"],
        numbers=tuple(meta["numbers"]),
        name=meta["name"],
        item=meta["item"],
        answer=int(problem.answer),
    )


def _arith(source: ArithSeeds, seed: int) -> list[Problem]:
    from data_synth import arith

    out = []
    for p in arith.problems(
        source.count, seed if source.seed is None else source.seed, source.split
    ):
        # kind/numbers/name/item rebuild the ArithProblem (arith_problem): for new_numbers and the
        # scripted teacher
        meta = {
            "kind": p.kind,
            "numbers": list(p.numbers),
            "name": p.name,
            "item": p.item,
            "split": p.split,
        }
        out.append(
            Problem(
                id=p.id,
                question=p.question,
                solution=p.solution,
                answer=str(p.answer),
                source="arith",
                metadata=meta,
            )
        )
    return out


def _listops(source: ListopsSeeds, seed: int) -> list[Problem]:
    from data_synth import listops

    chosen = listops.problems(
        source.count, seed if source.seed is None else source.seed, source.split
    )
    return [
        Problem(
            id=p.id,
            question=p.question,
            solution=p.solution,
            answer=p.answer,
            source="listops",
            # kind/args rebuild the ListProblem: the scripted teacher answers from them
            metadata={"kind": p.kind, "args": list(p.args), "split": p.split},
        )
        for p in chosen
    ]


def champ_file() -> Path:
    import champ_dataset

    return Path(champ_dataset.__file__).parent / "dataset_files" / "v0.json"


def _champ(source: ChampSeeds) -> list[Problem]:
    raw = json.loads(champ_file().read_text())["problems"]
    out = []
    for pid, item in raw.items():
        if source.categories and item["category"] not in source.categories:
            continue
        steps = " ".join(step["_text"] for step in item["solution"]["steps"])
        out.append(
            Problem(
                id=f"champ-{pid}",
                question=item["_text"],
                solution=steps,
                answer=item["_answer"],
                source="champ",
                metadata={"category": item["category"]},
            )
        )
    if source.categories and not out:
        known = sorted({item["category"] for item in raw.values()})
        raise DataSynthError(
            f"champ has no problems in categories {source.categories} (known: {known})",
            "categories",
        )
    return out


def _columns(source: HfSeeds | JsonlSeeds) -> tuple[Columns, AnswerFrom]:
    preset = getattr(source, "preset", None)
    return PRESETS[preset] if preset else (source.columns, source.answer_from)


def _row_problem(
    row: dict, index: int, columns: Columns, answer_from: AnswerFrom, source_name: str
) -> Problem | str:
    """A Problem, or the name of what is missing (the caller says where)."""
    for key in ("question", "solution"):
        name = getattr(columns, key)
        if not isinstance(row.get(name), str) or not row[name].strip():
            return f"field '{name}' (columns.{key}) is missing or not a non-empty string"
    if answer_from == "column":
        if columns.answer is None or row.get(columns.answer) in (None, ""):
            return f"field '{columns.answer}' (columns.answer) is missing"
        answer = str(row[columns.answer]).strip()
    else:
        answer = EXTRACTORS[answer_from](row[columns.solution])
        if answer is None:
            return f"no final answer ({answer_from}) in field '{columns.solution}'"
    ident = row.get(columns.id) if columns.id else None
    meta = {
        k: row[k]
        for k in ("original_question", "type", "level", "category")
        if isinstance(row.get(k), str)
    }
    return Problem(
        id=str(ident) if ident is not None else f"{source_name}:{index}",
        question=row[columns.question].strip(),
        solution=row[columns.solution].strip(),
        answer=answer,
        source=source_name,
        metadata=meta,
    )


def _jsonl(source: JsonlSeeds, path: Path) -> list[Problem]:
    if not path.is_file():
        raise DataSynthError(f"{path}: seed file not found", "path")
    columns, answer_from = _columns(source)
    out = []
    try:
        for lineno, row in read_jsonl(path):
            problem = _row_problem(row, lineno, columns, answer_from, f"jsonl:{path.name}")
            if isinstance(problem, str):
                raise DataSynthError(f"{path}:{lineno}: {problem}", "path")
            out.append(problem)
    except DataSynthError as err:
        raise DataSynthError(str(err), "path") from None
    if not out:
        raise DataSynthError(f"{path}: seed file has no problems", "path")
    return out


def _hf(source: HfSeeds, path: str) -> list[Problem]:
    dataset = _load_dataset(source, path)
    columns, answer_from = _columns(source)
    wanted = [c for c in (columns.question, columns.solution) if c not in dataset.column_names]
    if answer_from == "column" and columns.answer not in dataset.column_names:
        wanted.append(str(columns.answer))
    if wanted:
        raise DataSynthError(
            f"{path}: no column(s) {wanted} (has {dataset.column_names}); "
            "set `preset` or `columns`",
            "columns",
        )
    out, skipped = [], 0
    for index, row in enumerate(dataset):
        problem = _row_problem(row, index, columns, answer_from, f"hf:{source.path}")
        if isinstance(problem, str):
            skipped += 1  # a public set has the odd malformed row: skip it, but say how many
            continue
        out.append(problem)
        if source.limit and not source.shuffle and len(out) >= source.limit:
            break
    if skipped:
        print(
            f"seeds: hf {path}: skipped {skipped} rows without a usable question/solution/answer",
            file=sys.stderr,
        )
    return out


def _load_dataset(source: HfSeeds, path: str):
    import datasets

    try:
        if Path(path).exists():
            return load_local(Path(path), source.split)
        return datasets.load_dataset(path, source.name, split=source.split)
    except DataSynthError as err:
        raise DataSynthError(str(err), "path") from None
    except Exception as err:  # datasets raises many types for "not there": name the source
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataSynthError(
            f"{path} (split {source.split}): cannot load: {type(err).__name__}: {first}", "path"
        ) from None
