"""Training data for cpt, sft and dpo: typed dataset sources, filters and seeded mixtures."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from data_synth.errors import DataSynthError
from data_synth.files import FILE_BUILDERS, load_local, peek_columns
from upstack.core.settings import Strict, names
from upstack.train import formats

# The columns each training format gives the trainer. Sources may be in any of the formats
# upstack.train.formats reads (ShareGPT, Alpaca, prompt/completion, TRL's preference formats),
# converted to these so one chat template renders all.
FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "sft": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
}
ROW = "__row__"  # a source row's position, kept until its conversion so an error can name it


class Exclude(Strict):
    """Drop rows whose `column` starts with one of `prefixes` or matches `pattern` (a regex).

    SOLAR removed benchmark-derived tasks from OpenOrca this way (by the task prefix of `id`).
    """

    column: str
    prefixes: list[str] = Field(default_factory=list)
    pattern: str | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> Exclude:
        if not self.prefixes and self.pattern is None:
            raise ValueError("give `prefixes` or `pattern`")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern is not a valid regex: {err}") from None
        return self

    def keeps(self, value: Any) -> bool:
        text = "" if value is None else str(value)
        if text.startswith(tuple(self.prefixes)):
            return False
        return not (self.pattern and re.search(self.pattern, text))


class Arith(Strict):
    GENERATED: ClassVar[bool] = True  # data_synth.generated

    problems: int = Field(
        ge=1, description="seeded arithmetic word problems (data_synth.arith, train split)"
    )


class Generated(Strict):
    """Data generated here, for the tiny world: list/string instructions with exact answers
    (data_synth.listops: text, conversations, or preference pairs whose rejected answer is the
    kind's expected mistake), or near-random text (a domain nothing can be learned from)."""

    GENERATED: ClassVar[bool] = True  # data_synth.generated

    task: Literal["listops", "noise"]
    problems: int = Field(ge=1, description="rows of the train split (eval: a tenth as many)")


ORIGINS = ("hub", "path", "stage", "arith", "generated")


class Source(Strict):
    """One entry of a stage's `datasets:` list. Exactly one of hub, path, stage, arith, generated."""

    hub: str | None = Field(
        None, description="Hub dataset id, org/name", json_schema_extra=names("data", "hub")
    )
    config: str | None = Field(
        None, description="a configuration of a Hub data set (or of a local clone of one)"
    )
    data_dir: str | None = Field(
        None, description="a subdirectory of a Hub data set (or of a local clone of one)"
    )
    path: str | None = Field(
        None,
        description="local jsonl/json/parquet/txt/csv file or dataset dir",
        json_schema_extra=names("data", "path"),
    )
    stage: str | None = Field(
        None,
        description="a pairs stage's output; `split` names its subdir (instruct, alignment)",
        json_schema_extra=names("data", "stage", kinds=("pairs",)),
    )
    arith: Arith | None = None
    generated: Generated | None = None
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]+$",
        description="a short name for per-source logs (default: from the origin)",
    )
    split: str = Field("train", description="split to train on (for a stage source: its subdir)")
    eval_split: str | None = Field(
        None, description="the source's own held-out split, for eval loss"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="source column -> format column; several sources for one column are joined "
        "by a blank line (Alpaca: {instruction: prompt, input: prompt, output: completion})",
    )
    weight: float = Field(1.0, gt=0, le=1, description="fraction of this source to use")
    max_samples: int | None = Field(None, ge=1, description="at most this many rows of this source")
    max_tokens: int | None = Field(
        None, ge=1, description="cpt: rows until this many tokens (stage tokenizer), in order"
    )
    streaming: bool = Field(
        False,
        description="hub/path sources: read as a stream, keeping only the rows selected (memory "
        "bounded, not proportional to the corpus); the same rows as without streaming",
    )
    exclude: list[Exclude] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_origin(self) -> Source:
        origins = [k for k in ORIGINS if getattr(self, k) is not None]
        if len(origins) != 1:
            raise ValueError(f"give exactly one of {', '.join(ORIGINS)} (got {origins or 'none'})")
        if self.weight != 1.0 and self.max_samples is not None:
            raise ValueError("give weight or max_samples, not both")
        if self.streaming and self.hub is None and self.path is None:
            raise ValueError("streaming reads hub or path sources (the others are small)")
        return self


