"""The one base of every error a user can cause (a bad file, field, model, database or machine).

The CLI catches `EvomergeError` alone and prints its message with exit code 2; anything else that escapes is a bug
and is reported as one.  Each subclass also derives from the built-in it always was (ValueError), so callers that
caught that keep working.
"""
from __future__ import annotations


class EvomergeError(Exception):
    """Bad input or environment, worded for the user: the message names the file and field (or flag) to change."""
