"""Text from a command line (``KEY=VALUE``) to a value typed like the parameter's default.

Shared by ``hvm run --engine-option`` (engine options) and ``hvm lab run --set`` (experiment
parameters), so a flag, a number or a list is read the same way in both places.
"""

from __future__ import annotations

import json
from typing import Any

TRUE = ("1", "on", "yes", "true")
FALSE = ("0", "off", "no", "false")


def list_value(text: str) -> list:
    """A list: JSON (``[[4, 4096]]``) or comma-separated values (``4,5`` or ``32,pae``)."""
    for candidate in (text, f"[{text}]"):
        try:
            parsed = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, list):
            return parsed
    return [v.strip() for v in text.split(",") if v.strip()]


def typed_value(text: str, default: Any) -> Any:
    """``text`` as the type of ``default``: a flag (on/off, yes/no, true/false, 1/0), a number, a
    list (its elements typed like the default's numbers) or a string (also for a default of None).
    Raises ValueError when ``text`` is not of that type."""
    if isinstance(default, bool):
        if text.lower() not in TRUE + FALSE:
            raise ValueError(text)
        return text.lower() in TRUE
    if isinstance(default, list):
        items = list_value(text)
        kinds = {type(v) for v in default}
        if len(kinds) == 1 and kinds <= {int, float}:
            kind = kinds.pop()
            items = [kind(v) for v in items]
        return items
    if isinstance(default, (int, float)):
        return type(default)(text)
    return text
