"""The output contract of every annotation backend: a short list of noun phrases.

VLMs answer in almost-JSON (code fences, prose around the list, single quotes, trailing
commas); :func:`parse_components` repairs what can be repaired and says whether it had to, and
:func:`validate_components` enforces the contract: 1..K items, each a short noun phrase
(at most N words), deduplicated, never about the picture itself ("the image", "front view",
"camera"). The validation error text is what a backend sends back to the model on a retry.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

_FENCE = re.compile(r"```(?:json|JSON|python)?\s*(.*?)```", re.S)
_FORBIDDEN = re.compile(
    r"\b(image|images|picture|photo|render(?:ing)?|front view|back view|rear view|view|camera|viewpoint|shown|visible)\b",
    re.I,
)


class AnnotationError(ValueError):
    """The output does not satisfy the contract; the message is fed back to the model."""


@dataclass(frozen=True, slots=True)
class Parsed:
    components: list[str]
    repaired: bool


def _load_list(text: str) -> tuple[list | None, bool]:
    """(list, strict): strict when it was plain JSON, not a Python-literal repair."""
    for strict, loader in ((True, json.loads), (False, ast.literal_eval)):
        try:
            value = loader(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):  # {"components": [...]}
            value = next((v for v in value.values() if isinstance(v, list)), None)
        if isinstance(value, (list, tuple)):
            return list(value), strict
    return None, False


def parse_components(raw: str, max_chars: int = 20_000) -> Parsed:
    """Extract a list of strings from a model's answer, repairing almost-JSON."""
    text = raw.strip()[:max_chars]
    value, strict = _load_list(text)
    if value is not None:
        return Parsed(_strings(value), repaired=not strict)
    candidates = [m.group(1).strip() for m in _FENCE.finditer(text)]
    start, end = text.find("["), text.rfind("]")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        cleaned = re.sub(r",\s*([\]}])", r"\1", candidate)  # trailing commas
        value, _ = _load_list(cleaned)
        if value is not None:
            return Parsed(_strings(value), repaired=True)
    raise AnnotationError('the answer must be a JSON list of strings, e.g. ["a curved handle"]')


def _strings(value: list) -> list[str]:
    if not all(isinstance(v, str) for v in value):
        raise AnnotationError("every item of the list must be a string")
    return list(value)


def validate_components(items: list[str], max_items: int, max_words: int) -> list[str]:
    """Normalize (whitespace, case-insensitive dedupe, trailing punctuation) and check."""
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        phrase = re.sub(r"\s+", " ", item).strip().strip(".;:,!").strip()
        if not phrase:
            continue
        key = phrase.casefold()
        if key in seen:
            continue
        seen.add(key)
        if len(phrase.split()) > max_words:
            raise AnnotationError(f"'{phrase}' has {len(phrase.split())} words; use at most {max_words} words")
        if _FORBIDDEN.search(phrase):
            raise AnnotationError(f"'{phrase}' talks about the picture; describe only parts of the object itself")
        out.append(phrase)
    if not out:
        raise AnnotationError("the list is empty; name at least one component")
    if len(out) > max_items:
        raise AnnotationError(f"{len(out)} items; give at most {max_items}")
    return out


# --------------------------------------------------------------------------- the ask-again loop
# Shared by the VLM backends: the same checks, the same follow-up message, the same records.


def check_answer(raw: str, max_items: int, max_words: int) -> Parsed:
    """Parse and validate one answer; raises AnnotationError with the text to send back."""
    parsed = parse_components(raw)
    return Parsed(validate_components(parsed.components, max_items, max_words), parsed.repaired)


def ask_again(raw: str, error: AnnotationError) -> list[dict]:
    """Chat turns appended to a conversation whose answer failed validation."""
    return [
        {"role": "assistant", "content": raw},
        {"role": "user", "content": f"That answer is invalid: {error}. Answer again with only the JSON list."},
    ]


def success_record(parsed: Parsed, attempt: int, raw: str, tokens: int) -> dict:
    return {
        "components": parsed.components,
        "status": "repaired" if parsed.repaired or attempt else "ok",
        "attempts": attempt + 1,
        "completion_tokens": tokens,
        **({"raw": raw[:2000]} if parsed.repaired else {}),
    }


def failure_record(error: str, raw: str, attempts: int, tokens: int) -> dict:
    """The pair keeps an empty list (unconditional training still uses it) and the raw answer."""
    return {
        "components": [],
        "status": "annotation_failed",
        "error": error[:500],
        "raw": raw[:2000],
        "attempts": attempts,
        "completion_tokens": tokens,
    }
