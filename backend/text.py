"""Checks of short text that other people read, such as worker names and usernames."""

from __future__ import annotations

import unicodedata

# Unicode categories whose characters print as nothing or change how the text around them
# reads: controls (Cc, such as a newline), formats (Cf, such as U+200B ZERO WIDTH SPACE and
# U+202E RIGHT-TO-LEFT OVERRIDE), lone surrogates (Cs), and the line and paragraph separators
# (Zl, Zp). A name with them can show one thing to a resident and hold another.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def has_hidden_characters(text: str) -> bool:
    return any(unicodedata.category(character) in HIDDEN_CATEGORIES for character in text)
