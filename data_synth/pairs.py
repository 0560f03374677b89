"""Synth records -> an instruct set (messages) and SOLAR's Synth.Math-Alignment DPO tuples.

    instruct   {"messages": [{user: question}, {assistant: answer}]}
    alignment  {"prompt": [{user: rephrased question}], "chosen": [{assistant: rephrased answer}],
                "rejected": [{assistant: original answer}]}

The tuples are TRL's conversational preference format, so DPOTrainer applies the policy's own
chat template. The split into train and test is by seed problem, so no seed has variants on both
sides.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from data_synth.config import Strict
from data_synth.errors import DataSynthError
from data_synth.files import read_jsonl, write_jsonl

RECORDS = "records.jsonl"  # what synth writes
EXTRA = Literal[
    "answer_augmentation", "fobar", "self_verification", "new_numbers", "rephrase_question"
]
SETS = ("instruct", "alignment")
SPLITS = ("train", "test")


class PairsConfig(Strict):
    test_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of seed problems held out as test"
    )
    instruct_extra: list[EXTRA] = Field(
        default_factory=lambda: [
            "answer_augmentation",
            "fobar",
            "self_verification",
            "new_numbers",
        ],
        description="verified records added to the instruct set as they are, beside the tuples",
    )


@dataclass
class Pairs:
    rows: dict[tuple[str, str], list[dict]]  # (instruct|alignment, train|test) -> rows
    seeds: int
    test_seeds: int
    duplicates: int = 0
    # tuples not written, by reason: chosen_equals_rejected (no preference signal)
    dropped: Counter = field(default_factory=Counter)
    unpaired_seeds: int = 0  # seeds with a kept rephrased question or answer but not both
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = {f"{name}_{split}": len(rows) for (name, split), rows in self.rows.items()}


def read_records(path: Path) -> list[dict]:
    """synth's records: `path` is its output dir or the records file itself."""
    file = path / RECORDS if path.is_dir() else path
    if not file.is_file():
        raise DataSynthError(f"{file}: synth records not found")
    return [row for _, row in read_jsonl(file)]


def build_pairs(records: list[dict], config: PairsConfig, seed: int) -> Pairs:
    """The instruct rows and the tuples of every seed, split by seed, duplicates dropped."""
    by_seed: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_seed[record["seed_id"]][record["augmentation"]].append(record)

    test_seeds = _test_seeds(list(by_seed), config.test_fraction, seed)
    rows: dict[tuple[str, str], list[dict]] = {(n, s): [] for n in SETS for s in SPLITS}
    seen: set[bytes] = set()
    duplicates, unpaired, dropped = 0, 0, Counter()
    for seed_id, groups in by_seed.items():
        split = "test" if seed_id in test_seeds else "train"
        questions, answers = groups["rephrase_question"], groups["rephrase_answer"]
        unpaired += bool(questions) != bool(answers)
        # SOLAR: prompt = rephrased question, chosen = rephrased answer, rejected = original answer.
        # The i-th kept rephrased question goes with the i-th kept rephrased answer of the same seed.
        for question, answer in zip(questions, answers, strict=False):
            written = [("instruct", _messages(question["question"], answer["answer"]))]
            if _same_text(answer["answer"], answer["original_solution"]):
                # a "rephrasing" that is the original word for word: DPO learns nothing from it
                dropped["chosen_equals_rejected"] += 1
            else:
                tuple_row = {
                    "prompt": [{"role": "user", "content": question["question"]}],
                    "chosen": [{"role": "assistant", "content": answer["answer"]}],
                    "rejected": [{"role": "assistant", "content": answer["original_solution"]}],
                }
                written.insert(0, ("alignment", tuple_row))
            for name, row in written:
                if _first_time(name, row, seen):
                    rows[name, split].append(row)
                else:
                    duplicates += 1
        for augmentation in config.instruct_extra:
            for record in groups[augmentation]:
                row = _messages(record["question"], record["answer"])
                if _first_time("instruct", row, seen):
                    rows["instruct", split].append(row)
                else:
                    duplicates += 1
    return Pairs(
        rows,
        seeds=len(by_seed),
        test_seeds=len(test_seeds),
        duplicates=duplicates,
        dropped=dropped,
        unpaired_seeds=unpaired,
    )


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def write_pairs(pairs: Pairs, out_dir: Path) -> list[str]:
    """`<set>/<split>.jsonl` under `out_dir`, each a dataset dir `datasets.load_dataset` reads as
    train/test splits. An empty split is not written (an empty .jsonl is not a loadable
    dataset): its name is returned instead."""
    empty = []
    for (name, split), rows in pairs.rows.items():
        if rows:
            write_jsonl(Path(out_dir) / name / f"{split}.jsonl", rows)
        else:
            empty.append(f"{name}/{split}")
    return empty


def _messages(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def _first_time(name: str, row: dict, seen: set[bytes]) -> bool:
    """False for a row already written (whitespace and case aside), in either split."""
    text = re.sub(r"\s+", " ", json.dumps(row, ensure_ascii=False).lower())
    key = hashlib.sha256(f"{name}:{text}".encode()).digest()
    if key in seen:
        return False
    seen.add(key)
    return True


def _test_seeds(seed_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded, order-independent choice: a seed is test if its hash falls under the fraction."""
    if fraction == 0 or len(seed_ids) < 2:
        return set()

    def unit(seed_id: str) -> float:
        return int(hashlib.sha256(f"{seed}:{seed_id}".encode()).hexdigest()[:12], 16) / 16**12

    test = {s for s in seed_ids if unit(s) < fraction}
    # a tiny run still gets a non-empty test split (an empty file is not a loadable dataset)
    return test or {min(seed_ids, key=unit)}
