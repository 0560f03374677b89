import json

from conftest import write_recipe

from upstack.core.recipe import load_recipe
from upstack.core.runner import run


def record(seed: int, augmentation: str, sample: int, question: str, answer: str) -> dict:
    return {
        "id": f"s{seed}:{augmentation}:{sample}",
        "seed_id": f"s{seed}",
        "source": "test",
        "augmentation": augmentation,
        "sample": sample,
        "question": question,
        "answer": answer,
        "gold": str(seed),
        "original_question": f"Original question {seed}?",
        "original_solution": f"Original solution, \\boxed{{{seed}}}.",
    }


def write_records(directory, seeds: int) -> None:
    rows = []
    for s in range(seeds):
        rows += [
            record(
                s, "rephrase_question", 0, f"Reworded question {s}?", f"Solving it: \\boxed{{{s}}}"
            ),
            record(s, "rephrase_question", 1, f"Another wording {s}?", f"Again: \\boxed{{{s}}}"),
            record(
                s, "rephrase_answer", 0, f"Original question {s}?", f"Step by step, \\boxed{{{s}}}."
            ),
            record(
                s, "answer_augmentation", 0, f"Original question {s}?", f"Fresh: \\boxed{{{s}}}"
            ),
        ]
    # seed 0's fresh answer again, differing only in whitespace: must not be written twice
    rows.append(record(0, "answer_augmentation", 1, "Original question 0?", "Fresh:  \\boxed{0}"))
    directory.mkdir(parents=True)
    (directory / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pairs_writes_solar_tuples_and_instruct_split_by_seed(tmp_path, tiny_model):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    write_records(tmp_path / "records", seeds=40)
    path = write_recipe(
        tmp_path,
        f"""
        name: p
        output_dir: {tmp_path / "runs"}
        stages:
          pairs: {{records: {tmp_path / "records"}, test_fraction: 0.25}}
    """,
    )
    run(load_recipe(path), ["pairs"])
    out = tmp_path / "runs" / "pairs"
    alignment, instruct = load_dataset(str(out / "alignment")), load_dataset(str(out / "instruct"))
    assert set(alignment) == set(instruct) == {"train", "test"}

    tuples = [*alignment["train"], *alignment["test"]]
    # one rephrased answer per seed, zipped with its first rephrased question
    assert len(tuples) == 40
    for row in tuples:
        seed = row["prompt"][0]["content"].removeprefix("Reworded question ").removesuffix("?")
        assert row["prompt"] == [{"role": "user", "content": f"Reworded question {seed}?"}]
        assert row["chosen"] == [
            {"role": "assistant", "content": f"Step by step, \\boxed{{{seed}}}."}
        ]
        assert row["rejected"] == [
            {"role": "assistant", "content": f"Original solution, \\boxed{{{seed}}}."}
        ]

    # no seed on both sides of the split
    test_seeds = {r["prompt"][0]["content"] for r in alignment["test"]}
    assert 0 < len(test_seeds) < 40 and not test_seeds & {
        r["prompt"][0]["content"] for r in alignment["train"]
    }
    # instruct = each tuple's (prompt, chosen) + answer_augmentation records, the duplicate dropped
    assert len(instruct["train"]) + len(instruct["test"]) == 80
    manifest = json.loads((out / "upstack.json").read_text())["metrics"]
    assert (
        manifest["alignment_train"] + manifest["alignment_test"] == 40
        and manifest["duplicates"] == 1
    )

    # TRL reads the tuples as conversational and renders them with the model's chat template
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert is_conversational(tuples[0])
    rendered = maybe_apply_chat_template(tuples[0], tokenizer)
    assert rendered["prompt"].startswith("<|im_start|>user\n") and rendered["prompt"].endswith(
        "assistant\n"
    )
    assert (
        rendered["chosen"].endswith("<|im_end|>\n") and "Original solution" in rendered["rejected"]
    )
