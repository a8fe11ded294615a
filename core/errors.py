"""Plain-text reasons for failures caused by untrusted input."""

from __future__ import annotations

import json
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_QUOTES = "'\"`"
_PATHLIKE = re.compile(r"\S*[:/\\%]\S+")  # URIs, paths, data: payloads glued to their scheme
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def describe_exception(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` in plain text for a manifest reason, without the asset's content.

    Parser messages often quote the offending text (``could not convert string to float:
    'secret'``) or name a file (``FileNotFoundError: data:...``); an asset may be anything. So:
    OS errors keep their errno text only; JSON errors keep line and column; other messages are cut
    at the first quote or backtick, path- and URI-like tokens and memory addresses are replaced by
    ``…``, and control characters and ANSI colours are removed."""
    if isinstance(exc, json.JSONDecodeError):
        message = f"invalid JSON at line {exc.lineno} column {exc.colno}"
    elif isinstance(exc, OSError):
        message = exc.strerror or ""
    else:
        message = _ANSI.sub("", str(exc))
        cut = min((i for i in (message.find(q) for q in _QUOTES) if i >= 0), default=-1)
        if cut >= 0:
            message = message[:cut] + "'…'"
        message = _ADDRESS.sub("0x…", _PATHLIKE.sub("…", message))
    message = " ".join("".join(ch if ch.isprintable() else " " for ch in message).split())
    if len(message) > limit:
        message = message[: limit - 1] + "…"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