def check_sources(sources: list[Source], ctx, fmt: str, key: str = "datasets") -> None:
    """Before a run writes anything: local files exist and have the columns `fmt` needs (read
    from their first row), finished stages wrote the split named. A typo in the last stage's
    data then fails at once, not after an hour of the stages before."""
    for i, source in enumerate(sources):
        if source.path is not None:
            path = Path(source.path).expanduser()
            if not path.exists():
                raise ctx.fail(f"{key}.{i}.path", f"{path}: no such file or dataset dir")
            if path.is_file() and path.suffix not in FILE_BUILDERS:
                raise ctx.fail(
                    f"{key}.{i}.path", f"{path}: expected one of {', '.join(FILE_BUILDERS)}"
                )
            for setting in ("config", "data_dir"):
                if path.is_file() and getattr(source, setting) is not None:
                    raise ctx.fail(
                        f"{key}.{i}.{setting}",
                        f"{path} is one file: {setting} picks part of a data set repository "
                        "(a Hub id, or a directory holding a clone of one)",
                    )
            try:
                present = peek_columns(path)
            except DataSynthError as err:
                raise ctx.fail(f"{key}.{i}.path", str(err)) from None
            problem = column_problem(source, present, fmt) if present is not None else None
            if problem:
                raise ctx.fail(f"{key}.{i}{problem[0]}", f"{path}: {problem[1]}")
        if source.stage is not None and source.stage not in ctx.pending:
            split_dir = ctx.stage_dir(source.stage) / source.split
            if not (split_dir / "train.jsonl").is_file():
                raise ctx.fail(
                    f"{key}.{i}.split", f"stage '{source.stage}' has no {split_dir}/train.jsonl"
                )


def build_mixture(
    sources: list[Source],
    fmt: Literal["text", "sft", "preference"],
    ctx,
    eval_fraction: float = 0.0,
    key: str = "datasets",
    tokenizer=None,
):
    """(train, eval or None): every source loaded, sampled, filtered, renamed and checked, then
    concatenated and shuffled with the recipe seed. Eval rows come from the sources' own eval
    splits, else `eval_fraction` of the mixture is held out. `tokenizer` counts `max_tokens`."""
    from datasets import concatenate_datasets

    train_parts, eval_parts = [], []
    for i, source in enumerate(sources):
        rows, held = source_rows(source, fmt, ctx, f"{key}.{i}", ctx.seed + i, tokenizer)
        train_parts.append(rows)
        if held is not None:
            eval_parts.append(held)

    train = concatenate_datasets(train_parts).shuffle(seed=ctx.seed)
    if eval_parts:
        return train, concatenate_datasets(eval_parts)
    if eval_fraction > 0 and len(train) > 1:
        split = train.train_test_split(test_size=eval_fraction, seed=ctx.seed)
        return split["train"], split["test"]
    return train, None


def source_rows(source: Source, fmt: str, ctx, where: str, seed: int | None = None, tokenizer=None):
    """(train rows, held-out rows or None) of one source, in the format's columns. With a `seed`
    the train rows are the source's selection (weight, max_samples, max_tokens, streaming: see
    below); without one, all its rows, filtered. The held-out rows are its `eval_split`'s, if
    it names one. `where` is the source's key path, for errors."""
    if seed is None:
        rows = _filtered(source, _load(source, source.split, fmt, ctx, where), fmt, ctx, where)
    else:
        rows = _selected(source, fmt, ctx, where, seed, tokenizer)
    train = teachable(_prepare(source, rows, fmt, ctx, where), fmt, ctx, where)
    if not source.eval_split:
        return train, None
    held = _filtered(source, _load(source, source.eval_split, fmt, ctx, where), fmt, ctx, where)
    return train, teachable(_prepare(source, held, fmt, ctx, where), fmt, ctx, where)


# What makes a row teach nothing, by format: a loss over no token, or a preference between two
# equal answers (DPO's loss stays at ln 2 and its gradient is zero).
UNTEACHABLE = {
    "text": "empty text",
    "sft": "no assistant turn with text",
    "preference": "chosen equal to rejected",
}


def teachable(rows, fmt: str, ctx, where: str):
    """The rows that can teach something; the others dropped and counted. A source none of whose
    rows can is refused: training on it would run for hours and change nothing."""

    def keeps(row: dict) -> bool:
        if fmt == "text":
            return bool(str(row["text"]).strip())
        if fmt == "sft":
            return any(
                m["role"] == "assistant" and str(m["content"]).strip() for m in row["messages"]
            )
        return _said(row["chosen"]) != _said(row["rejected"])

    kept = rows.filter(keeps)
    dropped = len(rows) - len(kept)
    if dropped and not len(kept):
        raise ctx.fail(where, f"none of its {len(rows)} rows teaches anything: {UNTEACHABLE[fmt]}")
    if dropped:
        ctx.log(f"{where}: dropped {dropped} of {len(rows)} rows ({UNTEACHABLE[fmt]})")
    return kept


