"""Results people can look at: plots and tables from run folders, for one run or a sweep.

One run (a folder with config.json): PNG plots of the loss, throughput and memory (the planner's prediction
beside what was measured) from metrics.jsonl, and the evaluation table (Markdown + CSV) from eval.json.
A recipe's folder (recipe.json, `launch --recipe`): the paper's Table 1 from the runs' predictions, with
intervals, paired tests and flags (telepathy/results.py computes it; here it is rendered).
A sweep (a folder of run folders): one table with a row per configuration (the fields that differ between
runs, seeds aside) and mean ± std over seeds for the bridge and every baseline, accuracy and latency, as the
original paper's Table 1; a PNG of accuracy per configuration; and the runs that have no eval.json yet.

Reads files only: no torch. matplotlib (Agg) is imported when a plot is drawn.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telepathy.errors import UserError
from telepathy.files import atomic_write_bytes, atomic_write_text, read_json
from telepathy.metrics import method_results, read_metrics
from telepathy.rundir import RunDir

SCHEMA = 1
FIGSIZE, DPI = (8.0, 4.5), 100  # every PNG is 800 x 450 pixels
# Config fields that differ between runs without being a configuration choice.
NOT_SWEPT = {"run_dir", "name", "train.seed", "predicted_peak_gib", "train.micro_batch", "train.grad_accum"}
FIRST = ["sender", "receiver", "data.task"]  # table columns in this order, then the rest alphabetically
MEMORY_SUFFIX = "_gib"
LOSSES = {"loss": "loss (answer CE + diversity term)", "lm_loss": "answer CE"}  # metrics field -> legend


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    plan: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    eval: dict[str, Any] | None
    manifest: dict[str, Any] | None

    @property
    def state(self) -> str:
        """completed / running / preempted / failed (ErrorType) from the manifest; "not started" without one."""
        if self.manifest is None:
            return "not started"
        ex = self.manifest.get("exit", {})
        return f"{ex.get('state')} ({ex['error_type']})" if ex.get("error_type") else str(ex.get("state"))

    @property
    def seed(self) -> int | None:
        return self.config.get("train", {}).get("seed")


@dataclass
class Report:
    kind: str  # "run" or "sweep"
    path: Path
    written: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # run folders with no eval.json yet
    states: dict[str, str] = field(default_factory=dict)  # how each missing run stands (its manifest)
    notes: list[str] = field(default_factory=list)
    table: Path | None = None  # the Markdown table to print (a run's evaluation, a sweep's summary)
    recipe: dict[str, Any] | None = None  # a recipe folder's table (telepathy.results.compute)

    def to_dict(self) -> dict[str, Any]:
        if self.recipe is not None:  # its own stable schema (results.SCHEMA), with the files written
            return self.recipe
        return {
            "schema": SCHEMA,
            "kind": self.kind,
            "path": str(self.path),
            "written": [str(p) for p in self.written],
            "rows": self.rows,
            "missing": self.missing,
            "states": self.states,
            "notes": self.notes,
        }


# ---- reading run folders ----------------------------------------------------------------------------


def load_run(path: Path) -> Run:
    d = RunDir(path)
    return Run(
        path=path,
        config=read_json(d.config, "run config") or {},
        plan=read_json(d.plan, "plan"),
        metrics=read_metrics(d),
        eval=read_json(d.eval, "evaluation"),
        manifest=read_json(d.manifest, "manifest"),
    )


def find_runs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and RunDir(p).is_run())


# ---- statistics and tables ----------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n - 1, as the paper's ± over seeds); std is None for one value."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def fmt(stat: dict[str, Any] | None, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    return text if stat.get("std") is None else f"{text} ± {stat['std']:.{digits}f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(["" if v is None else v for v in r] for r in rows)
    return buf.getvalue()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def swept_fields(configs: list[dict[str, Any]]) -> list[str]:
    """Config fields (dotted) whose values differ between runs, seeds and bookkeeping aside."""
    flats = [_flat(c) for c in configs]
    keys = sorted(
        {k for f in flats for k in f} - NOT_SWEPT, key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k)
    )
    return [k for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1]


def _column(key: str) -> str:
    return key.rsplit(".", 1)[-1]  # "bridge.soft_tokens" -> "soft_tokens"


# ---- plots --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib  # noqa: PLC0415  (matplotlib only when a plot is drawn)

    matplotlib.use("Agg")  # files only: no display on compute nodes or in CI
    import matplotlib.pyplot as plt  # noqa: PLC0415  (matplotlib only when a plot is drawn)

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one field. A requeued run logs again the steps after its last checkpoint, later
    in the file: the last record of a step wins."""
    by_step: dict[int, float] = {}
    for r in records:
        v = _flat(r).get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(r.get("step"), int):
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _train_records(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in metrics if r.get("kind") == "train"]


