"""eval stage: math-verify scoring, a real greedy run end to end, held-out loss, the report."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from conftest import run_cli, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_synth import arith
from data_synth.verify import grade as score
from upstack.core.recipe import load_recipe
from upstack.core.runner import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _accuracy(pairs) -> float:
    return sum(score(gold, prediction)[1] for gold, prediction in pairs) / len(pairs)


def test_scoring_gives_100_percent_to_right_answers_and_0_to_wrong_ones():
    problems = arith.problems(20, seed=3, split="eval")
    right = [(str(p.answer), p.solution) for p in problems]
    wrong = [
        (str(p.answer), p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}"))
        for p in problems
    ]
    assert _accuracy(right) == 1.0
    assert _accuracy(wrong) == 0.0
    # math-verify's equivalences, not string equality; no answer at all is wrong, not an error
    assert score("\\frac{3}{4}", "so it is \\boxed{0.75}") == ("0.75", True)
    assert score("1234", "#### 1,234")[1] is True
    assert score("7", "I do not know") == ("", False)
    # off the main thread (no SIGALRM there) it still scores
    results = []
    worker = threading.Thread(target=lambda: results.append(_accuracy(right[:5] + wrong[:5])))
    worker.start()
    worker.join()
    assert results == [0.5]


def test_eval_stage_generates_greedily_scores_and_reports(tmp_path, tiny_model):
    recipe_path = write_recipe(
        tmp_path,
        f"""\
        name: e
        output_dir: {tmp_path / "runs"}
        stages:
          eval:
            models: [{tiny_model}]
            math:
              problems: {{source: arith, split: eval, count: 12}}
              max_new_tokens: 16
              batch_size: 5
            loss: {{count: 20}}
        """,
    )
    run(load_recipe(recipe_path), ["eval"])
    out = tmp_path / "runs" / "eval"
    results = json.loads((out / "results.json").read_text())
    [row] = results["rows"]
    assert row["model"] == str(tiny_model) and row["math_total"] == 12
    # a random 1k-vocab model: loss near ln(vocab), and finite
    assert 4.0 < row["loss"] < 9.0 and math.isclose(
        row["perplexity"], math.exp(row["loss"]), rel_tol=1e-3
    )

    records = [json.loads(line) for line in next((out / "predictions").glob("*.jsonl")).open()]
    problems = arith.problems(12, seed=42, split="eval")
    assert [r["id"] for r in records] == [p.id for p in problems]
    assert {"id", "question", "gold", "prediction", "extracted", "correct"} <= records[0].keys()
    assert sum(r["correct"] for r in records) == row["math_correct"]

    # Batched, left-padded generation gives what the model says to each prompt alone.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for record in (records[0], records[7]):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": record["question"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.inference_mode():
            alone = model.generate(
                ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        assert (
            tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True)
            == record["prediction"]
        )

    assert (out / "eval.png").stat().st_size > 1000
    assert "math_accuracy" in (out / "report.md").read_text()

    result = run_cli("report", str(recipe_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "## Stages" in text and "| eval " in text and "math_accuracy" in text
    assert str(tiny_model) in text
    # The file is markdown (the plot embedded); the terminal shows the plot's path instead.
    written = (tmp_path / "runs" / "report.md").read_text()
    assert "![eval](eval-eval.png)" in written
    assert f"plot: {tmp_path / 'runs' / 'eval-eval.png'}" in text
    assert written.replace("![eval](eval-eval.png)", "") == text.replace(
        f"plot: {tmp_path / 'runs' / 'eval-eval.png'}", ""
    )
    assert (tmp_path / "runs" / "eval-eval.png").is_file()


def test_eval_without_a_model_fails_before_anything_runs(tmp_path):
    from upstack.core.errors import UserError

    path = write_recipe(tmp_path, "name: e\nstages:\n  eval: {}\n")
    with pytest.raises(UserError, match=r"recipe.yaml:3: stages.eval: list `models`"):
        load_recipe(path)
    path = write_recipe(
        tmp_path,
        f"name: e\noutput_dir: {tmp_path / 'runs'}\nstages:\n  synth:\n    seeds: [{{source: arith}}]\n"
        "    teacher: {kind: scripted}\n  eval: {after: [synth]}\n",
    )
    # found at load, before any stage could run
    with pytest.raises(UserError, match=r"recipe.yaml:7: stages.eval.after: none of \['synth'\]"):
        load_recipe(path)
    assert not (tmp_path / "runs").exists()


LM_EVAL_TASK = """\
task: upstack_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_task_from_a_local_yaml_scores_like_our_own_loglikelihoods(tmp_path, tiny_model):
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    problems = arith.problems(8, seed=5, split="eval")
    docs = [
        {"question": p.question, "choices": [str(p.answer), str(p.answer + 3)], "label": 0}
        for p in problems
    ]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "toy.jsonl"))
    recipe_path = write_recipe(
        tmp_path,
        f"""\
        name: e
        output_dir: {tmp_path / "runs"}
        stages:
          eval:
            models: [{tiny_model}]
            math: null
            loss: null
            lm_eval: {{tasks: [upstack_toy], num_fewshot: {{upstack_toy: 0}}, include_path: {tasks},
                      batch_size: 4}}
        """,
    )
    run(load_recipe(recipe_path), ["eval"])
    [row] = json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())["rows"]

    # lm-eval's multiple choice: the choice whose continuation " <choice>" is most likely wins
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    def loglikelihood(context: str, continuation: str) -> float:
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
        with torch.inference_mode():
            logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))

    right = [
        max(range(2), key=lambda c, d=d: loglikelihood(d["question"], " " + d["choices"][c])) == 0
        for d in docs
    ]
    assert row["upstack_toy/acc"] == round(sum(right) / len(docs), 4)
