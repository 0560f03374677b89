"""The eval stage's results file: written by eval, read by `upstack report` and by model cards."""

from __future__ import annotations

import json
from pathlib import Path

from upstack.core.tables import markdown_table, short

RESULTS = "results.json"  # {"rows": [{"model": ..., "math_accuracy": ...}, ...], "problems": ...}
PLOT = "eval.png"


def read_results(stage_dir: Path) -> dict | None:
    try:
        return json.loads((Path(stage_dir) / RESULTS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def results_table(results: dict) -> str:
    """One row per model, one column per measure any model has."""
    rows = results["rows"]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return markdown_table(columns, [[short(row.get(c)) for c in columns] for row in rows])
