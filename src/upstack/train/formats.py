"""The data formats the ecosystem writes for SFT and preference training, read the way they mean,
into the one shape the training stages use: conversations (`messages`) and conversational
prompt/chosen/rejected. A row of no known format, or a value of a type a format does not take,
is refused naming its row; nothing is ever turned into the string of a structure.

SFT rows, after a source's `columns` renames:
  messages                       OpenAI: [{role, content}], content text or text parts
  conversations                  ShareGPT: [{from: human|gpt|system, value}]
  instruction, output [, input]  Alpaca: the input, when given, follows the instruction
  prompt, completion             text or messages (TRL's prompt-completion, conversational too)
  and an optional `system` column, placed first.
Preference rows:
  chosen, rejected               each text, one message {role, content}, or a list of them
  prompt                         text, one message or a list; left out (TRL's implicit prompt),
                                 it is what chosen and rejected share before their replies
  and an optional `system` column.
"""

from __future__ import annotations

from typing import Any

SFT_FORMATS = (
    "messages [{role, content}]",
    "conversations [{from, value}] (ShareGPT)",
    "instruction/input/output (Alpaca)",
    "prompt/completion",
)
PREFERENCE_FORMATS = (
    "prompt/chosen/rejected, each text, a message {role, content} or a list of messages",
    "chosen/rejected conversations sharing their prompt turns",
)
# ShareGPT's speakers and the roles chat templates know
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
}


class RowError(ValueError):
    """A row whose shape no format takes; the message says what is wrong with it."""


def sft_format(columns: set[str]) -> str | None:
    """Which SFT format a source with these columns is in, or None."""
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    return None


def preference_format(columns: set[str]) -> str | None:
    if {"chosen", "rejected"} <= columns:
        return "explicit" if "prompt" in columns else "implicit"
    return None


def sft_columns(fmt: str) -> tuple[str, ...]:
    """The columns a row of `fmt` is read from."""
    return {
        "messages": ("messages",),
        "sharegpt": ("conversations",),
        "alpaca": ("instruction", "output"),
        "prompt-completion": ("prompt", "completion"),
    }[fmt]


# --------------------------------------------------------------------------- rows


def to_messages(row: dict, fmt: str) -> list[dict[str, str]]:
    """An SFT row as a conversation."""
    if fmt == "messages":
        messages = as_messages(row["messages"], "messages")
    elif fmt == "sharegpt":
        messages = as_messages(row["conversations"], "conversations")
    elif fmt == "alpaca":
        instruction = as_text(row["instruction"], "instruction")
        extra = as_text(row.get("input") or "", "input")
        question = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": as_text(row["output"], "output")},
        ]
    else:
        messages = [
            *as_turns(row["prompt"], "prompt", "user"),
            *as_turns(row["completion"], "completion", "assistant"),
        ]
    return with_system(messages, row.get("system"))


def to_preference(row: dict) -> dict[str, list[dict[str, str]]]:
    """A preference row as conversational prompt/chosen/rejected: the replies alone in chosen
    and rejected (UltraFeedback's repeat the prompt turns; TRL's implicit format has no prompt)."""
    chosen = as_turns(row["chosen"], "chosen", "assistant")
    rejected = as_turns(row["rejected"], "rejected", "assistant")
    if row.get("prompt") is not None:
        prompt = as_turns(row["prompt"], "prompt", "user")
    else:  # implicit: the turns both share before the last reply
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt = chosen[:shared]
        if not prompt:
            raise RowError("has no prompt, and chosen and rejected share no turn to take it from")
    chosen, rejected = _replies(chosen, prompt), _replies(rejected, prompt)
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply:
            raise RowError(f"{name} has no reply after its prompt")
    return {
        "prompt": with_system(prompt, row.get("system")),
        "chosen": chosen,
        "rejected": rejected,
    }


def _replies(turns: list[dict], prompt: list[dict]) -> list[dict]:
    """The turns after the last non-assistant one (chosen may repeat the prompt before them)."""
    last = max((i for i, m in enumerate(turns) if m["role"] != "assistant"), default=-1)
    return turns[last + 1 :]


# --------------------------------------------------------------------------- values


def as_turns(value: Any, key: str, role: str) -> list[dict[str, str]]:
    """Text (one turn of `role`), one message, or a list of messages, as messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return as_messages([value], key)
    if isinstance(value, list):
        return as_messages(value, key)
    raise RowError(f"{key} is {_kind(value)}: expected text, a message {{role, content}} or a list")


def as_messages(value: Any, key: str) -> list[dict[str, str]]:
    """A list of messages ({role, content} or ShareGPT's {from, value}) as {role, content}."""
    if not isinstance(value, list) or not value:
        raise RowError(f"{key} is {_kind(value)}: expected a list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{key}[{i}] is {_kind(message)}: expected a message {{role, content}}")
        speaker = message.get("role", message.get("from"))
        text = message["content"] if "content" in message else message.get("value")
        role = ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            known = ", ".join(sorted(ROLES))
            raise RowError(f"{key}[{i}] has role {speaker!r} (known: {known})")
        out.append({"role": role, "content": as_text(text, f"{key}[{i}].content")})
    return out


def as_text(value: Any, key: str) -> str:
    """Text, or OpenAI's content parts when they are all text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {p.get("type") for p in value}
        if kinds <= {"text"}:
            return "".join(str(p.get("text", "")) for p in value)
        raise RowError(
            f"{key} has {', '.join(sorted(map(str, kinds - {'text'})))} parts: text only"
        )
    raise RowError(f"{key} is {_kind(value)}: expected text")


def with_system(messages: list[dict], system: Any) -> list[dict]:
    if system in (None, "") or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": as_text(system, "system")}, *messages]


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    kinds = {dict: "a mapping", list: "a list", str: "text", bool: "a boolean"}
    kinds |= {int: "a number", float: "a number"}
    return kinds.get(type(value), f"a {type(value).__name__}")
