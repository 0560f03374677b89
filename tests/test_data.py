"""Dataset sources and mixtures: loading, renaming, filters, sampling, errors that name the entry."""

import json

import pytest
from conftest import write_recipe

from upstack.core.context import StageContext
from upstack.core.errors import UserError
from upstack.core.recipe import Recipe, load_recipe
from upstack.core.runner import run
from upstack.train.data import Source, build_mixture


def _ctx(tmp_path, seed=7):
    """A stage `sft` of a recipe `r.yaml` with no other stages, writing under tmp_path/runs."""
    recipe = Recipe(name="r", seed=seed, output_dir=str(tmp_path / "runs"), stages={})
    recipe.source = "r.yaml"
    return StageContext(recipe, "sft", tmp_path / "out", tmp_path / "work", "test")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mixture_renames_joins_filters_and_samples(tmp_path):
    alpaca = _jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {
                "instruction": f"Add {i} and 1.",
                "input": "" if i % 2 else "Be brief.",
                "output": str(i + 1),
            }
            for i in range(10)
        ],
    )
    orca = _jsonl(
        tmp_path / "orca.jsonl",
        [
            {
                "id": f"{task}.{i}",
                "system_prompt": "You are helpful.",
                "question": f"q{task}{i}",
                "response": "r",
            }
            for task in ("flan", "niv", "cot")
            for i in range(20)
        ],
    )
    sources = [
        Source(
            path=alpaca,
            columns={"instruction": "prompt", "input": "prompt", "output": "completion"},
        ),
        Source(
            path=orca,
            max_samples=15,
            columns={"system_prompt": "system", "question": "prompt", "response": "completion"},
            exclude=[
                {"column": "id", "prefixes": ["niv."]},
                {"column": "id", "pattern": r"^cot\.1\d$"},
            ],
        ),
        Source(arith={"problems": 20}, weight=0.5),
    ]
    train, held_out = build_mixture(sources, "sft", _ctx(tmp_path))
    assert held_out is None and train.column_names == ["messages"]
    assert len(train) == 10 + 15 + 10
    users = [m[-2]["content"] for m in train["messages"]]
    # an empty input is not joined
    assert "Add 0 and 1.\n\nBe brief." in users and "Add 1 and 1." in users
    orca_rows = [m for m in train["messages"] if m[0]["role"] == "system"]
    assert len(orca_rows) == 15
    dropped = {f"qniv{i}" for i in range(20)} | {f"qcot{i}" for i in range(10, 20)}
    assert not {m[1]["content"] for m in orca_rows} & dropped
    assert all(m[-1]["role"] == "assistant" for m in train["messages"])
    again, _ = build_mixture(sources, "sft", _ctx(tmp_path))
    assert again["messages"] == train["messages"]  # seeded
    other, _ = build_mixture(sources, "sft", _ctx(tmp_path, seed=8))
    assert other["messages"] != train["messages"]


def test_text_formats_eval_fraction_and_file_kinds(tmp_path):
    (tmp_path / "notes.txt").write_text("".join(f"line {i}\n" for i in range(30)))
    (tmp_path / "more.csv").write_text("body\n" + "".join(f"row {i}\n" for i in range(10)))
    sources = [
        Source(path=str(tmp_path / "notes.txt")),
        Source(path=str(tmp_path / "more.csv"), columns={"body": "text"}),
        Source(arith={"problems": 10}),
    ]
    train, held_out = build_mixture(sources, "text", _ctx(tmp_path), eval_fraction=0.2)
    assert len(train) + len(held_out) == 50 and len(held_out) == 10
    assert set(train["text"]).isdisjoint(held_out["text"])
    assert any(t.startswith("Question: ") for t in [*train["text"], *held_out["text"]])


def test_stage_source_reads_split_dir_and_its_test_file(tmp_path):
    alignment = tmp_path / "runs" / "pairs" / "alignment"
    alignment.mkdir(parents=True)
    row = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    _jsonl(alignment / "train.jsonl", [row] * 6)
    _jsonl(alignment / "test.jsonl", [row] * 2)
    train, held_out = build_mixture(
        [Source(stage="pairs", split="alignment", eval_split="test")], "preference", _ctx(tmp_path)
    )
    assert (len(train), len(held_out)) == (6, 2)
    assert train[0] == row