def _said(messages: list[dict]) -> list[str]:
    return [" ".join(str(m["content"]).split()) for m in messages]


# --------------------------------------------------------------------------- row selection
#
# Which rows of a source train is a function of the seed and each row's position in the source
# (its files in order, its rows in order) alone: the `keep` positions with the smallest seeded
# hash, an exact uniform random subset. A stream knows the positions as it reads them, so it
# keeps the same rows as an in-memory load, holding only the rows it keeps; `max_tokens` then
# takes the kept rows in order until the budget is spent. Selection comes before the `exclude`
# filters, which may drop some of the selected rows.


def selected_positions(total: int, keep: int, seed: int):
    """Sorted positions of the `keep` rows of `total` a source trains on, for this seed."""
    import numpy as np

    if keep >= total:
        return np.arange(total)
    # splitmix64 over (seed, position): a uniform number per row, the same in any process
    with np.errstate(over="ignore"):
        z = np.arange(total, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.sort(np.argpartition(z, keep - 1)[:keep])


def _keep(source: Source, total: int) -> int:
    if source.max_samples is not None:
        return min(source.max_samples, total)
    return min(total, max(1, round(source.weight * total)))


def _selected(source: Source, fmt: str, ctx, where: str, seed: int, tokenizer):
    """The source's training rows, filtered, then selected by position (see above), loaded or
    streamed."""
    if source.streaming:
        return _stream(source, fmt, ctx, where, seed, tokenizer)
    rows = _filtered(source, _load(source, source.split, fmt, ctx, where), fmt, ctx, where)
    rows = rows.select(selected_positions(len(rows), _keep(source, len(rows)), seed))
    if source.max_tokens is not None:
        texts = rows[_text_column(source)]
        rows = rows.select(range(_rows_within(texts, source.max_tokens, tokenizer)))
    return rows


def _text_column(source: Source) -> str:
    """The source column that becomes `text` (after `columns` renames)."""
    return next((c for c, target in source.columns.items() if target == "text"), "text")


def _rows_within(texts, budget: int, tokenizer) -> int:
    """How many of `texts`, in order, fit in `budget` tokens (the row that crosses it counts)."""
    spent, count = 0, 0
    for text in texts:
        if spent >= budget:
            break
        spent += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        count += 1
    return count


def _stream(source: Source, fmt: str, ctx, where: str, seed: int, tokenizer):
    """Read a hub or path source as a stream, keep the selected positions, write them to the
    work dir and load that back (memory-mapped): memory bounded by nothing but the kept rows."""
    import datasets
    import numpy as np

    from data_synth.files import write_jsonl

    # with exclude filters the filtered stream's length is unknown: it keeps the first rows
    total = None if source.exclude else stream_length(source, ctx, where)
    chosen = None
    if total is not None and source.max_tokens is None:
        chosen = selected_positions(total, _keep(source, total), seed)
    elif source.max_samples is None and source.max_tokens is None and source.weight != 1.0:
        raise ctx.fail(
            f"{where}.weight",
            "a stream of unknown length cannot be thinned by weight: "
            "give max_samples or max_tokens",
        )
    limit = source.max_samples or (len(chosen) if chosen is not None else None)
    stream = _open_stream(source, source.split, ctx, where)
    wanted = np.zeros(total, dtype=bool) if chosen is not None else None
    if wanted is not None:
        wanted[chosen] = True

    def passing():
        for row in stream:
            if all(rule.keeps(row.get(rule.column)) for rule in source.exclude):
                yield row

    def rows():
        kept, spent, text = 0, 0, _text_column(source)
        for position, row in enumerate(passing()):
            if wanted is not None and (position >= total or not wanted[position]):
                if position >= total or kept >= len(chosen):
                    return
                continue
            yield {**row, ROW: position}
            kept += 1
            if source.max_tokens is not None:
                spent += len(tokenizer(row[text], add_special_tokens=False)["input_ids"])
            if (limit and kept >= limit) or (source.max_tokens and spent >= source.max_tokens):
                return

    first = next(iter(stream), None)  # the columns, checked before anything is kept
    if first is None:
        raise ctx.fail(where, "the stream gave no rows")
    problem = column_problem(source, list(first), fmt)
    if problem:
        raise ctx.fail(f"{where}{problem[0]}", problem[1])
    # Named by what it holds: under accelerate the main process writes it first
    # (upstack.train.inputs.prepare) and the other ranks find it instead of reading the stream
    # again.
    identity = json.dumps([source.model_dump(mode="json"), seed, fmt], sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    out = ctx.work_dir / "streamed" / f"{where.replace('.', '_')}-{digest}.jsonl"
    if not out.is_file():
        partial = out.with_suffix(f".{os.getpid()}.tmp")
        if not write_jsonl(partial, rows()):
            raise ctx.fail(where, "no row of the stream passed the exclude filters")
        partial.replace(out)  # whole or absent: a killed run never leaves half a selection
    return datasets.load_dataset("json", data_files=str(out), split="train")


def stream_length(source: Source, ctx, where: str) -> int | None:
    """Rows in a source without reading it: parquet footers, line counts of text files, the
    Hub's dataset info; None when only reading all of it would tell."""
    from data_synth.files import data_files, is_saved_dataset

    if source.path is not None:
        path = Path(source.path).expanduser()
        if is_saved_dataset(path):
            return None  # read in memory-mapped pieces anyway: streaming adds nothing
        total = 0
        for file in data_files(path, source.split):
            if file.suffix == ".parquet":
                import pyarrow.parquet

                total += pyarrow.parquet.ParquetFile(file).metadata.num_rows
            elif file.suffix in (".jsonl", ".txt"):
                with file.open("rb") as handle:  # counted in blocks: memory stays flat
                    total += sum(1 for line in handle if line.strip())
            else:
                return None
        return total
    try:
        import datasets

        info = datasets.load_dataset_builder(source.hub, source.config).info
        return info.splits[source.split].num_examples if info.splits else None
    except Exception:  # no metadata reachable: the stream's order decides
        return None


def _open_stream(source: Source, split: str, ctx, where: str):
    """The same rows, in the same order, as `_load` gives, as a stream."""
    import datasets

    try:
        if source.hub is not None:
            return datasets.load_dataset(
                source.hub, source.config, data_dir=source.data_dir, split=split, streaming=True
            )
        return load_local(Path(source.path).expanduser(), split, streaming=True)
    except DataSynthError as err:
        raise ctx.fail(f"{where}.path", str(err)) from None
    except (FileNotFoundError, ValueError) as err:
        from upstack.models.checkpoints import hub_hint

        raise ctx.fail(
            f"{where}.hub", f"cannot stream '{source.hub}': {str(err).splitlines()[0]}{hub_hint()}"
        ) from None


def source_name(source: Source, index: int) -> str:
    """A short name for a source, for per-source logs and metric keys (eval_<name>_loss)."""
    import re

    if source.name:
        return source.name
    if source.arith is not None:
        name = "arith"
    elif source.generated is not None:
        name = source.generated.task
    elif source.stage is not None:
        name = f"{source.stage}_{source.split}"
    else:
        name = Path(source.hub or source.path or "").stem or f"source{index}"
    return re.sub(r"\W+", "_", name).strip("_") or f"source{index}"


def build_weighted_mixture(sources: list[Source], mixture, tokenizer, ctx, eval_fraction: float):
    """(train, held-out sets by source name, report) for text sources sharing the training rows
    by `mixture` (cpt's BiMix mixtures): shares from entropy proxies of each source's tokens, or
    as given; each source's own held-out rows kept apart, so every domain's loss can be watched."""
    from datasets import concatenate_datasets

    from upstack.train.mixture import entropies, mixture_rows, shares_from_entropy

    names, parts, held_out = [], [], {}
    for i, source in enumerate(sources):
        name = source_name(source, i)
        if name in names:
            name = f"{name}_{i}"
        # every row of the source: the mixture's shares decide how many train
        rows, held = source_rows(source, "text", ctx, f"datasets.{i}")
        if held is not None:
            held_out[name] = held
        elif eval_fraction > 0 and len(rows) > 1:
            split = rows.train_test_split(test_size=eval_fraction, seed=ctx.seed)
            rows, held_out[name] = split["train"], split["test"]
        names.append(name)
        parts.append(rows.shuffle(seed=ctx.seed + i))

    measured = {}
    if mixture.weights == "entropy":
        for name, rows in zip(names, parts, strict=True):
            sample = list(rows.select(range(min(mixture.sample_rows, len(rows))))["text"])
            measured[name] = entropies(tokenizer(sample, add_special_tokens=False)["input_ids"])
        shares = shares_from_entropy([measured[n][mixture.proxy] for n in names], mixture.normalize)
    else:
        shares = list(mixture.weights)
    counts = mixture_rows([len(rows) for rows in parts], shares, mixture.rows)
    taken = []
    for rows, count in zip(parts, counts, strict=True):
        copies, rest = divmod(count, len(rows))  # past its size a source repeats: say so below
        taken += [rows] * copies + ([rows.select(range(rest))] if rest else [])
    train = concatenate_datasets(taken).shuffle(seed=ctx.seed)
    report = {
        name: {
            "share": round(share, 4),
            "rows": count,
            "source_rows": len(rows),
            "repeats": round(count / len(rows), 3),
            **(
                {f"entropy_{k}": round(v, 4) for k, v in measured[name].items()} if measured else {}
            ),
        }
        for name, share, count, rows in zip(names, shares, counts, parts, strict=True)
    }
    return train, held_out or None, report


def _load(source: Source, split: str, fmt: str, ctx, where: str):
    import datasets

    if source.arith is not None:
        return datasets.Dataset.from_list(
            _generated_rows("arith", source.arith.problems, split, fmt, ctx, f"{where}.arith")
        )
    if source.generated is not None:
        task, count = source.generated.task, source.generated.problems
        return datasets.Dataset.from_list(
            _generated_rows(task, count, split, fmt, ctx, f"{where}.generated")
        )
    if source.hub is not None:
        try:
            # datasets no longer runs loading scripts: Hub data is files (parquet/json), no code
            return _numbered(
                datasets.load_dataset(
                    source.hub, source.config, data_dir=source.data_dir, split=split
                )
            )
        except (FileNotFoundError, ValueError) as err:
            raise ctx.fail(
                f"{where}.hub", f"cannot load '{source.hub}' split '{split}': {err}"
            ) from None
    if source.stage is not None:
        # a stage writes <stage>/<split>/train.jsonl and, held out, <stage>/<split>/<eval_split>.jsonl
        name = "train" if split == source.split else split
        path = ctx.stage_dir(source.stage) / source.split / f"{name}.jsonl"
        if not path.is_file():
            raise ctx.fail(where, f"stage '{source.stage}' wrote no {path}")
        return _numbered(datasets.load_dataset("json", data_files=str(path), split="train"))
    path = Path(source.path).expanduser()
    if path.is_file() and split != "train":
        # an eval_split on one file would evaluate on the training rows
        raise ctx.fail(
            f"{where}.split", f"a single file has only the split 'train' (got '{split}')"
        )
    if source.config is not None or source.data_dir is not None:
        # a local clone of a Hub data set repository: its configurations, read by datasets
        try:
            return _numbered(
                datasets.load_dataset(
                    str(path), source.config, data_dir=source.data_dir, split=split
                )
            )
        except (FileNotFoundError, ValueError) as err:
            reason = str(err).strip().splitlines()[0]
            raise ctx.fail(f"{where}.config", f"cannot load {path} ({reason})") from None
    try:
        return _numbered(load_local(path, split))
    except DataSynthError as err:
        raise ctx.fail(f"{where}.path", str(err)) from None


def _numbered(rows):
    """The rows with their positions in the source, for errors that name a row."""
    import numpy as np

    return rows.add_column(ROW, np.arange(len(rows)))


def _generated_rows(task: str, count: int, split: str, fmt: str, ctx, where: str) -> list[dict]:
    """Rows of a generated task: arith or listops problems, as text or conversations; noise text."""
    import random

    from data_synth import arith, listops

    if split not in ("train", "eval"):
        raise ctx.fail(
            f"{where.rsplit('.', 1)[0]}.split",
            f"{task} has the splits train and eval (got '{split}')",
        )
    if split == "eval":
        count = max(1, count // 10)
    if task == "noise":
        # eval rows come from another seed than train rows: none of them is trained on
        return [{"text": t} for t in listops.noise(count, ctx.seed + (split == "eval"))]
    module = arith if task == "arith" else listops
    if fmt == "text" and split == "train":
        return [{"text": t} for t in module.corpus(count, ctx.seed)]
    rows = []
    for problem in module.problems(count, ctx.seed, split):
        rng = random.Random(problem.id)  # a fixed but varied wording per problem
        question, solution = rng.choice(problem.questions()), rng.choice(problem.solutions())
        if fmt == "preference":
            # general preference pairs: the right answer chosen, the expected mistake rejected,
            # in the same wording
            wording = problem.solutions().index(solution)
            rejected = problem.solutions_with(problem.wrong_answer())[wording]
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": solution}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        elif fmt == "text":
            rows.append({"text": arith.plain_text(question, solution)})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": solution},
                    ]
                }
            )
    return rows


