"""Scrub personal data and secrets from text before it becomes training data.

What is found is replaced by a placeholder naming its kind (``[EMAIL]``, ``[PHONE]``, ``[KEY]``,
``[CARD]``, ``[IP]``) and counted; the matched text itself is never returned, logged or stored.
Patterns, most specific first (a key is not then re-read as a phone number):

- keys: well-known secret prefixes (OpenAI ``sk-``, GitHub ``ghp_``/``gho_``/``github_pat_``, AWS
  ``AKIA``, Slack ``xox?-``, Google ``AIza``, Hugging Face ``hf_``, Stripe ``sk_live_``), PEM private key
  blocks, bearer tokens, and ``key = value`` / ``token: value`` assignments of 16+ secret-looking chars;
- e-mail addresses;
- payment card numbers: 13-19 digits (spaces or dashes allowed) passing the Luhn check;
- phone numbers: an optional +country code and 9-15 digits in the usual groupings;
- IPv4 addresses.

This is a regex scrubber (like most pipelines' first pass): it misses names and addresses written in
prose. Use a NER-based tool (e.g. Presidio) in front of it when the data may hold those.
"""

from __future__ import annotations

import re
from collections import Counter

_KEY_PREFIXES = (
    r"sk-(?:proj-)?[A-Za-z0-9_-]{16,}",
    r"sk_live_[A-Za-z0-9]{16,}",
    r"gh[pousr]_[A-Za-z0-9]{20,}",
    r"github_pat_[A-Za-z0-9_]{20,}",
    r"AKIA[0-9A-Z]{16}",
    r"xox[abprs]-[A-Za-z0-9-]{10,}",
    r"AIza[0-9A-Za-z_-]{35}",
    r"hf_[A-Za-z0-9]{20,}",
)
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("KEY", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)),
    ("KEY", re.compile(r"\b(?:" + "|".join(_KEY_PREFIXES) + r")")),
    ("KEY", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{16,}=*")),
    # key = value: the name is kept, the value goes (group "secret")
    (
        "KEY",
        re.compile(
            r"(?i)\b(?:api[_-]?key|secret|token|password|passwd)[\"']?\s{0,3}[:=]\s{0,3}[\"']?"
            r"(?P<secret>[A-Za-z0-9._~+/!@#$%^&*-]{12,})"
        ),
    ),
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("CARD", re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")),
    (
        "PHONE",
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])"
        ),
    ),
    ("PHONE", re.compile(r"(?<![\w+])\+\d{9,15}(?!\w)")),
    ("IP", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")),
]


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a card number (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _phone_like(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 9 <= len(digits) <= 15


def scrub(text: str, counts: Counter | None = None) -> tuple[str, Counter]:
    """(text with every find replaced by ``[KIND]``, counts per kind). Pass ``counts`` to add to it."""
    counts = Counter() if counts is None else counts
    for kind, pattern in PATTERNS:

        def replace(m: re.Match, kind=kind) -> str:
            found = m.group(0)
            if kind == "CARD" and not luhn_ok(re.sub(r"\D", "", found)):
                return found
            if kind == "PHONE" and not _phone_like(found):
                return found
            counts[kind] += 1
            if "secret" in m.re.groupindex:
                start, end = m.span("secret")
                return found[: start - m.start()] + f"[{kind}]" + found[end - m.start() :]
            return f"[{kind}]"

        text = pattern.sub(replace, text)
    return text, counts
