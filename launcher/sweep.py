"""Sweeps: `--sweep seed=1,2,3 --sweep lr=1e-4,2e-4` -> one task per combination, array chunks, skip-done.

Sweep keys are the run flags of `launch` (launcher.flags.RUN_FLAGS, the one table of
flag -> RunConfig field -> parser) plus `pair`; `soft_tokens` and `soft-tokens` are the same key.
Values are parsed by the same functions as the flags, so a bad value fails here, before anything
is written or submitted.
"""

from __future__ import annotations

import argparse
import itertools
import re
from typing import Any

from launcher.flags import RUN_FLAGS
from telepathy.errors import UserError

PAIR_KEY = "pair"
MAX_TASKS = 10_000  # a typo such as seed=1,...,100000 should not become 100k jobs
_UNSAFE = re.compile(r"[^A-Za-z0-9.+=-]+")  # task names become folder names and part of job names


def sweep_keys() -> dict[str, tuple[str, str, Any]]:
    """Sweep key -> (RunConfig section, field, parser); the flags' table plus 'pair'."""
    return {**RUN_FLAGS, PAIR_KEY: ("", PAIR_KEY, str)}


def parse_spec(spec: str, keys: dict[str, tuple[str, str, Any]]) -> tuple[str, list[Any]]:
    """'lr=1e-4,2e-4' -> ('lr', [0.0001, 0.0002])."""
    key, sep, values = spec.partition("=")
    key = key.strip().replace("_", "-")
    if not sep or not key:
        raise UserError(f"--sweep {spec!r} is not KEY=V1,V2,...; e.g. --sweep seed=1,2,3")
    if key not in keys:
        raise UserError(f"--sweep key '{key}' is unknown; use one of {', '.join(sorted(keys))}")
    raw = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in raw):
        raise UserError(f"--sweep {key}: empty value in {values!r}; give comma-separated values, e.g. {key}=1,2")
    if len(set(raw)) != len(raw):
        raise UserError(f"--sweep {key}: repeated value in {values!r}; list each value once")
    parse = keys[key][2]
    parsed = []
    for v in raw:
        try:
            parsed.append(parse(v))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"--sweep {key}: bad value {v!r} ({e}); fix the value") from None
    return key, parsed


def task_name(index: int, point: dict[str, Any]) -> str:
    """A folder-safe, unique name: 003-seed=2-lr=0.0002 (the index makes it unique after cleaning)."""
    body = "-".join(f"{k}={_UNSAFE.sub('_', str(v))}" for k, v in point.items())
    return f"{index:03d}-{body}"[:100]


def expand_sweep(specs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every combination (the first key varies slowest) as (task_name, overrides); overrides are
    RunConfig.replace() sections, e.g. {"train": {"seed": 1, "lr": 1e-4}}, plus "pair" when swept."""
    keys = sweep_keys()
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        key, values = parse_spec(spec, keys)
        if key in axes:
            raise UserError(f"--sweep {key} given twice; put all its values in one --sweep {key}=V1,V2")
        axes[key] = values
    if not axes:
        raise UserError("--sweep needs at least one KEY=V1,V2")
    total = 1
    for values in axes.values():
        total *= len(values)
    if total > MAX_TASKS:
        raise UserError(f"the sweep has {total} tasks, more than {MAX_TASKS}; sweep fewer values")
    tasks = []
    for index, combo in enumerate(itertools.product(*axes.values())):
        point = dict(zip(axes, combo))
        overrides: dict[str, Any] = {}
        for key, value in point.items():
            section, field, _ = keys[key]
            if section:
                overrides.setdefault(section, {})[field] = value
            else:
                overrides[field] = value
        tasks.append((task_name(index, point), overrides))
    return tasks
