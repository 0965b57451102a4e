"""What counts as a secret, decided in one place for job scripts, manifests and logs.

A variable is secret when its name says so: it contains TOKEN, SECRET, PASSW or CREDENTIAL, or KEY as a
word of its own (HF_KEY, AWS_ACCESS_KEY_ID, WANDB_API_KEY). Secrets reach a job only through the
environment sbatch passes on from the submitting shell; nothing the launcher or the trainer writes holds
their values.
"""

from __future__ import annotations

import re
from typing import Any

_SECRET_NAME = re.compile(r"(?i)(token|secret|passw|credential|(^|_)[a-z0-9]*keys?(_|$))")
# NAME=value inside a string (a profile's setup line, a command line): the value of a secret NAME is redacted.
_ASSIGNMENT = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|'[^']*'|\S+)")
REDACTED = "<redacted>"


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name)))


def redact(value: Any) -> Any:
    """A copy with the values of secret-named keys, and of secret NAME=value assignments in strings, replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_name(k) and isinstance(v, str) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _ASSIGNMENT.sub(
            lambda m: f"{m.group(1)}={REDACTED}" if is_secret_name(m.group(1)) else m.group(0), value
        )
    return value
