import json

import pytest
from conftest import run_cli, write_recipe

from data_synth.verify import check
from upstack.core.errors import StageFailed, UserError
from upstack.core.recipe import load_recipe
from upstack.core.runner import run


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


def fake_teacher(make_reply):
    """A teacher stream that answers every request with make_reply(request): text, or None for a failure."""
    from data_synth.exchange import Reply

    async def stream(spec, requests, runtime):
        for request in requests:
            text = make_reply(request)
            yield request, Reply(text, error=None if text is not None else "HTTP 500")

    return stream


def run_synth(tmp_path, monkeypatch, make_reply) -> dict:
    monkeypatch.setattr("data_synth.teachers.stream", fake_teacher(make_reply))
    path = write_recipe(
        tmp_path,
        f"""
        name: malformed
        output_dir: {tmp_path / "runs"}
        stages:
          synth:
            seeds: [{{source: arith, count: 5}}]
            teacher: {{kind: scripted}}
            augmentations: {{rephrase_question: 1, rephrase_answer: 1}}
    """,
    )
    run(load_recipe(path), ["synth"])
    return metrics(tmp_path / "runs" / "synth")


@pytest.mark.parametrize(
    "reply, reason, error",
    [
        ("", "request_failed", "empty reply"),  # nothing to keep: not cached, asked again
        ("So the total is some number.", "no_boxed_answer", None),
        ("So \\boxed{999}.", "wrong_answer", None),
        ("Cut off: \\boxed{12", "no_boxed_answer", None),
        (None, "request_failed", "HTTP 500"),
    ],
)
def test_malformed_teacher_output_is_dropped_and_counted(
    tmp_path, monkeypatch, reply, reason, error
):
    """Nothing usable: every reply dropped by reason, and the stage fails rather than hand an
    empty data set to sft (the tally is kept beside the request cache)."""
    with pytest.raises(StageFailed, match=r"stages\.synth\.teacher: ") as failed:
        run_synth(tmp_path, monkeypatch, lambda request: reply)
    stats = json.loads(
        (tmp_path / "runs" / ".upstack" / "work" / "synth" / "failed_requests.json").read_text()
    )
    # 5 rephrased answers dropped in round one; 5 rephrased questions dropped in round one
    # (empty, failed) or, being usable text, sent to round two and their solves dropped there
    assert stats["kept"] == 0 and stats["dropped"] == {reason: 10}
    if error:  # failed requests: counted by error, more than the allowed share
        assert stats["request_errors"] == {error: 10}
        assert f"10 of 10 teacher requests failed ({error} x10)" in str(failed.value)
    else:
        assert f"no record survived verification ({reason} x10)" in str(failed.value)
    assert not (tmp_path / "runs" / "synth").exists()  # no output that counts as done


