"""Errors the CLI reports as one line with exit code 2 (no traceback unless ``--debug``)."""


class UserError(Exception):
    """Bad input from the user: a config, a path, an argument. The message says what and where."""


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded; the message names the path and the reason."""
