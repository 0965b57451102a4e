"""A recipe's results as the paper's Table 1 (methods x tasks), computed from the runs' predictions.jsonl only,
so every number can be recomputed from those files (tests/slurm/test_recipe.py does). Torch-free.

- a row is a method, plus whatever distinguishes that method's runs other than the seed and task (K=8 vs
  K=32 for the bridge); a column is a task; a cell gathers the row's runs on that task, one per seed;
- two readings of every run: "generated" (greedy generation matched to a label) and "scored" (label
  scoring); a method that does not generate (the linear probe) shows its classifier in the generated table;
- per run: accuracy and its Wilson 95% interval; per cell: mean, sample std, the number of seeds, the t
  interval over seeds (the Wilson interval of the one run of a deterministic method), flags when the seeds
  disagree or split into two modes;
- paired tests: every bridge row against every other row, per task and seed (the same seed's run of a seeded
  baseline, the one run of a deterministic one) on the examples both scored, exact McNemar, Holm's
  correction over all the tests of a reading;
- cost: the device-seconds per phase the runs' manifests recorded, summed per method.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telepathy import stats
from telepathy.config import METHODS
from telepathy.errors import UserError
from telepathy.files import read_json
from telepathy.rundir import RunDir

SCHEMA = 1
READINGS = ("generated", "scored")
ALPHA = 0.05
CORRECTION = "Holm-Bonferroni"
# Config fields that never distinguish rows (bookkeeping, or what the recipe's lists and runs decide).
NOT_ROWS = {
    "run_dir",
    "name",
    "predicted_peak_gib",
    "method",
    "train.seed",
    "train.micro_batch",
    "train.grad_accum",
    "data.task",
    "eval.baselines",
}
SHORT = {"bridge.soft_tokens": "K"}
SKIP_DIRS = {"code", "slurm", "report", "checkpoints", "logs"}


@dataclass
class MethodRun:
    """One method's predictions in one run folder."""

    run: str  # the run folder, relative to the recipe folder
    method: str
    pair: str
    task: str
    seed: int
    config: dict[str, Any]
    right: dict[str, dict[int, bool]]  # reading -> example id -> correct; "generated" is {} without generation
    row: str = ""
    variant: dict[str, Any] = field(default_factory=dict)  # the config fields (dotted) that make its row

    def accuracy(self, reading: str) -> tuple[int, int]:
        marks = self.right[reading]
        return sum(marks.values()), len(marks)


@dataclass
class Loaded:
    runs: list[MethodRun] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)
    costs: list[dict[str, Any]] = field(default_factory=list)


def run_folders(root: Path, depth: int = 3) -> Iterator[Path]:
    """Run folders under a recipe folder: its task folders, a sub-folder per GPU count, and the folders of runs
    added later (`launch report --extra-seeds`) inside it."""
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name in SKIP_DIRS:
            continue
        if RunDir(p).is_run():
            yield p
        elif depth > 1:
            yield from run_folders(p, depth - 1)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def _state(manifest: dict | None) -> str:
    if manifest is None:
        return "not started"
    ex = manifest.get("exit", {})
    return f"{ex.get('state')} ({ex['error_type']})" if ex.get("error_type") else str(ex.get("state"))


def load(root: Path) -> Loaded:
    out = Loaded()
    for folder in run_folders(root):
        d = RunDir(folder)
        name = str(folder.relative_to(root))
        config = read_json(d.config, "run config") or {}
        manifest = read_json(d.manifest, "manifest")
        if not d.is_complete() or not d.predictions.is_file():
            out.missing.append(name)
            out.states[name] = _state(manifest)
            continue
        pair = f"{config.get('sender')} -> {config.get('receiver')}"
        task = Path(str(config.get("data", {}).get("task"))).stem
        seed = config.get("train", {}).get("seed")
        per_method: dict[str, dict[str, dict[int, bool]]] = {}
        for line in d.predictions.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            marks = per_method.setdefault(r["method"], {"generated": {}, "scored": {}})
            if r["generated"] is not None:
                marks["generated"][r["id"]] = r["generated_label"] == r["gold"]
            marks["scored"][r["id"]] = r["scored_label"] == r["gold"]
        own = config.get("method", "bridge")
        for method, right in per_method.items():
            out.runs.append(MethodRun(name, method, pair, task, seed, config, right))
        cost = (manifest or {}).get("cost")
        if cost:
            methods = [own] + [m for m in config.get("eval", {}).get("baselines", []) if m != own]
            out.costs.append({"run": name, "methods": methods, **cost})
    return out


