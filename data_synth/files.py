"""Data files: JSON Lines read and written one way everywhere, and local data sets loaded by file type."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_synth.errors import DataSynthError

# A local file's suffix -> the `datasets` builder that reads it.
FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in the dir they write.
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line is an error naming file and line."""
    with Path(path).open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSynthError(f"{path}:{lineno}: not valid JSON: {err.msg}") from None
            if not isinstance(row, dict):
                raise DataSynthError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            yield lineno, row


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """One JSON object a line, UTF-8 as is (not \\u-escaped); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def data_files(path: Path, split: str) -> list[Path]:
    """The files `load_local(path, split)` reads, in the order it reads them."""
    import datasets

    path = Path(path)
    if path.is_file():
        return [path]
    files = datasets.load_dataset_builder(str(path)).config.data_files
    if split not in files:
        raise DataSynthError(f"{path}: no split '{split}' (has: {', '.join(files)})")
    return [Path(str(f)) for f in files[split]]


def is_saved_dataset(path: Path) -> bool:
    """A dir written by `save_to_disk` (as opposed to a dir of data files)."""
    return path.is_dir() and any((path / name).exists() for name in SAVED_DATASET_FILES)


def load_local(path: Path, split: str, streaming: bool = False):
    """A local data file, a `save_to_disk` dir or a dir of data files, as the `datasets.Dataset`
    of `split` (an IterableDataset over the same rows in the same order when `streaming`). A
    single file is one split: whichever the caller asks for."""
    import datasets

    path = Path(path)
    if path.is_dir():
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataSynthError(f"{path}: no split '{split}' (has: {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        return datasets.load_dataset(str(path), split=split, streaming=streaming)
    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataSynthError(
            f"{path}: expected a dataset dir or a file ending in {', '.join(FILE_BUILDERS)}"
        )
    if not path.is_file():
        raise DataSynthError(f"{path}: no such file")
    try:
        return datasets.load_dataset(
            builder, data_files={split: str(path)}, split=split, streaming=streaming
        )
    except Exception as err:  # datasets/pyarrow bury the row in a chained traceback: find it
        if path.suffix == ".jsonl":
            for _ in read_jsonl(path):
                pass  # raises naming the first bad line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataSynthError(f"{path}: cannot read as {builder}: {reason}") from None


def peek_columns(path: Path) -> list[str] | None:
    """The columns of a local data file or saved data set, read from its first row or header
    without loading it; None where that cannot be told cheaply (a .json file, a dir of files)."""
    path = Path(path)
    if path.is_dir():
        if not is_saved_dataset(path):
            return None
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = next(iter(loaded.values()))
        return list(loaded.column_names)
    if path.suffix == ".jsonl":
        for _, row in read_jsonl(path):
            return list(row)
        raise DataSynthError(f"{path}: no rows")
    if path.suffix == ".txt":
        return ["text"]
    if path.suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle), [])
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return list(pyarrow.parquet.read_schema(path).names)
    return None
