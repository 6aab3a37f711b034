"""The one exception type that reaches users.

A DarwinLMError carries a single line that names the problem and how to fix it. The CLI prints it as is and
exits non-zero; anything else escaping is a bug and keeps its traceback.
"""


class DarwinLMError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem} — {fix}"
        super().__init__(" ".join(message.split()))  # one line, whatever the caller wrote