def column_problem(source: Source, present: list[str], fmt: str) -> tuple[str, str] | None:
    """(key path suffix, message) for the first column the source's settings or the format
    need and `present` lacks; None when every one is there."""
    has = f"(has: {', '.join(present)})"
    for j, rule in enumerate(source.exclude):
        if rule.column not in present:
            return f".exclude.{j}.column", f"no column '{rule.column}' {has}"
    for column in source.columns:
        if column not in present:
            return f".columns.{column}", f"no column '{column}' {has}"
    after = {c for c in present if c not in source.columns} | set(source.columns.values())
    if fmt == "text":
        needed, accepted = ("text",), ""
    elif fmt == "sft":
        if formats.sft_format(after):
            return None
        # the format its columns half name, else the first one
        needed = next(
            (n for n in (("prompt", "completion"), ("instruction", "output")) if n[0] in after),
            ("messages",),
        )
        accepted = f" (formats: {'; '.join(formats.SFT_FORMATS)})"
    else:
        if formats.preference_format(after):
            return None
        needed, accepted = (
            ("chosen", "rejected"),
            f" (formats: {'; '.join(formats.PREFERENCE_FORMATS)})",
        )
    missing = [c for c in needed if c not in after]
    if missing:
        return "", (
            f"missing column '{missing[0]}' for {fmt} data {has}{accepted}; "
            f"map one with `columns: {{<source column>: {missing[0]}}}`"
        )
    return None


