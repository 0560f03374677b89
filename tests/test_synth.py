import json
from collections import Counter

import pytest
from conftest import run_cli, write_recipe

from data_synth.seeds import Problem
from data_synth.synth import Spec, _first_round, _judge_first, _judge_second
from data_synth.verify import check
from upstack.errors import UserError
from upstack.recipe import load_recipe
from upstack.runner import run


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics(stage_dir):
    return json.loads((stage_dir / "upstack.json").read_text())["metrics"]


SCRIPTED = """
    name: synth-test
    output_dir: {out}
    seed: 7
    stages:
      synth:
        seeds: [{{source: arith, count: 60}}]
        teacher: {{kind: scripted, error_rate: 0.3}}
        augmentations: {{rephrase_question: 2, rephrase_answer: 2, answer_augmentation: 1}}
        decontaminate: {{against: [{{source: arith, split: eval, count: 100}}], ngram: 8}}
      pairs: {{test_fraction: 0.2}}
"""


def test_scripted_synth_verifies_counts_and_builds_solar_tuples(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, SCRIPTED.format(out=tmp_path / "runs")))
    run(recipe, ["pairs"])
    synth_dir = tmp_path / "runs" / "synth"
    records, stats = read_jsonl(synth_dir / "records.jsonl"), metrics(synth_dir)

    # every kept record really reaches its gold answer; spoiled ones were dropped and counted
    assert records and all(check(r["gold"], r["answer"]) is None for r in records)
    assert stats["dropped"]["wrong_answer"] > 0 and stats["dropped"]["no_boxed_answer"] > 0
    assert stats["kept"] == len(records) and stats["requests_sent"] == stats["requests"]
    # a rephrased question is a different wording of the same problem
    rephrased = [r for r in records if r["augmentation"] == "rephrase_question"]
    assert all(r["question"] != r["original_question"] for r in rephrased)
    assert {"seed_id", "teacher", "model", "sample", "request_hash"} <= set(records[0])

    # SOLAR's Synth.Math-Alignment: prompt = rephrased question, chosen = rephrased answer,
    # rejected = original answer, all of the same seed
    by_question = {r["question"]: r for r in rephrased}
    answers = {r["answer"]: r for r in records if r["augmentation"] == "rephrase_answer"}
    pairs_dir = tmp_path / "runs" / "pairs"
    tuples = read_jsonl(pairs_dir / "alignment" / "train.jsonl") + read_jsonl(
        pairs_dir / "alignment" / "test.jsonl"
    )
    assert tuples
    for row in tuples:
        question = by_question[row["prompt"][0]["content"]]
        answer = answers[row["chosen"][0]["content"]]
        assert question["seed_id"] == answer["seed_id"]
        assert (
            row["rejected"][0]["content"]
            == answer["original_solution"]
            == question["original_solution"]
        )
        assert [m["role"] for m in row["prompt"] + row["chosen"] + row["rejected"]] == [
            "user",
            "assistant",
            "assistant",
        ]


def _problem():
    return Problem(
        id="p1",
        question="Ana has 3 apples and buys 4 more. How many?",
        solution="3 + 4 = \\boxed{7}",
        answer="7",
        source="arith",
    )


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("So the total is 7.", "no_boxed_answer"),
        ("So \\boxed{8}.", "wrong_answer"),
        ("So \\boxed{7", "no_boxed_answer"),
        (None, "request_failed"),
    ],
)
def test_malformed_teacher_output_is_dropped_and_counted(reply, reason):
    spec = Spec.model_validate(
        {
            "seeds": [{"source": "arith"}],
            "teacher": {"kind": "scripted"},
            "augmentations": {"rephrase_question": 1, "rephrase_answer": 1},
        }
    )
    first = _first_round(_problem(), spec, seed=0)
    dropped = Counter()
    # both round-one replies malformed: the answer is judged directly ...
    records, second = _judge_first(first, {r.key: reply for r in first}, spec, 0, dropped)
    assert records == []
    # ... and a malformed question never reaches round two, or its solve is judged there
    solve_replies = {item[0].key: reply for item in second}
    assert _judge_second(second, solve_replies, spec, dropped) == []
    assert sum(dropped.values()) == 2 and dropped[reason] >= 1


def test_good_answer_in_latex_form_is_kept():
    spec = Spec.model_validate(
        {
            "seeds": [{"source": "arith"}],
            "teacher": {"kind": "scripted"},
            "augmentations": {"rephrase_question": 0, "rephrase_answer": 1},
        }
    )
    first = _first_round(_problem(), spec, seed=0)
    records, _ = _judge_first(
        first, {first[0].key: "3+4 gives \\boxed{\\frac{14}{2}}"}, spec, 0, Counter()
    )
    assert len(records) == 1 and records[0]["gold"] == "7"


def test_scripted_teacher_refuses_other_seeds(tmp_path):
    seeds = tmp_path / "mine.jsonl"
    seeds.write_text(
        json.dumps({"question": "1+1?", "solution": "\\boxed{2}", "answer": "2"}) + "\n"
    )
    path = write_recipe(
        tmp_path,
        f"""
        name: r
        output_dir: {tmp_path / "runs"}
        stages:
          synth:
            seeds: [{{source: jsonl, path: {seeds}}}]
            teacher: {{kind: scripted}}
    """,
    )
    with pytest.raises(UserError, match="scripted teacher only knows `arith`"):
        run(load_recipe(path), ["synth"])


@pytest.mark.slow
def test_bad_seed_file_exits_2_naming_file_and_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        '{"question": "q", "solution": "s", "answer": "1"}\n{"question": "q2", "solution": "s"}\n'
    )
    write_recipe(
        tmp_path,
        """
        name: r
        stages:
          synth:
            seeds: [{source: jsonl, path: seeds.jsonl}]
            teacher: {kind: scripted}
    """,
    )
    result = run_cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "seeds.jsonl:2: field 'answer' (columns.answer) is missing" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "r" / "synth").exists()
