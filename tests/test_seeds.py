import json

import pytest
from pydantic import TypeAdapter

from data_synth.errors import DataSynthError
from data_synth.seeds import SeedSource, last_boxed, load_problems

SOURCE = TypeAdapter(SeedSource)


def seeds(**raw):
    return SOURCE.validate_python(raw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_preset_reads_boxed_answers(tmp_path):
    rows = [
        {
            "problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?",
            "level": "Level 1",
            "type": "Algebra",
            "solution": "Add: $\\frac{2}{4}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$.",
        },
        {
            "problem": "Compute $2^{10}$.",
            "level": "Level 2",
            "type": "Algebra",
            "solution": "$2^{10} = \\boxed{1024}$",
        },
    ]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    problems = load_problems(seeds(source="hf", path=str(path), preset="math"), seed=0)
    assert [p.answer for p in problems] == ["\\frac{3}{4}", "1024"]
    assert problems[0].question.startswith("What is") and problems[0].metadata["type"] == "Algebra"


def test_gsm8k_preset_reads_the_hash_line_from_a_saved_dataset(tmp_path):
    from datasets import Dataset

    Dataset.from_list(
        [
            {
                "question": "Tom has 1,200 coins and gets 34 more. How many?",
                "answer": "1200 + 34 = <<1200+34=1234>>1234\n#### 1,234",
            },
            {"question": "Half of 8?", "answer": "8 / 2 = 4\n#### 4"},
        ]
    ).save_to_disk(tmp_path / "gsm8k")
    problems = load_problems(
        seeds(source="hf", path=str(tmp_path / "gsm8k"), preset="gsm8k"), seed=0
    )
    assert [p.answer for p in problems] == ["1234", "4"]


def test_metamathqa_preset_keeps_the_original_question(tmp_path):
    rows = [
        {
            "query": "What is 3 times 4?",
            "type": "GSM_Rephrased",
            "original_question": "3*4?",
            "response": "3 * 4 = 12.\nThe answer is: 12",
        }
    ]
    path = write_jsonl(tmp_path / "metamath.json", rows)
    [problem] = load_problems(seeds(source="hf", path=str(path), preset="metamathqa"), seed=0)
    assert problem.answer == "12" and problem.metadata["original_question"] == "3*4?"


def test_hf_missing_column_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "a", "s": "b"}])
    with pytest.raises(DataSynthError, match="no column"):
        load_problems(seeds(source="hf", path=str(path), preset="math"), seed=0)


def test_champ_loads_all_270_offline():
    problems = load_problems(seeds(source="champ"), seed=0)
    assert len(problems) == 270 and len({p.id for p in problems}) == 270
    assert all(p.question and p.solution and p.answer for p in problems)
    assert len(load_problems(seeds(source="champ", limit=5, shuffle=True), seed=1)) == 5


def test_jsonl_with_mapping_and_extractor(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl", [{"id": "a1", "q": "1+1?", "sol": "So \\boxed{2}."}]
    )
    source = seeds(
        source="jsonl",
        path=str(path),
        columns={"question": "q", "solution": "sol", "id": "id"},
        answer_from="boxed",
    )
    [problem] = load_problems(source, seed=0)
    assert (problem.id, problem.answer) == ("a1", "2")


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "solution": "s", "answer": "1"}\n{not json\n')
    with pytest.raises(DataSynthError, match=r"bad\.jsonl:2: not valid JSON"):
        load_problems(seeds(source="jsonl", path=str(path)), seed=0)


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"question": "q", "solution": "s", "answer": "1"}, {"question": "q2", "answer": "2"}],
    )
    with pytest.raises(DataSynthError, match=r"bad\.jsonl:2: field 'solution'"):
        load_problems(seeds(source="jsonl", path=str(path)), seed=0)


@pytest.mark.parametrize("task", ["arith", "listops"])
def test_train_synth_seeds_and_eval_are_disjoint_by_identity(task):
    key = "numbers" if task == "arith" else "args"
    identity = lambda p: (p.metadata["kind"], tuple(p.metadata[key]))  # noqa: E731
    found = {}
    for split, count in (("train", 300), ("synth", 150), ("eval", 60)):
        problems = [
            p
            for s in (3, 4)  # whatever the seed
            for p in load_problems(seeds(source=task, split=split, count=count), seed=s)
        ]
        assert len({identity(p) for p in problems}) > count  # two seeds, not all the same
        assert all(p.metadata["split"] == split for p in problems)
        assert all(last_boxed(p.solution) == p.answer for p in problems)
        found[split] = {identity(p) for p in problems}
    assert not found["train"] & found["synth"]
    assert not found["train"] & found["eval"]
    assert not found["synth"] & found["eval"]


def test_last_boxed_balances_braces():
    assert last_boxed("x \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("no answer") is None and last_boxed("\\boxed{3") is None


def test_listops_problems_are_deterministic_exact_and_split_by_identity():
    from data_synth import listops
    from data_synth.verify import same_answer

    train = listops.problems(400, seed=3)
    assert train == listops.problems(400, seed=3)  # the same seed, the same problems
    assert train != listops.problems(400, seed=4)
    held_out = listops.problems(100, seed=3, split="eval")
    other_seed_eval = listops.problems(100, seed=4, split="eval")
    identity = lambda p: (p.kind, p.args)  # noqa: E731
    train_ids = {identity(p) for p in train} | {identity(p) for p in listops.problems(400, seed=4)}
    # disjoint by identity whatever the seed: the split is a hash of kind and arguments
    assert not train_ids & (
        {identity(p) for p in held_out} | {identity(p) for p in other_seed_eval}
    )
    assert len({identity(p) for p in train}) == 400

    # each answer recomputed here, by another route than the generator's
    expected = {
        "reverse": lambda args: "[" + ", ".join(map(str, reversed(args))) + "]",
        "sort": lambda args: "[" + ", ".join(map(str, sorted(args))) + "]",
        "count": lambda args: str(sum(1 for ch in args[1] if ch == args[0])),
        "largest": lambda args: str(sorted(args)[-1]),
        "join": lambda args: "-".join(args),
        "last": lambda args: str(args[len(args) - 1]),
    }
    kinds = set()
    for problem in train + held_out:
        kinds.add(problem.kind)
        assert str(problem.answer) == expected[problem.kind](problem.args), problem
        for solution in problem.solutions():  # every wording ends in the same exact answer
            assert same_answer(last_boxed(solution), str(problem.answer))
    assert kinds == set(expected)
