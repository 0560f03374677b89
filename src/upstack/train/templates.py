"""Chat templates: by name (the common ones, with `{% generation %}` marks around what the
assistant says), by file (relative to the recipe), or inline; and the loss mask of a template
without marks, computed by rendering, so every assistant turn is trained, not only the last."""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
# name -> the tokens the template writes that must be single tokens of the tokenizer (its turn
# markers); the first is the end of an assistant turn, what generation must stop at
NAMED: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "llama3": ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    "zephyr": (),  # its turns end with the tokenizer's own eos
    "mistral": (),  # [INST] ... [/INST] as text, turns end with eos
    "gemma": ("<end_of_turn>", "<start_of_turn>"),
    "phi3": ("<|end|>", "<|assistant|>", "<|user|>"),
}


def is_inline(value: str) -> bool:
    return "{%" in value or "{{" in value


def resolve_path(value: str, recipe_dir: Path) -> Path:
    """A template file named in a recipe: relative to the recipe's directory, like its other
    files; `~` expanded."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else recipe_dir / path


def problem(value: str, recipe_dir: Path) -> str | None:
    """What is wrong with a `chat_template:` value, at load: a name upstack does not know, a file
    that is not there."""
    if value in NAMED or is_inline(value):
        return None
    if value.endswith((".jinja", ".j2", ".txt")) or "/" in value:
        path = resolve_path(value, recipe_dir)
        return None if path.is_file() else f"{path}: no such template file"
    return (
        f"'{value}' is no chat template upstack knows (names: {', '.join(NAMED)}), nor a "
        ".jinja file, nor a Jinja string"
    )


def text(value: str, recipe_dir: Path) -> str:
    """The template itself."""
    if value in NAMED:
        return (TEMPLATES / f"{value}.jinja").read_text()
    if is_inline(value):
        return value
    return resolve_path(value, recipe_dir).read_text()


def missing_tokens(value: str, tokenizer) -> list[str]:
    """The turn markers of a named template that the tokenizer does not hold as single tokens:
    rendered, they would be split into pieces, and generation would never stop at the end of a
    turn."""
    vocab = tokenizer.get_vocab()
    return [token for token in NAMED.get(value, ()) if token not in vocab]


def end_of_turn(value: str) -> str | None:
    markers = NAMED.get(value, ())
    return markers[0] if markers else None


# --------------------------------------------------------------------------- loss masks


class PrefixError(ValueError):
    """The template renders a conversation's beginning differently from the whole (a template
    that rewrites earlier turns): assistant turns cannot be found by rendering."""


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered, and the character spans of what each assistant turn adds: the
    text between the conversation up to the turn rendered with the generation prompt and the
    conversation through the turn. Exact for any template whose renderings of a conversation's
    beginnings are beginnings of its rendering, which is checked."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (
            full.startswith(before) and full.startswith(through) and len(through) > len(before)
        ):
            raise PrefixError(f"turn {i}")
        spans.append((len(before), len(through)))
    return full, spans


def masked(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    """input_ids and assistant_masks (1: an assistant token, trained) of a conversation, for
    TRL's SFTTrainer, which builds its labels from assistant_masks."""
    full, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(start <= begin < end for start, end in spans))
        for begin, _ in encoded["offset_mapping"]
    ]
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}
