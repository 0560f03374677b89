"""The errors upstack prints as one line: a user's mistake (exit 2), or a stage that did not do its work (exit 1)."""

from __future__ import annotations

import re


class UserError(Exception):
    """Bad input: a recipe key, a file, a flag. The message names what is wrong and where."""

    exit_code = 2


class StageFailed(UserError):
    """A stage ran but did not do its work (a teacher that answered nothing, a disk that filled):
    the stage is marked failed, nothing of it counts as done, and a rerun resumes."""

    exit_code = 1


class Interrupted(StageFailed):
    """Ctrl-C or SIGTERM (a scheduler's preemption): the stage stopped, saving what it could; its
    state is `interrupted` and a rerun resumes."""

    exit_code = 130


# Shapes API keys and tokens take: a value like these is never echoed in an error or `show`.
SECRET = re.compile(
    r"^(sk-|hf_|ghp_|gho_|github_pat_|xox[abp]-|AKIA|AIza|glpat-)[\w-]{8,}$"
    r"|^(?=.*\d)(?=.*[A-Za-z])[\w-]{32,}$"  # a long unbroken run of letters and digits
)


def looks_like_secret(value: object) -> bool:
    return isinstance(value, str) and bool(SECRET.match(value.strip()))


# A setting that holds a secret (hub_token, api_key, password): its value is never echoed
# either. The word ends the key: "tokenizer", max_new_tokens, include_num_input_tokens_seen and
# api_key_env (the name of a variable, not the key) are no secrets.
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_?key)$", re.I)


def is_secret_key(key: object) -> bool:
    return bool(SECRET_KEY.search(str(key)))


REDACTED = "<redacted>"


def redact(value: object, key: object = "") -> object:
    """Settings as upstack shows them (`upstack show`, model cards): a value that looks like a
    token, or any value of a key named like one, becomes `<redacted>`; the rest is kept."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if value is not None and (looks_like_secret(value) or is_secret_key(key)):
        return REDACTED
    return value