def _filtered(source: Source, rows, fmt: str, ctx, where: str):
    """The rows with the columns the format needs, less those the exclude rules drop."""
    problem = column_problem(source, [c for c in rows.column_names if c != ROW], fmt)
    if problem:
        raise ctx.fail(f"{where}{problem[0]}", problem[1])
    for rule in source.exclude:
        rows = rows.filter(lambda value, rule=rule: rule.keeps(value), input_columns=rule.column)
    return rows


def _prepare(source: Source, rows, fmt: str, ctx, where: str):
    """Selected rows in the format's columns: renamed, then read by their format into
    conversations or conversational preference pairs (upstack.train.formats). A row no format
    takes is refused with its row number; nothing becomes the string of a structure."""
    rows = _rename(rows, source.columns)
    if fmt == "text":
        bad = next((i for i, text in enumerate(rows["text"]) if not isinstance(text, str)), None)
        if bad is not None:
            raise ctx.fail(where, f"{_origin(source)} row {_row_of(rows, bad)}: text is not text")
        return rows.select_columns(["text"])
    if fmt == "sft":
        kind = formats.sft_format(set(rows.column_names))

        def convert(row: dict) -> dict:
            return {"messages": formats.to_messages(row, kind)}
    else:

        def convert(row: dict) -> dict:
            return formats.to_preference(row)

    def checked(row: dict, index: int) -> dict:
        try:
            return convert(row)
        except formats.RowError as err:
            accepted = formats.SFT_FORMATS if fmt == "sft" else formats.PREFERENCE_FORMATS
            raise ctx.fail(
                where,
                f"{_origin(source)} row {row.get(ROW, index) + 1}: {err} "
                f"(formats: {'; '.join(accepted)})",
            ) from None

    return rows.map(checked, with_indices=True, remove_columns=rows.column_names)


def _origin(source: Source) -> str:
    """What a source is, for a message about one of its rows."""
    if source.path is not None:
        return str(source.path)
    if source.hub is not None:
        return source.hub
    return f"stage {source.stage}" if source.stage is not None else "generated data"


def _row_of(rows, index: int) -> int:
    return rows[index][ROW] + 1 if ROW in rows.column_names else index + 1


def _rename(rows, columns: dict[str, str]):
    targets: dict[str, list[str]] = {}
    for column, target in columns.items():
        targets.setdefault(target, []).append(column)
    joined = {t: cols for t, cols in targets.items() if len(cols) > 1 or cols[0] != t}
    if not joined:
        return rows

    def rename(row: dict) -> dict:
        out = {}
        for target, cols in joined.items():
            values = [row[c] for c in cols if row[c] not in (None, "")]
            out[target] = values[0] if len(values) == 1 else "\n\n".join(map(str, values))
        return out

    drop = [c for c in rows.column_names if c in columns or c in joined]
    return rows.map(rename, remove_columns=drop)