def test_preference_rows_become_conversations(tmp_path):
    ultra = _jsonl(
        tmp_path / "uf.jsonl",
        [
            {
                "prompt": "Name a prime.",
                "chosen": [
                    {"role": "user", "content": "Name a prime."},
                    {"role": "assistant", "content": "7"},
                ],
                "rejected": [
                    {"role": "user", "content": "Name a prime."},
                    {"role": "assistant", "content": "8"},
                ],
            }
        ],
    )
    orca = _jsonl(
        tmp_path / "orca.jsonl",
        [{"system": "Be exact.", "question": "1+1?", "chosen": "2", "rejected": "3"}],
    )
    train, _ = build_mixture(
        [Source(path=ultra), Source(path=orca, columns={"question": "prompt"})],
        "preference",
        _ctx(tmp_path),
    )
    rows = {r["chosen"][0]["content"]: r for r in train}
    assert rows["7"]["prompt"] == [{"role": "user", "content": "Name a prime."}]
    assert rows["7"]["rejected"] == [{"role": "assistant", "content": "8"}]
    assert rows["2"]["prompt"] == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "1+1?"},
    ]


def test_missing_column_names_the_entry(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "worse": "c"}])
    with pytest.raises(UserError, match=r"stages\.sft\.datasets\.1: missing column 'rejected'"):
        build_mixture([Source(path=good), Source(path=bad)], "preference", _ctx(tmp_path))
    with pytest.raises(UserError, match=r"datasets\.0: missing column 'completion'"):
        build_mixture([Source(path=bad)], "sft", _ctx(tmp_path))
    with pytest.raises(UserError, match=r"datasets\.0\.columns\.answer: no column 'answer'"):
        build_mixture(
            [Source(path=good, columns={"answer": "chosen"})], "preference", _ctx(tmp_path)
        )