def plot_lines(
    path: Path,
    title: str,
    ylabel: str,
    lines: dict[str, tuple[list[int], list[float]]],
    right: tuple[str, list[int], list[float]] | None = None,
) -> Path:
    """Lines against the step; `right` is one more series on a second y axis (a different unit)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        label, xs, ys = right
        twin = ax.twinx()
        twin.plot(xs, ys, color="tab:gray", linestyle=":", marker="." if len(xs) < 50 else None, label=label)
        twin.set_ylabel(label)
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_memory(path: Path, title: str, measured: dict[str, dict[str, float]], predicted: float | None) -> Path:
    """Bars of what was measured at each phase (after loading, after the first step), beside the
    planner's predicted peak as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    phases = list(measured)
    keys = sorted({k for m in measured.values() for k in m})
    width = 0.8 / max(len(keys), 1)
    for i, k in enumerate(keys):
        xs = [p + (i - (len(keys) - 1) / 2) * width for p in range(len(phases))]
        ax.bar(xs, [measured[ph].get(k, math.nan) for ph in phases], width, label=f"measured {k}")
    if predicted is not None:
        ax.axhline(predicted, linestyle="--", color="tab:red", label=f"predicted peak (plan) {predicted:.2f} GiB")
    top = max([v for m in measured.values() for v in m.values()] + [predicted or 0.0])
    ax.set_ylim(0, top * 1.3 or 1.0)  # headroom for the legend
    ax.set_xticks(range(len(phases)), phases)
    ax.set(title=title, ylabel="GiB")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(
    path: Path, title: str, ylabel: str, groups: list[str], methods: list[str], stats: list[dict[str, dict[str, Any]]]
) -> Path:
    """Grouped bars: one group per configuration, one bar per method, error bars = std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        means = [s.get(m, {}).get("mean") for s in stats]
        stds = [s.get(m, {}).get("std") or 0.0 for s in stats]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else math.nan for v in means], width, yerr=stds, capsize=3, label=m)
    crowded = len(groups) > 6
    ax.set_xticks(
        range(len(groups)), groups, rotation=30 if crowded else 0, ha="right" if crowded else "center", fontsize="small"
    )
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


# ---- one run ------------------------------------------------------------------------------------------


def measured_memory(metrics: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{phase: {measurement: GiB}} from the trainer's memory records (the prediction itself aside)."""
    out: dict[str, dict[str, float]] = {}
    for r in metrics:
        if r.get("kind") == "memory":
            values = {
                k: float(v)
                for k, v in r.items()
                if k.endswith(MEMORY_SUFFIX)
                and k != "predicted_peak_gib"
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
            }
            if values:
                out[str(r.get("phase", f"step {r.get('step')}"))] = values
    return out


def predicted_gib(run: Run) -> float | None:
    """The planner's prediction as the run recorded it, else from its plan."""
    for r in run.metrics:
        if r.get("kind") == "memory" and r.get("predicted_peak_gib") is not None:
            return float(r["predicted_peak_gib"])
    if run.plan and run.plan.get("memory", {}).get("total_gib") is not None:
        return float(run.plan["memory"]["total_gib"])
    return run.config.get("predicted_peak_gib")


