"""Shared plumbing for the algorithm scripts: model loading, batched generation, grading, data.

Nothing in here knows about advantages, critics or losses: that is the algorithm scripts' business.
"""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if the message is empty), for the
    one-line errors every script ends with."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
