"""The one error type users see: a message that names the problem and the fix (CLI exit code 2)."""


class JacgraphError(Exception):
    """Bad input or an unsupported model. str(e) is the one-paragraph message shown to the user."""