def test_recipe_checks_sources_refs_and_trainer_keys(tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    path = write_recipe(
        tmp_path,
        f"""\
        name: t
        stages:
          sft_b:
            kind: sft
            model: sft_a
            datasets: [{{path: {data}}}]
          sft_a:
            kind: sft
            model: {tiny_model}
            datasets: [{{path: {data}}}]
            trainer: {{learning_rate: 2e-5, max_steps: 3}}
        """,
    )
    recipe = load_recipe(path)
    assert recipe.order() == ["sft_a", "sft_b"]
    # a stage source must be a pairs stage: a model stage there is refused at load, by line
    wrong = path.read_text().replace(f"{{path: {data}}}", "{stage: sft_a, split: instruct}", 1)
    with pytest.raises(
        UserError,
        match=r"wrong.yaml:6: stages.sft_b.datasets.0.stage: 'sft_a' is a stage of kind sft, "
        "not a pairs stage",
    ):
        load_recipe(write_recipe(tmp_path, wrong, "wrong.yaml"))
    # YAML's "2e-5" string, as a float
    assert recipe.stages["sft_a"].trainer["learning_rate"] == 2e-5
    for trainer, message in [
        (
            "{lerning_rate: 1.0e-5}",
            r"recipe.yaml:\d+: stages.sft.trainer.lerning_rate: unknown key "
            r"\(not a field of trl.SFTConfig; did you mean learning_rate\?\)",
        ),
        ("{output_dir: /tmp/x}", r"stages.sft.trainer.output_dir: set by the stage"),
    ]:
        bad = write_recipe(
            tmp_path,
            f"""\
            name: t
            stages:
              sft:
                model: {tiny_model}
                datasets: [{{path: {data}}}]
                trainer: {trainer}
            """,
            name="bad.yaml",
        )
        with pytest.raises(UserError, match=message.replace("recipe.yaml", "bad.yaml")):
            load_recipe(bad)
    two = write_recipe(
        tmp_path,
        f"""\
        name: t
        stages:
          dpo:
            model: {tiny_model}
            datasets: [{{path: {data}, arith: {{problems: 3}}}}]
        """,
        name="two.yaml",
    )
    with pytest.raises(
        UserError, match=r"stages.dpo.datasets.0: give exactly one of hub, path, stage, arith"
    ):
        load_recipe(two)


def test_a_missing_file_in_a_later_stage_fails_before_anything_runs(tmp_path, tiny_model):
    good = _jsonl(tmp_path / "good.jsonl", [{"text": "x"}])
    path = write_recipe(
        tmp_path,
        f"""\
        name: t
        output_dir: {tmp_path / "runs"}
        stages:
          cpt:
            model: {tiny_model}
            datasets: [{{path: {good}}}]
          sft:
            model: cpt
            datasets:
              - arith: {{problems: 5}}
              - path: {tmp_path}/typo.jsonl
        """,
    )
    with pytest.raises(
        UserError,
        match=r"recipe.yaml:11: stages.sft.datasets.1.path: .*typo.jsonl: no such file",
    ):
        run(load_recipe(path), [])
    assert not (tmp_path / "runs" / "cpt").exists()


def _fineweb_like(directory, files: int, rows: int, kind: str) -> None:
    """A local corpus shaped like FineWeb: text, id, url, dump, score, over several files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir()
    for f in range(files):
        docs = [
            {
                "text": f"document {f}-{i}: " + " ".join(["words"] * (i % 7 + 1)),
                "id": f"<urn:uuid:{f:03d}-{i:05d}>",
                "url": f"https://example.org/{f}/{i}",
                "dump": "CC-MAIN-2024-10",
                "score": (i % 5) / 5,
            }
            for i in range(rows)
        ]
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(docs), directory / f"train-{f:05d}.parquet")
        else:
            (directory / f"train-{f:05d}.jsonl").write_text(
                "".join(json.dumps(d) + "\n" for d in docs)
            )


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_streaming_selects_the_same_rows_as_loading_for_the_same_seed(tmp_path, kind):
    corpus = tmp_path / "fineweb"
    _fineweb_like(corpus, files=3, rows=200, kind=kind)

    def texts(streaming: bool, seed: int = 7, **settings) -> list[str]:
        source = Source(path=str(corpus), streaming=streaming, **settings)
        train, _ = build_mixture([source], "text", _ctx(tmp_path / f"{streaming}{seed}", seed))
        return sorted(train["text"])

    loaded, streamed = texts(False, max_samples=50), texts(True, max_samples=50)
    assert len(loaded) == 50 and streamed == loaded
    files = {t.split()[1].split("-")[0] for t in loaded}
    assert len(files) == 3  # a random subset over every file, not the head of the first
    assert texts(True, seed=8, max_samples=50) != streamed  # another seed, other rows
    assert texts(True, weight=0.1) == texts(False, weight=0.1)  # 60 of 600 either way
    assert len(texts(True, weight=0.1)) == 60
    # the kept rows are all that is held: the stream is written to the work dir, not a list
    assert list((tmp_path / "True7" / "work" / "streamed").glob("datasets_0-*.jsonl"))


def test_max_tokens_takes_rows_in_order_until_the_budget(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    corpus = tmp_path / "fineweb"
    _fineweb_like(corpus, files=2, rows=100, kind="jsonl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def tokens(streaming: bool) -> tuple[int, list[str]]:
        source = Source(path=str(corpus), streaming=streaming, max_tokens=300)
        train, _ = build_mixture(
            [source], "text", _ctx(tmp_path / str(streaming)), tokenizer=tokenizer
        )
        counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in train["text"]]
        return sum(counts), sorted(train["text"])

    spent, rows = tokens(True)
    assert 300 <= spent < 300 + 40 and tokens(False) == (spent, rows)


def test_generated_listops_preference_pairs_reject_the_expected_mistake():
    from types import SimpleNamespace

    from data_synth.seeds import last_boxed
    from data_synth.verify import same_answer
    from upstack.train.data import _generated_rows

    ctx = SimpleNamespace(seed=5, fail=lambda where, message: AssertionError(message))
    rows = _generated_rows("listops", 200, "train", "preference", ctx, "datasets.0.generated")
    assert len(rows) == 200
    assert rows == _generated_rows("listops", 200, "train", "preference", ctx, "d")  # seeded
    for row in rows:
        question = row["prompt"][0]["content"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected
        # same wording, another answer: only what the answer is differs
        assert chosen.split("\\boxed")[0].split()[:3] == rejected.split("\\boxed")[0].split()[:3]
        assert not same_answer(last_boxed(chosen), last_boxed(rejected)), question
