"""The one error shape for bad input: which field, what value, and why.

IntentError (intents), ConfigError (configuration) and HintError (what the
CLI and the hint wrapper read) are this class under the name their callers
catch; each message reads `field: 'value' why`.
"""
from __future__ import annotations

from typing import Any


class FieldError(ValueError):
    """A bad value. `field` names where it was, `value` is what was given,
    `why` says what is wrong with it (e.g. "is not a size")."""

    def __init__(self, field: str, value: Any, why: str):
        self.field = field
        self.value = value
        self.why = why
        super().__init__(f"{field}: {value!r} {why}")
