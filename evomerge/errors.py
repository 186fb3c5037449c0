"""The one base of every error a user can cause (a bad file, field, model, database or machine), and the rule that
keeps its message short.

The CLI catches `EvomergeError` alone and prints its message with exit code 2; anything else that escapes is a bug
and is reported as one.  Each subclass also derives from the built-in it always was (ValueError), so callers that
caught that keep working.
"""
from __future__ import annotations


class EvomergeError(Exception):
    """Bad input or environment, worded for the user: the message names the file and field (or flag) to change."""


MAX_MESSAGE = 400  # characters of one value or path in a message


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut in the middle past `limit` characters: a message must never render a huge value or path."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}…({len(text) - limit} characters cut)…{text[-limit // 4:]}"