def _label_rows(runs: list[MethodRun]) -> None:
    """Each run's row: its method, and the config fields that differ between that method's runs."""
    by_method: dict[str, list[MethodRun]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    for method, members in by_method.items():
        flats = [_flat(m.config) for m in members]
        keys = sorted({k for f in flats for k in f} - NOT_ROWS)
        varying = [k for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1]
        for m, f in zip(members, flats):
            m.variant = {k: f.get(k) for k in varying}
            parts = [f"{SHORT.get(k, k.rsplit('.', 1)[-1])}={v}" for k, v in m.variant.items()]
            m.row = f"{method} ({', '.join(parts)})" if parts else method


def _order(row: str) -> tuple[int, str]:
    method = row.split(" ", 1)[0]
    names = list(METHODS)
    return (names.index(method) if method in names else len(names), row)


def _percent(k: int, n: int) -> float:
    return 100.0 * k / n if n else float("nan")


def compute(root: Path, spread_pp: float = stats.SPREAD_PP, gap_pp: float = stats.GAP_PP) -> dict[str, Any]:
    """The whole table as plain data (the `launch report --json` schema of a recipe folder)."""
    loaded = load(root)
    if not loaded.runs and not loaded.missing:
        raise UserError(f"{root} holds no run folders; pass the folder `launch --recipe` printed")
    _label_rows(loaded.runs)
    pairs = sorted({r.pair for r in loaded.runs})
    tasks = list(dict.fromkeys(r.task for r in loaded.runs))
    rows = sorted({r.row for r in loaded.runs}, key=_order)
    run_entries = []
    for r in loaded.runs:
        entry = {"run": r.run, "method": r.method, "row": r.row, "pair": r.pair, "task": r.task, "seed": r.seed}
        entry["variant"] = r.variant
        for reading in READINGS:
            k, n = r.accuracy(reading)
            entry[reading] = (
                {"correct": k, "n": n, "accuracy": _percent(k, n), "wilson": [100 * x for x in stats.wilson(k, n)]}
                if n
                else None
            )
        run_entries.append(entry)
    cells = []
    for reading in READINGS:
        for pair in pairs:
            for row in rows:
                for task in tasks:
                    members = [e for e in run_entries if (e["pair"], e["row"], e["task"]) == (pair, row, task)]
                    if not members:
                        continue
                    fallback = reading == "generated" and all(e["generated"] is None for e in members)
                    use = "scored" if fallback else reading
                    members = sorted((e for e in members if e[use] is not None), key=lambda e: (e["seed"], e["run"]))
                    values = [e[use]["accuracy"] for e in members]
                    method = members[0]["method"] if members else row.split(" ", 1)[0]
                    interval = stats.seed_interval(values)
                    if interval is None and len(members) == 1:
                        interval, kind = tuple(members[0][use]["wilson"]), "wilson"
                    else:
                        kind = "t over seeds" if interval is not None else None
                    cells.append(
                        {
                            "reading": reading,
                            "pair": pair,
                            "row": row,
                            "method": method,
                            "variant": members[0]["variant"] if members else {},
                            "task": task,
                            "n": len(values),
                            "seeds": [e["seed"] for e in members],
                            "runs": [e["run"] for e in members],
                            "values": values,
                            "mean": statistics.fmean(values) if values else None,
                            "std": statistics.stdev(values) if len(values) > 1 else None,
                            "interval": [float(x) for x in interval] if interval is not None else None,
                            "interval_kind": kind,
                            "deterministic": method in METHODS and not METHODS[method].seeded,
                            "fallback": fallback,
                            "flags": stats.disagreement(values, spread_pp, gap_pp),
                        }
                    )
    tests = _paired_tests(loaded.runs)
    notes = []
    ids = {}
    for r in loaded.runs:
        ids.setdefault(r.task, set()).add(frozenset(r.right["scored"]))
    for task, sets in ids.items():
        if len(sets) > 1:
            notes.append(
                f"task {task}: the runs scored different example sets; paired tests use the examples both scored"
            )
    return {
        "schema": SCHEMA,
        "kind": "recipe",
        "path": str(root),
        "recipe": (read_json(RunDir(root).recipe, "recipe record") or {}).get("recipe", {}).get("name"),
        "readings": list(READINGS),
        "pairs": pairs,
        "tasks": tasks,
        "rows": rows,
        "eval_examples": {t: max(len(r.right["scored"]) for r in loaded.runs if r.task == t) for t in tasks},
        "cells": cells,
        "runs": run_entries,
        "tests": tests,
        "correction": CORRECTION,
        "alpha": ALPHA,
        "thresholds": {"spread_pp": spread_pp, "gap_pp": gap_pp},
        "cost": _cost(loaded.costs),
        "missing": loaded.missing,
        "states": loaded.states,
        "notes": notes,
    }


def _paired_tests(runs: list[MethodRun]) -> list[dict[str, Any]]:
    bridges = [r for r in runs if r.method == "bridge"]
    tests = []
    for reading in READINGS:
        family = []
        for b in bridges:
            others = [o for o in runs if o.method != "bridge" and (o.pair, o.task) == (b.pair, b.task)]
            for row in sorted({o.row for o in others}, key=_order):
                candidates = [o for o in others if o.row == row]
                same_seed = [o for o in candidates if o.seed == b.seed]
                deterministic = [o for o in candidates if o.method in METHODS and not METHODS[o.method].seeded]
                partner = (same_seed or deterministic[:1] or [None])[0]
                if partner is None:
                    continue
                mine = b.right[reading]
                theirs = partner.right[reading] or partner.right["scored"]  # the probe: its classifier
                common = sorted(set(mine) & set(theirs))
                if not common:
                    continue
                only_bridge = sum(mine[i] and not theirs[i] for i in common)
                only_other = sum(theirs[i] and not mine[i] for i in common)
                family.append(
                    {
                        "reading": reading,
                        "pair": b.pair,
                        "task": b.task,
                        "bridge": b.row,
                        "baseline": row,
                        "seed": b.seed,
                        "baseline_seed": partner.seed,
                        "bridge_run": b.run,
                        "baseline_run": partner.run,
                        "n": len(common),
                        "bridge_only": only_bridge,
                        "baseline_only": only_other,
                        "bridge_accuracy": _percent(sum(mine[i] for i in common), len(common)),
                        "baseline_accuracy": _percent(sum(theirs[i] for i in common), len(common)),
                        "p": stats.mcnemar(only_bridge, only_other),
                    }
                )
        for t, adjusted in zip(family, stats.holm([t["p"] for t in family])):
            t["p_holm"] = adjusted
            t["significant"] = adjusted < ALPHA
            t["better"] = (
                ("bridge" if t["bridge_only"] > t["baseline_only"] else "baseline") if t["significant"] else None
            )
        tests += family
    return tests


def _cost(costs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Device-seconds per phase summed over the runs of each method (an evaluation run that also scores other
    methods counts under its own)."""
    by: dict[str, dict[str, Any]] = {}
    for c in costs:
        key = c["methods"][0]
        entry = by.setdefault(
            key, {"method": key, "runs": 0, "device": c.get("device"), "device_seconds": {}, "also_evaluates": []}
        )
        entry["runs"] += 1
        for phase, v in c.get("device_seconds", {}).items():
            entry["device_seconds"][phase] = entry["device_seconds"].get(phase, 0.0) + v
        entry["also_evaluates"] += [m for m in c["methods"][1:] if m not in entry["also_evaluates"]]
    out = sorted(by.values(), key=lambda e: _order(e["method"]))
    for e in out:
        e["total_device_seconds"] = sum(e["device_seconds"].values())
    return out


def extra_seeds(table: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """For each flagged cell of a seeded method: `count` new seeds (after the largest seed in the folder)."""
    used = max([r["seed"] for r in table["runs"] if isinstance(r["seed"], int)] or [0])
    out, seen = [], set()
    for cell in table["cells"]:
        if not cell["flags"] or cell["deterministic"] or (cell["row"], cell["task"]) in seen:
            continue
        seen.add((cell["row"], cell["task"]))
        seeds = list(range(used + 1, used + 1 + count))
        out.append(
            {
                "row": cell["row"],
                "method": cell["method"],
                "variant": cell["variant"],
                "task": cell["task"],
                "seeds": seeds,
                "why": cell["flags"],
            }
        )
    return out
