"""Values from strangers, shown to an operator: plain text, never markup, never a live escape.

Whoever answers a probe writes the stored responses, and whoever can publish writes dead letters.
The tools print those values as data: rich tables get `Text` cells (markup and emoji codes are not
parsed), control characters (C0, DEL, C1: ESC and CSI sequences, OSC 8 links, OSC 52 clipboard
writes) and the line and bidirectional-override characters are shown as escapes, and a CSV cell a
spreadsheet would evaluate as a formula is prefixed with a quote. `--json` output needs none of
this: `json.dumps` escapes every control character and keeps the value exact.
"""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text

# C0 (tab and newline too: a cell is one line), DEL, C1, the Unicode line and paragraph
# separators, and the bidirectional embeddings, overrides and isolates ("Trojan Source").
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What a spreadsheet reads as the start of a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def escape_controls(text: str) -> str:
    """`text` with every unsafe character written as an escape (`\\x1b`, `\\n`, `\\u202e`)."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def cell(value: Any) -> Text:
    """A table cell (or title) that shows `value` as it is: no markup, no escape sequence."""
    return Text(escape_controls(str(value)))


def csv_cell(value: Any) -> Any:
    """A CSV value a spreadsheet shows rather than evaluates; non-text values unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
