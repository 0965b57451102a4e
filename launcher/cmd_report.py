"""`launch report RUN_OR_SWEEP [--json] [--out DIR] [--extra-seeds [N]]`: plots and tables from a run, sweep or
recipe folder (no torch)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from launcher.flags import RUN_FLAGS, positive_int
from launcher.runs import resolve
from telepathy.errors import UserError
from telepathy.files import read_json
from telepathy.rundir import RunDir


def register(sub) -> None:
    p = sub.add_parser("report", help="plots and tables (Markdown, CSV, PNG) from a run or a sweep folder")
    p.add_argument("path", metavar="RUN_OR_SWEEP", help="a run folder, a sweep folder, or a name under the runs folder")
    p.add_argument("--out", help="where the files go (default RUN_OR_SWEEP/report)")
    p.add_argument("--json", action="store_true", help="print paths written, table rows and missing runs as JSON")
    p.add_argument("--runs-dir", help="where run folders are (default ./runs; env TELEPATHY_RUNS)")
    p.add_argument(
        "--extra-seeds",
        type=positive_int,
        nargs="?",
        const=3,
        metavar="N",
        help="a recipe folder: print the runs that add N seeds (default 3) to the cells whose seeds disagree",
    )
    p.set_defaults(handler=handle)


def handle(args) -> int:
    from telepathy.report import report  # noqa: PLC0415  (matplotlib: only this subcommand needs it)

    rep = report(resolve(args.path, args.runs_dir), args.out)
    extra = None
    if args.extra_seeds is not None:
        if rep.kind != "recipe":
            raise UserError("--extra-seeds goes with a recipe's folder (the one `launch --recipe` printed)")
        extra = extra_runs(rep, args.extra_seeds)
    if args.json:
        doc = rep.to_dict()
        if extra is not None:
            doc = {**doc, "extra_seeds": extra}
        print(json.dumps(doc, indent=2))
        return 0
    if extra is not None:
        if not extra:
            print("no cell needs more seeds: every seeded cell's seeds agree")
        for e in extra:
            print(f"{e['task']} / {e['row']}: {'; '.join(e['why'])}; add seeds {', '.join(map(str, e['seeds']))}:")
            print(f"  {e['command']}")
        return 0
    for p in rep.written:
        print(f"wrote {p}")
    for note in rep.notes:
        print(f"note: {note}")
    if rep.kind == "sweep" and rep.missing:
        print(
            f"missing: {len(rep.missing)} run(s) have no evaluation yet: "
            + ", ".join(f"{name} ({state})" for name, state in rep.states.items())
        )
    if rep.table is not None:
        print()
        print(rep.table.read_text(), end="")
    return 0


def extra_runs(rep, count: int) -> list[dict]:
    """The flagged cells' new seeds, each with the `launch --recipe` command that adds them into the recipe's
    folder (as a sub-folder, which the report reads with the rest), planned with the first submission's flags."""
    from telepathy import results  # noqa: PLC0415  (only with --extra-seeds)

    root = Path(rep.recipe["path"])
    saved = read_json(RunDir(root).recipe, "recipe record") or {}
    recipe = saved.get("recipe", {})
    by_field = {f"{section}.{name}" if section else name: flag for flag, (section, name, _) in RUN_FLAGS.items()}
    taken = {p.name for p in root.iterdir() if p.name.startswith("extra-")}
    out = []
    for n, e in enumerate(results.extra_seeds(rep.recipe, count), 1):
        name = next(f"extra-{i}" for i in range(n, n + len(taken) + 2) if f"extra-{i}" not in taken)
        taken.add(name)
        argv = ["launch", "--recipe", recipe.get("path") or recipe.get("name") or "RECIPE"]
        argv += ["--runs-dir", str(root), "--name", name, "--methods", e["method"], "--task", e["task"]]
        for key, value in e["variant"].items():
            if key in by_field:
                argv += [f"--{by_field[key]}", str(value)]
        argv += ["--seeds", ",".join(map(str, e["seeds"]))] + list(saved.get("flags", []))
        out.append({**e, "command": shlex.join(argv)})
    return out
