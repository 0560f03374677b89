"""pairs stage: synth records -> an instruct set (messages) and SOLAR's Synth.Math-Alignment DPO tuples.

Output, each a dataset dir that `datasets.load_dataset(dir)` reads as train/test splits:

    instruct/train.jsonl, instruct/test.jsonl    {"messages": [{user: question}, {assistant: answer}]}
    alignment/train.jsonl, alignment/test.jsonl  {"prompt": [{user: rephrased question}],
                                                  "chosen": [{assistant: rephrased answer}],
                                                  "rejected": [{assistant: original answer}]}

The tuples are TRL's conversational preference format, so DPOTrainer applies the policy's own
chat template. The split is by seed problem, so no seed has variants on both sides. A split with
no rows is not written (an empty .jsonl is not a loadable dataset); the manifest counts say so.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field

from data_synth.synth import RECORDS
from upstack.errors import UserError
from upstack.recipe import StageSpec

EXTRA = Literal["answer_augmentation", "fobar", "self_verification", "rephrase_question"]


class Spec(StageSpec):
    kind: Literal["pairs"] = "pairs"
    records: str = Field("synth", description="the synth stage (or a dir holding records.jsonl)")
    test_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of seed problems held out as test"
    )
    instruct_extra: list[EXTRA] = Field(
        default_factory=lambda: ["answer_augmentation", "fobar", "self_verification"],
        description="verified records added to the instruct set as they are, beside the tuples",
    )

    def refs(self) -> dict[str, str]:
        return {"records": self.records}


def run(spec: Spec, ctx) -> dict:
    records = _read_records(Path(ctx.model_path(spec.records)))
    by_seed: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_seed[record["seed_id"]][record["augmentation"]].append(record)

    test_seeds = _test_seeds(list(by_seed), spec.test_fraction, ctx.seed)
    rows = {(name, split): [] for name in ("instruct", "alignment") for split in ("train", "test")}
    seen: set[bytes] = set()
    duplicates = 0
    for seed_id, groups in by_seed.items():
        split = "test" if seed_id in test_seeds else "train"
        # SOLAR: prompt = rephrased question, chosen = rephrased answer, rejected = original answer.
        # The i-th kept rephrased question goes with the i-th kept rephrased answer of the same seed.
        for question, answer in zip(
            groups["rephrase_question"], groups["rephrase_answer"], strict=False
        ):
            tuple_row = {
                "prompt": [{"role": "user", "content": question["question"]}],
                "chosen": [{"role": "assistant", "content": answer["answer"]}],
                "rejected": [{"role": "assistant", "content": answer["original_solution"]}],
            }
            instruct_row = _messages(question["question"], answer["answer"])
            for name, row in (("alignment", tuple_row), ("instruct", instruct_row)):
                if _first_time(name, row, seen):
                    rows[name, split].append(row)
                else:
                    duplicates += 1
        for augmentation in spec.instruct_extra:
            for record in groups[augmentation]:
                row = _messages(record["question"], record["answer"])
                if _first_time("instruct", row, seen):
                    rows["instruct", split].append(row)
                else:
                    duplicates += 1

    for (name, split), items in rows.items():
        if not items:
            # an empty .jsonl is not a loadable dataset: leave the file out and say so
            ctx.log(f"warning: {name}/{split} is empty (no verified records for it); not written")
            continue
        (ctx.out_dir / name).mkdir(exist_ok=True)
        with (ctx.out_dir / name / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for row in items:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = {f"{name}_{split}": len(items) for (name, split), items in rows.items()}
    ctx.log(", ".join(f"{k}={v}" for k, v in counts.items()) + f", duplicates dropped={duplicates}")
    return {
        **counts,
        "seeds": len(by_seed),
        "test_seeds": len(test_seeds),
        "duplicates": duplicates,
    }


def _read_records(path: Path) -> list[dict]:
    file = path / RECORDS if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file}: synth records not found")
    with file.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


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
