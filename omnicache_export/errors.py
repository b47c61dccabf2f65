"""The one error type a user sees: a bad input, named in one line (the CLI exits with status 2)."""


class UserError(Exception):
    """Bad input from the user: the message names the problem in one line."""
