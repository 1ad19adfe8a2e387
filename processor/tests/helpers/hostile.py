"""Values a stranger can put in a probe's answer or a dead letter, aimed at an operator's tools."""

from __future__ import annotations

import re

# Rich markup (an unbalanced closing tag made `services` and `dlq list` crash with MarkupError; a
# link tag became a live hyperlink), an emoji code, a screen clear, an OSC 52 clipboard write, an
# OSC 8 hyperlink, a C1 CSI, a right-to-left override, DEL, a carriage return and a newline.
HOSTILE = (
    "[/x] [link=https://evil.example]click[/link] [bold red]red[/] :skull: "
    "\x1b[2J\x1b]52;c;ZXZpbA==\x07 \x1b]8;;https://evil.example\x1b\\x\x1b]8;;\x1b\\ "
    "\x9b31m \u202e\x7f\r\n"
)
FORMULA = '=HYPERLINK("https://evil.example","x")'
# Any C0 control but the newline that ends a line, DEL, C1, and the right-to-left override.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]")


def assert_inert(out: str) -> None:
    """No raw control character and no traceback in a command's output."""
    assert not RAW_CONTROL.search(out), repr(out)
    assert "Traceback" not in out