def report_run(path: Path, out: Path) -> Report:
    run = load_run(path)
    rep = Report("run", path)
    train = _train_records(run.metrics)
    name = run.config.get("name", path.name)
    if not train:
        rep.notes.append("no training records yet: no loss or throughput plot")
    else:
        losses = {label: series(train, k) for k, label in LOSSES.items() if series(train, k)[0]}
        rep.written.append(plot_lines(out / "loss.png", f"{name}: training loss", "loss", losses))
        tokens = series(train, "tokens_per_s")
        rep.written.append(
            plot_lines(
                out / "throughput.png",
                f"{name}: throughput",
                "samples / s",
                {"samples/s": series(train, "samples_per_s")},
                ("sender tokens/s", *tokens) if tokens[0] else None,
            )
        )
    measured = measured_memory(run.metrics)
    if measured:
        rep.written.append(
            plot_memory(out / "memory.png", f"{name}: memory, predicted vs measured", measured, predicted_gib(run))
        )
    else:
        rep.notes.append("no memory records yet: no memory plot")
    if run.eval is None:
        rep.missing.append(path.name)
        rep.states[path.name] = run.state
        rep.notes.append("no evaluation yet: no evaluation table")
        return rep
    for method, r in method_results(run.eval).items():
        rep.rows.append({"method": method, **r})
    n, labels = run.eval.get("n"), run.eval.get("labels") or []
    title = f"task {run.eval.get('task')}: n={n}" + (f", chance {100 / len(labels):.1f}%" if labels else "")
    rows = [
        [r["method"], _num(r["accuracy"]), _num(r["scored_accuracy"]), str(r["unmatched"]), _num(r["latency_ms"])]
        for r in rep.rows
    ]
    header = ["method", "accuracy (%)", "scored (%)", "unmatched", "latency (ms, median)"]
    atomic_write_text(out / "eval.md", f"{title}\n\n" + markdown(header, rows))
    atomic_write_text(
        out / "eval.csv",
        csv_text(
            ["method", "accuracy", "scored_accuracy", "unmatched", "latency_ms"],
            [[r["method"], r["accuracy"], r["scored_accuracy"], r["unmatched"], r["latency_ms"]] for r in rep.rows],
        ),
    )
    rep.written += [out / "eval.md", out / "eval.csv"]
    rep.table = out / "eval.md"
    if run.eval.get("skipped"):
        rep.notes.append(f"not evaluated: {', '.join(run.eval['skipped'])}")
    return rep


def _num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


# ---- a sweep ------------------------------------------------------------------------------------------


