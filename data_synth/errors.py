"""data_synth's own errors: each names what is wrong and where (a file and line, a setting), in one line."""

from __future__ import annotations


class DataSynthError(Exception):
    """A mistake the user can fix: bad seed data, a teacher that cannot start, a missing key.

    `setting` is the settings path the mistake belongs to, relative to the synth settings
    (`seeds.0.path`, `teacher.api_key_env`), so a caller can say which of its keys brought it in.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class SynthFailed(DataSynthError):
    """A run that did not do its work: too many requests failed, or nothing survived
    verification. Every reply that did arrive is in the cache, so a rerun asks only the rest;
    `result` holds what this run got (its tally of failures among it)."""

    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result
