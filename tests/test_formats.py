"""The data formats users bring, read the way they are meant: every SFT and preference format the
ecosystem writes becomes the same conversations, a structure never becomes its string, and a row
of no format is refused naming its row."""

from __future__ import annotations

import json

import pytest

from upstack.core.context import StageContext
from upstack.core.errors import UserError
from upstack.core.recipe import Recipe
from upstack.train.data import Source, build_mixture

ANSWER = [{"role": "assistant", "content": "2 + 2 = \\boxed{4}"}]
WRONG = [{"role": "assistant", "content": "2 + 2 = \\boxed{5}"}]
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


def _ctx(tmp_path):
    recipe = Recipe(name="r", seed=3, output_dir=str(tmp_path / "runs"), stages={})
    recipe.source = "r.yaml"
    return StageContext(recipe, "sft", tmp_path / "out", tmp_path / "work", "test")


def _rows(tmp_path, fmt, rows, **source):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _ = build_mixture([Source(path=str(path), **source)], fmt, _ctx(tmp_path))
    return list(train)


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [*QUESTION, *ANSWER]},  # OpenAI
        {
            "conversations": [
                {"from": "human", "value": "What is 2 + 2?"},
                {"from": "gpt", "value": ANSWER[0]["content"]},
            ]
        },  # ShareGPT
        {"instruction": "What is 2 + 2?", "input": "", "output": ANSWER[0]["content"]},  # Alpaca
        {"prompt": "What is 2 + 2?", "completion": ANSWER[0]["content"]},  # TRL prompt-completion
        {"prompt": QUESTION, "completion": ANSWER},  # TRL conversational prompt-completion
        {  # OpenAI content parts
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": ANSWER[0]["content"]}]},
            ]
        },
    ],
    ids=["openai", "sharegpt", "alpaca", "prompt-completion", "conversational", "parts"],
)
def test_every_sft_format_becomes_the_same_conversation(tmp_path, row):
    assert _rows(tmp_path, "sft", [row]) == [{"messages": [*QUESTION, *ANSWER]}]


def test_alpaca_input_follows_the_instruction_and_a_system_column_comes_first(tmp_path):
    row = {"instruction": "Add.", "input": "2 and 2", "output": "4", "system": "Be brief."}
    assert _rows(tmp_path, "sft", [row])[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add.\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ]


@pytest.mark.parametrize(
    "row",
    [
        {
            "prompt": "What is 2 + 2?",
            "chosen": ANSWER[0]["content"],
            "rejected": WRONG[0]["content"],
        },
        {"prompt": QUESTION, "chosen": ANSWER, "rejected": WRONG},  # conversational
        # axolotl's chat_template.default: chosen/rejected one message object each
        {"prompt": QUESTION, "chosen": ANSWER[0], "rejected": WRONG[0]},
        {"prompt": "What is 2 + 2?", "chosen": ANSWER[0], "rejected": WRONG[0]},
        # TRL's implicit prompt: whole conversations sharing the prompt turn
        {"chosen": [*QUESTION, *ANSWER], "rejected": [*QUESTION, *WRONG]},
        # UltraFeedback: a prompt and conversations repeating it
        {
            "prompt": "What is 2 + 2?",
            "chosen": [*QUESTION, *ANSWER],
            "rejected": [*QUESTION, *WRONG],
        },
    ],
    ids=[
        "standard",
        "conversational",
        "one-message",
        "text-prompt-one-message",
        "implicit",
        "ultrafeedback",
    ],
)
def test_every_preference_format_becomes_the_same_pair(tmp_path, row):
    (pair,) = _rows(tmp_path, "preference", [row])
    assert pair == {"prompt": QUESTION, "chosen": ANSWER, "rejected": WRONG}


def test_a_message_object_is_never_stringified(tmp_path):
    """The reported case: a chosen that is one message object was trained on as the text
    "{'role': 'assistant', 'content': ...}"."""
    (pair,) = _rows(
        tmp_path, "preference", [{"prompt": "q", "chosen": ANSWER[0], "rejected": WRONG[0]}]
    )
    assert all("'role'" not in m["content"] for m in pair["chosen"] + pair["rejected"])


@pytest.mark.parametrize(
    "fmt, rows, expected",
    [
        (
            "sft",
            [{"messages": [*QUESTION, *ANSWER]}, {"messages": "just text"}],
            "row 2: messages is text: expected a list of messages",
        ),
        (
            "sft",
            [{"conversations": [{"from": "narrator", "value": "Once"}]}],
            "row 1: conversations[0] has role 'narrator'",
        ),
        (
            "sft",
            [
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}
                    ]
                }
            ],
            "messages[0].content has image_url parts: text only",
        ),
        (
            "preference",
            [{"prompt": "q", "chosen": 4, "rejected": "5"}],
            "row 1: chosen is a number: expected text, a message {role, content} or a list",
        ),
        (
            "preference",
            [{"chosen": ANSWER, "rejected": WRONG}],
            "row 1: has no prompt, and chosen and rejected share no turn",
        ),
    ],
    ids=["not-a-list", "unknown-role", "image-part", "number", "no-prompt"],
)
def test_a_row_of_no_format_is_refused_naming_its_row(tmp_path, fmt, rows, expected):
    with pytest.raises(UserError) as err:
        _rows(tmp_path, fmt, rows)
    line = str(err.value)
    assert "stages.sft.datasets.0:" in line and "data.jsonl " in line and expected in line, line
    assert "(formats: " in line


def test_a_source_in_no_format_is_refused_before_reading_it(tmp_path):
    with pytest.raises(
        UserError,
        match=r"missing column 'messages' for sft data \(has: question, answer\) \(formats: messages",
    ):
        _rows(tmp_path, "sft", [{"question": "q", "answer": "a"}])
