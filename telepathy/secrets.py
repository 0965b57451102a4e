"""What counts as a secret, decided in one place for job scripts, manifests, plans and logs.

A name is secret when one of its words (split at `_`, `-`, `.` and camelCase) says so:
- ends in TOKEN: HF_TOKEN, HUGGING_FACE_HUB_TOKEN, GITHUB_TOKEN, AWS_SESSION_TOKEN, hfToken;
  not TOKENIZERS_PARALLELISM or MAX_NEW_TOKENS (TOKENIZERS and TOKENS count tokens, they hold none);
- contains SECRET: AWS_SECRET_ACCESS_KEY, CLIENT_SECRET;
- is KEY, KEYS or APIKEY: HF_KEY, WANDB_API_KEY, AWS_ACCESS_KEY_ID, apiKey; not MONKEY or KEYBOARD_LAYOUT;
- is PASS or starts with PASSW / PASSPHRASE: DB_PASS, MY_PASSWORD, MYSQL_PASSWD; not PATH, PWD (a folder);
- starts with CREDENTIAL: GOOGLE_APPLICATION_CREDENTIALS (a path; redacting it costs nothing);
- is PAT (a personal access token): GITHUB_PAT, GH_PAT.
Deliberately not: AUTH, CERT, SESSION, URL (no name says whether they carry a secret; DATABASE_URL's
password lives in the value, which no name predicate can see).

Secrets reach a job only through the environment sbatch passes on from the submitting shell: nothing the
launcher or the trainer writes holds their values. `redact` replaces them in what is written or shown
(plans, manifests, commands, log lines); `literal_secret_assignments` finds those a job script would hold.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# NAME=value inside a string (a profile's setup line, a command line, a log line): `export A=b`, `--x=A=b`,
# `--export=ALL,A=b`. Found at every position (a lookahead), so an assignment inside another's value counts.
_ASSIGNMENT = re.compile(r"(?<![A-Za-z0-9_])(?=([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|'[^']*'|[^\s'\"]*))")
REDACTED = "<redacted>"


def _secret_word(word: str) -> bool:
    w = word.upper()
    return (
        w.endswith("TOKEN")
        or "SECRET" in w
        or w in ("KEY", "KEYS", "APIKEY", "PASS", "PAT")
        or w.startswith(("PASSW", "PASSPHRASE", "CREDENTIAL"))
    )


def is_secret_name(name: str) -> bool:
    return any(_secret_word(w) for w in _WORD.findall(str(name)))


def redact(value: Any) -> Any:
    """A copy with the values of secret-named keys, and of secret NAME=value assignments in strings, replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_name(k) and isinstance(v, str) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if not isinstance(value, str):
        return value
    out, done = [], 0
    for m in _ASSIGNMENT.finditer(value):
        if is_secret_name(m.group(1)) and m.start(2) >= done:
            out += [value[done : m.start(2)], REDACTED]
            done = m.end(2)
    return "".join(out) + value[done:]


def literal_secret_assignments(text: str) -> list[str]:
    """Secret names `text` (a shell line) assigns a literal value: `export HF_TOKEN=hf_x` names HF_TOKEN;
    `export HF_TOKEN=$(cat ~/.hf_token)` or `="$HF_TOKEN_RW"` do not (the script then holds no secret)."""
    return [
        m.group(1)
        for m in _ASSIGNMENT.finditer(text)
        if is_secret_name(m.group(1)) and not m.group(2).lstrip("\"'").startswith("$")
    ]


class RedactingFilter(logging.Filter):
    """On a handler: its records' messages with secret NAME=value assignments redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