def sweep_rows(runs: list[Run]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(swept fields, methods, one row per configuration with mean/std over its seeds)."""
    fields = swept_fields([r.config for r in runs])
    groups: dict[str, list[Run]] = {}
    for r in runs:
        flat = _flat(r.config)
        groups.setdefault(json.dumps([flat.get(k) for k in fields]), []).append(r)
    methods: list[str] = []
    rows = []
    for key, members in groups.items():
        done = [m for m in members if m.eval is not None]
        results = [method_results(m.eval) for m in done]  # type: ignore[arg-type]
        for res in results:
            methods += [m for m in res if m not in methods]
        stats = {
            m: {
                metric: mean_std([x for res in results if (x := res.get(m, {}).get(metric)) is not None])
                for metric in ("accuracy", "latency_ms")
            }
            for m in methods
        }
        rows.append(
            {
                "config": dict(zip(fields, json.loads(key))),
                "seeds": sorted(s for m in done if (s := m.seed) is not None),
                "runs": [m.path.name for m in members],
                "pending": [m.path.name for m in members if m.eval is None],
                "methods": stats,
            }
        )
    rows.sort(key=lambda row: [_order(v) for v in row["config"].values()])
    for row in rows:  # methods first seen in a later group
        for m in methods:
            row["methods"].setdefault(m, {"accuracy": mean_std([]), "latency_ms": mean_std([])})
    return fields, methods, rows


def _order(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order (K=8 before K=32), then everything else as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def report_sweep(path: Path, out: Path) -> Report:
    runs = [load_run(p) for p in find_runs(path)]
    if not runs:
        raise UserError(f"{path} holds no run folders (folders with a run configuration); pass a run or sweep folder")
    rep = Report("sweep", path)
    rep.missing = [r.path.name for r in runs if r.eval is None]
    rep.states = {r.path.name: r.state for r in runs if r.eval is None}
    fields, methods, rows = sweep_rows(runs)
    rep.rows = rows
    cols = [_column(f) for f in fields]
    # Accuracy for every method; latency only where it was measured (evaluate.py times bridge and relay).
    cells = [(m, "accuracy") for m in methods] + [
        (m, "latency_ms") for m in methods if any(row["methods"][m]["latency_ms"]["n"] for row in rows)
    ]
    unit = {"accuracy": "acc (%)", "latency_ms": "latency (ms)"}
    header = cols + ["seeds"] + [f"{m} {unit[metric]}" for m, metric in cells]
    md = [
        [str(row["config"][f]) for f in fields]
        + [str(len(row["seeds"]))]
        + [fmt(row["methods"][m][metric]) for m, metric in cells]
        for row in rows
    ]
    csv_header = cols + ["n_seeds"] + [f"{m}_{metric}_{s}" for m, metric in cells for s in ("mean", "std")]
    csv_rows = [
        [row["config"][f] for f in fields]
        + [len(row["seeds"])]
        + [row["methods"][m][metric][s] for m, metric in cells for s in ("mean", "std")]
        for row in rows
    ]
    note = (
        (
            f"\n{len(rep.missing)} of {len(runs)} runs have no evaluation yet: "
            + ", ".join(f"{name} ({state})" for name, state in rep.states.items())
            + "\n"
        )
        if rep.missing
        else ""
    )
    atomic_write_text(out / "summary.md", markdown(header, md) + note)
    atomic_write_text(out / "summary.csv", csv_text(csv_header, csv_rows))
    rep.written += [out / "summary.md", out / "summary.csv"]
    rep.table = out / "summary.md"
    if methods and any(row["seeds"] for row in rows):
        labels = ["\n".join(f"{c}={row['config'][f]}" for c, f in zip(cols, fields)) or "all runs" for row in rows]
        accuracy = [{m: row["methods"][m]["accuracy"] for m in methods} for row in rows]
        rep.written.append(
            plot_bars(
                out / "accuracy.png",
                f"{path.name}: accuracy (mean ± std over seeds)",
                "accuracy (%)",
                labels,
                methods,
                accuracy,
            )
        )
    return rep


# ---- a recipe ----------------------------------------------------------------------------------------


def _cell_text(cell: dict[str, Any] | None) -> str:
    if not cell or cell["mean"] is None:
        return "–"
    text = f"{cell['mean']:.1f}" if cell["std"] is None else f"{cell['mean']:.1f} ± {cell['std']:.1f}"
    note = "deterministic" if cell["deterministic"] else f"n={cell['n']}"
    marks = ("†" if cell["fallback"] else "") + ("⚠" if cell["flags"] else "")
    return f"{text} ({note}){marks}"


def _interval_text(cell: dict[str, Any] | None) -> str:
    if not cell or cell["interval"] is None:
        return "–"
    lo, hi = cell["interval"]
    return f"[{lo:.1f}, {hi:.1f}] {'Wilson' if cell['interval_kind'] == 'wilson' else 't, seeds'}"


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def recipe_markdown(t: dict[str, Any]) -> str:
    """The Table-1 report of a recipe folder (results.compute) as Markdown."""
    cells = {(c["reading"], c["pair"], c["row"], c["task"]): c for c in t["cells"]}
    tasks = t["tasks"]
    out = [f"# {t['recipe'] or Path(t['path']).name}: methods x tasks", ""]
    examples = ", ".join(f"{task} {n}" for task, n in t["eval_examples"].items())
    out.append(f"Eval examples per task (the same for every method): {examples}.")
    out.append(
        "Cells: accuracy (%) mean ± sample std over seeds (n = seeds); deterministic methods run once. "
        "† the linear probe: its classifier (it does not generate). ⚠ seeds disagree or split (see Flags)."
    )
    titles = {"generated": "accuracy by generation", "scored": "accuracy by label scoring"}
    for reading in t["readings"]:
        for pair in t["pairs"]:
            rows = [r for r in t["rows"] if any((reading, pair, r, task) in cells for task in tasks)]
            out += ["", f"## {pair}: {titles[reading]}", ""]
            out.append(
                markdown(
                    ["method", *tasks],
                    [[r] + [_cell_text(cells.get((reading, pair, r, k))) for k in tasks] for r in rows],
                ).rstrip()
            )
            out += ["", "95% intervals: over seeds (t), or Wilson for one run:", ""]
            out.append(
                markdown(
                    ["method", *tasks],
                    [[r] + [_interval_text(cells.get((reading, pair, r, k))) for k in tasks] for r in rows],
                ).rstrip()
            )
    for reading in t["readings"]:
        tests = [x for x in t["tests"] if x["reading"] == reading]
        out += ["", f"## Paired tests, {titles[reading]}: bridge vs each baseline", ""]
        if not tests:
            out.append("No bridge runs with a baseline on the same examples.")
            continue
        out.append(
            f"Exact McNemar (two-sided binomial on the discordant examples), {t['correction']} correction over "
            f"the {len(tests)} tests of this table, α = {t['alpha']}."
        )
        out.append("")
        header = [
            "task",
            "bridge",
            "baseline",
            "seed",
            "n",
            "bridge only",
            "baseline only",
            "bridge %",
            "baseline %",
            "p",
            "p (Holm)",
            "",
        ]
        body = [
            [
                x["task"],
                x["bridge"],
                x["baseline"],
                str(x["seed"]) + ("" if x["baseline_seed"] == x["seed"] else f" ({x['baseline_seed']})"),
                str(x["n"]),
                str(x["bridge_only"]),
                str(x["baseline_only"]),
                f"{x['bridge_accuracy']:.1f}",
                f"{x['baseline_accuracy']:.1f}",
                _p(x["p"]),
                _p(x["p_holm"]),
                f"{x['better']} better" if x["significant"] else "",
            ]
            for x in tests
        ]
        out.append(markdown(header, body).rstrip())
    flagged = [c for c in t["cells"] if c["flags"] and c["reading"] == "generated"]
    out += ["", "## Flags", ""]
    if flagged:
        out += [
            f"- {c['task']} / {c['row']} (seeds {', '.join(map(str, c['seeds']))}: "
            + ", ".join(f"{v:.1f}" for v in c["values"])
            + f"): {'; '.join(c['flags'])}"
            for c in flagged
        ]
        out.append(f"\n`launch report {t['path']} --extra-seeds` prints the runs that add seeds to these cells.")
    else:
        th = t["thresholds"]
        out.append(
            f"None: no cell's seeds span more than {th['spread_pp']:g} pp or split by a gap over {th['gap_pp']:g} pp."
        )
    out += ["", "## Runs", ""]
    body = []
    for r in t["runs"]:
        g, s = r["generated"], r["scored"]
        body.append(
            [r["run"], r["row"], r["task"], str(r["seed"])]
            + [
                f"{x['accuracy']:.1f} [{x['wilson'][0]:.1f}, {x['wilson'][1]:.1f}] of {x['n']}" if x else "–"
                for x in (g, s)
            ]
        )
    out.append(
        markdown(["run", "method", "task", "seed", "generated (Wilson 95%)", "scored (Wilson 95%)"], body).rstrip()
    )
    if t["cost"]:
        unit = "GPU" if t["cost"][0].get("device") == "gpu" else "CPU"
        out += ["", f"## Cost ({unit}-seconds: wall seconds x the devices each run held)", ""]
        phases = ["load", "cache", "train", "eval"]
        body = [
            [c["method"] + (f" (+ {', '.join(c['also_evaluates'])})" if c["also_evaluates"] else ""), str(c["runs"])]
            + [f"{c['device_seconds'].get(ph, 0.0):.0f}" for ph in phases]
            + [f"{c['total_device_seconds']:.0f}", f"{c['total_device_seconds'] / 3600:.3f}"]
            for c in t["cost"]
        ]
        out.append(markdown(["runs of", "runs", *phases, "total", f"{unit}-hours"], body).rstrip())
    if t["missing"]:
        out += [
            "",
            f"{len(t['missing'])} run(s) have no predictions yet: "
            + ", ".join(f"{m} ({t['states'][m]})" for m in t["missing"]),
        ]
    for note in t["notes"]:
        out.append(f"\nnote: {note}")
    return "\n".join(out) + "\n"


def recipe_csv(t: dict[str, Any]) -> str:
    header = [
        "reading",
        "pair",
        "method",
        "row",
        "task",
        "n_seeds",
        "seeds",
        "mean",
        "std",
        "interval_low",
        "interval_high",
        "interval",
        "deterministic",
        "flags",
    ]
    rows = [
        [
            c["reading"],
            c["pair"],
            c["method"],
            c["row"],
            c["task"],
            c["n"],
            " ".join(map(str, c["seeds"])),
            c["mean"],
            c["std"],
        ]
        + (c["interval"] or [None, None])
        + [c["interval_kind"], c["deterministic"], "; ".join(c["flags"])]
        for c in t["cells"]
    ]
    return csv_text(header, rows)


def plot_recipe(path: Path, t: dict[str, Any]) -> Path:
    """Bars per task, one per method (generation; the probe's classifier), with the 95% interval of each cell."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    cells = {(c["row"], c["task"]): c for c in t["cells"] if c["reading"] == "generated" and c["pair"] == t["pairs"][0]}
    rows, tasks = t["rows"], t["tasks"]
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for g, task in enumerate(tasks):
            c = cells.get((row, task))
            if c is None or c["mean"] is None:
                continue
            xs.append(g + (i - (len(rows) - 1) / 2) * width)
            ys.append(c["mean"])
            low, high = c["interval"] or (c["mean"], c["mean"])
            lo.append(max(0.0, c["mean"] - low))
            hi.append(max(0.0, high - c["mean"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=row)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(
        title=f"{t['recipe'] or Path(t['path']).name}: accuracy with 95% intervals",
        ylabel="accuracy (%)",
        ylim=(0, 105),
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="x-small", ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def report_recipe(path: Path, out: Path) -> Report:
    from telepathy import results  # noqa: PLC0415  (scipy only for a recipe's statistics)

    t = results.compute(path)
    rep = Report("recipe", path)
    rep.missing, rep.states, rep.notes = t["missing"], t["states"], list(t["notes"])
    atomic_write_text(out / "table.md", recipe_markdown(t))
    atomic_write_text(out / "table.csv", recipe_csv(t))
    rep.written += [out / "table.md", out / "table.csv"]
    if t["cells"]:
        rep.written.append(plot_recipe(out / "table.png", t))
    rep.written.append(out / "table.json")
    rep.table, rep.recipe = out / "table.md", t
    t["written"] = [str(p) for p in rep.written]
    atomic_write_text(out / "table.json", json.dumps(t, indent=2) + "\n")
    return rep


def report(path: str | Path, out: str | Path | None = None) -> Report:
    """Report on a run folder, a sweep folder or a recipe's folder; files go to `out` (default PATH/report)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass a run folder or a sweep folder of runs")
    out = Path(out) if out else RunDir(path).report
    if RunDir(path).recipe.is_file():
        return report_recipe(path, out)
    return report_run(path, out) if RunDir(path).is_run() else report_sweep(path, out)