def test_equivalent_answer_in_another_form_is_kept(tmp_path, monkeypatch):
    def reply(request):  # "7" as \frac{14}{2}: math-verify, not string equality, decides
        if request.gold is None:
            return f"Reworded question {request.problem.id}?"
        return f"Therefore \\boxed{{\\frac{{{2 * int(request.gold)}}}{{2}}}}"

    stats = run_synth(tmp_path, monkeypatch, reply)
    assert stats["kept"] == 10 and stats["dropped"] == {}


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
    with pytest.raises(
        UserError, match=r"recipe.yaml:\d+: stages.synth: .*scripted teacher only knows `arith`"
    ):
        load_recipe(path)


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
            teacher: {kind: openai, model: m, base_urls: ["http://127.0.0.1:9/v1"]}
    """,
    )
    result = run_cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "seeds.jsonl:2: field 'answer' (columns.answer) is missing" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "r" / "synth").exists()


def test_backward_questions_fobar_and_self_verification(tmp_path, monkeypatch):
    def reply(request):
        if request.task == "self_verification":  # the teacher's restatement of question + answer
            return f"Knowing the total for {request.problem.id}, find X."
        return f"X is \\boxed{{{request.gold}}}"  # a correct solve of whatever was asked

    monkeypatch.setattr("data_synth.teachers.stream", fake_teacher(reply))
    path = write_recipe(
        tmp_path,
        f"""
        name: backward
        output_dir: {tmp_path / "runs"}
        stages:
          synth:
            seeds: [{{source: arith, count: 4}}]
            teacher: {{kind: openai, model: m, base_urls: ["http://127.0.0.1:9/v1"]}}
            augmentations: {{rephrase_question: 0, rephrase_answer: 0, fobar: 1, self_verification: 1}}
    """,
    )
    run(load_recipe(path), ["synth"])
    records = read_jsonl(tmp_path / "runs" / "synth" / "records.jsonl")
    fobar = [r for r in records if r["augmentation"] == "fobar"]
    verification = [r for r in records if r["augmentation"] == "self_verification"]
    assert len(fobar) == len(verification) == 4
    for record in fobar:
        # one number of the original question became X; the answer is given; X is the gold
        assert (
            f"the above question is {record['original_solution'].split('boxed{')[1].split('}')[0]}"
            in record["question"]
        )
        assert record["question"].count("X") >= 2 and record["gold"] in record["original_question"]
        # FOBAR's question is a template, not a reply
        assert record["question_request_hash"] is None
    assert all(
        r["question"].startswith("Knowing the total") and r["question_request_hash"]
        for r in verification
    )


@pytest.mark.slow
def test_missing_api_key_fails_before_any_stage_runs(tmp_path):
    write_recipe(
        tmp_path,
        """
        name: r
        stages:
          init: {}
          synth:
            after: [init]
            seeds: [{source: arith, count: 5}]
            teacher:
              kind: openai
              model: m
              base_urls: ["http://127.0.0.1:9/v1"]
              api_key_env: UPSTACK_TEST_MISSING_KEY
    """,
    )
    result = run_cli("run", "recipe.yaml", cwd=tmp_path, env={"UPSTACK_TEST_MISSING_KEY": ""})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: recipe.yaml:12: stages.synth.teacher.api_key_env: "
        "environment variable UPSTACK_TEST_MISSING_KEY is not set"
    )
    assert not (tmp_path / "runs" / "r" / "init").exists()  # failed before the first stage ran


def scripted_synth(tmp_path, seeds: str, augmentations: str) -> tuple[list[dict], dict]:
    """A synth stage on the scripted teacher with 30% of its answers spoiled: (records, metrics)."""
    path = write_recipe(
        tmp_path,
        f"""
        name: scripted
        output_dir: {tmp_path / "runs"}
        stages:
          synth:
            seeds: [{seeds}]
            teacher: {{kind: scripted, error_rate: 0.3}}
            augmentations: {augmentations}
    """,
    )
    run(load_recipe(path), ["synth"])
    stage_dir = tmp_path / "runs" / "synth"
    return read_jsonl(stage_dir / "records.jsonl"), metrics(stage_dir)


def test_scripted_fobar_solves_for_x_and_spoiled_solves_are_dropped(tmp_path):
    from data_synth.seeds import last_boxed

    records, stats = scripted_synth(
        tmp_path,
        "{source: arith, count: 40}",
        "{rephrase_question: 0, rephrase_answer: 0, answer_augmentation: 0, fobar: 1}",
    )
    fobar = [r for r in records if r["augmentation"] == "fobar"]
    assert 15 <= len(fobar) < 40  # ~30% spoiled: dropped by the verifier, the rest kept
    assert stats["kept"] == len(fobar)
    assert sum(stats["dropped"].values()) == 40 - len(fobar)  # wrong X, or no boxed answer
    for record in fobar:
        x = last_boxed(record["answer"])
        assert x == record["gold"]
        # correct where it claims to be: X put back into the masked question is the original
        # problem, and that problem's answer is the one the question gives
        restored = record["question"].split("\n")[0].replace("X", x)
        assert restored == record["original_question"]
        given = record["question"].split("the above question is ")[1].split(",")[0]
        assert given == last_boxed(record["original_solution"])


def test_scripted_listops_answers_verify_and_spoiled_ones_are_dropped(tmp_path):
    from data_synth.seeds import last_boxed
    from data_synth.verify import same_answer

    records, stats = scripted_synth(
        tmp_path,
        "{source: listops, split: synth, count: 40}",
        "{rephrase_question: 1, rephrase_answer: 1, answer_augmentation: 1}",
    )
    assert {r["augmentation"] for r in records} == {
        "rephrase_question",
        "rephrase_answer",
        "answer_augmentation",
    }
    for record in records:  # every kept answer reaches the problem's exact answer
        assert same_answer(last_boxed(record["answer"]), record["gold"])
        if record["augmentation"] == "rephrase_answer":
            assert record["answer"] != record["original_solution"]
    # the spoiled ones (a wrong answer, or none boxed) were dropped, by reason
    assert stats["dropped"].get("wrong_answer", 0) > 0
    assert stats["dropped"].get("no_boxed_answer", 0) > 0


def test_new_numbers_are_new_problems_whose_recomputed_answers_verify(tmp_path):
    """new_numbers: the same kind of problem with other numbers, the answer recomputed by the
    generator; the scripted teacher solves what it is asked, and its spoiled solves are dropped."""
    from data_synth import arith
    from data_synth.seeds import last_boxed

    records, stats = scripted_synth(
        tmp_path,
        "{source: arith, split: synth, count: 30}",
        "{rephrase_question: 0, rephrase_answer: 0, new_numbers: 2}",
    )
    assert {r["augmentation"] for r in records} == {"new_numbers"}
    assert 30 <= len(records) < 60  # ~30% of 60 solves spoiled: dropped by the verifier
    assert sum(stats["dropped"].values()) == 60 - len(records)
    changed_answers = 0
    for record in records:
        seed = arith.parse(record["original_question"])
        asked = arith.parse(record["question"])
        assert asked is not None and asked.kind == seed.kind and asked.numbers != seed.numbers
        # the gold answer is recomputed from the new numbers, and the kept solution reaches it
        assert record["gold"] == str(arith.KINDS[asked.kind].answer(*asked.numbers))
        assert check(record["gold"], record["answer"]) is None
        assert last_boxed(record["answer"]) == record["gold"]
        # a new problem of the seed's split: never an eval (or SFT train) problem
        assert asked.split == "synth"
        changed_answers += record["gold"] != last_boxed(record["original_solution"])
    assert changed_answers > len(records) / 2  # new data, not only new wording
