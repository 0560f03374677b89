"""Libraries' log records and Python warnings: kept in a file, off the terminal.

The CLI's stderr carries upstack's own lines (a one-line error, a stage's progress); what the
libraries log (bitsandbytes on import, peft, mergekit, datasets, `warnings.warn`) goes to the log
of the stage that is running, `<output_dir>/.work/<stage>/library.log`, and before any stage
runs (loading a recipe) it waits in memory for one, bounded. The runner says how many records a
stage's log got.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

LIBRARY_LOG = "library.log"
KEPT_BEFORE_A_STAGE = 200  # records held in memory until a stage's log opens
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LibraryLog(logging.Handler):
    """A root handler: every record of a logger that is not upstack's, at WARNING and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(FORMAT))
        self.file: Path | None = None
        self.waiting: deque[str] = deque(maxlen=KEPT_BEFORE_A_STAGE)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "upstack" or record.name.startswith("upstack."):
            return
        try:
            line = self.format(record)
        except Exception:  # a library's bad format string must not break the run
            line = f"{record.levelname} {record.name}: {record.msg!r}"
        self.count += 1
        if self.file is None:
            self.waiting.append(line)
            return
        try:
            with self.file.open("a") as handle:
                handle.write(line + "\n")
        except OSError:
            pass  # a full disk is reported by whatever filled it

    def open(self, file: Path) -> None:
        """From now on records go to `file`; those that waited are written first."""
        self.file, self.count = file, 0
        file.parent.mkdir(parents=True, exist_ok=True)
        waiting = list(self.waiting)
        self.waiting.clear()
        if waiting:
            with file.open("a") as handle:
                handle.write("".join(line + "\n" for line in waiting))
            self.count = len(waiting)

    def close_file(self) -> int:
        """Back to waiting in memory; how many records the file got."""
        count, self.file, self.count = self.count, None, 0
        return count


_handler: LibraryLog | None = None


def capture() -> LibraryLog:
    """Route libraries' logs and Python warnings here instead of the terminal (the CLI calls it
    first thing). Idempotent."""
    global _handler
    if _handler is None:
        _handler = LibraryLog()
        root = logging.getLogger()
        root.addHandler(_handler)
        if root.level > logging.WARNING or root.level == logging.NOTSET:
            root.setLevel(logging.WARNING)
        logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> here
    return _handler


def to_stage_log(work_dir: Path) -> None:
    """A stage starts: libraries' records go to its log (when capture() is on)."""
    if _handler is None:
        return
    _handler.open(Path(work_dir) / LIBRARY_LOG)
    # transformers and datasets print through stream handlers of their own: send their records
    # the way of every other library's (~0.5 s of imports, once a run)
    try:
        import datasets.utils.logging  # noqa: F401 (adds its handler on import)
        import transformers.utils.logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_default_handler()
    for name in ("transformers", "datasets"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def stage_log_done() -> tuple[Path | None, int]:
    """A stage ended: its log file and how many records it got (None when not capturing)."""
    if _handler is None or _handler.file is None:
        return None, 0
    file = _handler.file
    return file, _handler.close_file()
