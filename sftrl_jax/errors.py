"""Errors a user can cause. Commands catch `UserError` and print its message without a traceback."""


class UserError(ValueError):
    """Bad user input (a file, key, shape or value); the message names what is wrong."""
