"""The one exception type for mistakes a user can fix: printed as one line, exit code 2."""


class UserError(Exception):
    """Bad input: a recipe key, a file, a flag. The message names what is wrong and where."""

    exit_code = 2
