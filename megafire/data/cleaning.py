"""Text clean-up shared by the corpus builders (data_prep/): line endings, Gutenberg boilerplate.

Only what damages training is removed; the text is otherwise kept byte-for-byte (the
tokenizer is lossless, so whitespace and layout are part of what the model learns).
"""
from __future__ import annotations

import re

# Modern Gutenberg files bracket the work between these markers; everything outside is licence.
_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
# 1990s files put the licence ("small print") first and end it with this line.
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.I | re.M)
# ... and often close with a one-line trailer.
_TRAILER = re.compile(r"^\s*(\*+\s*)?End of (the )?Project Gutenberg.*\Z", re.I | re.M | re.S)


def decode_text(raw: bytes) -> str:
    """UTF-8 (BOM dropped) or, failing that, Latin-1: old Gutenberg files are either."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.removeprefix("\ufeff")


def normalize_layout(text: str) -> str:
    """LF line endings, no trailing spaces on lines, no leading/trailing blank lines.

    Mixed CRLF/LF and trailing blanks are artefacts of the files' history, not of the works;
    leaving them in would spend tokens on noise that differs between editions.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip("\n") + "\n"


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg licence headers/footers, keeping the work itself.

    Handles the modern ``*** START/END OF THE PROJECT GUTENBERG EBOOK`` markers, the older
    ``*END*THE SMALL PRINT!`` header and the ``End of Project Gutenberg's ...`` trailer.
    Text without any of these is returned unchanged.
    """
    start = _START.search(text)
    if start:
        text = text[start.end():]
    else:
        small = _SMALL_PRINT_END.search(text)
        if small:
            text = text[small.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    trailer = _TRAILER.search(text)
    if trailer:
        text = text[:trailer.start()]
    return text
