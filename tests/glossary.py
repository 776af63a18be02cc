"""The metric-key glossary of docs/run-dir.md as the tests read it: `code` spans are keys, and a
`<name>` inside one stands for any one path segment (`engine/<role>/requests`)."""

from __future__ import annotations

import re


def documented_keys(text: str) -> tuple[set[str], list[re.Pattern]]:
    """Every `code` span of the doc: literal keys, and `<name>` placeholders as patterns."""
    spans = set(re.findall(r"`([^`\n]+)`", text))
    literal = {s for s in spans if "<" not in s}
    patterns = [
        re.compile(
            "^" + re.sub(r"\\<[^>]+\\>", "[^/]+", re.escape(s).replace("<", "\\<").replace(">", "\\>")) + "$"
        )
        for s in spans
        if "<" in s
    ]
    return literal, patterns


def undocumented(keys: set[str], text: str) -> list[str]:
    literal, patterns = documented_keys(text)
    return sorted(k for k in keys if k not in literal and not any(p.match(k) for p in patterns))
