"""`launch report RUN_OR_SWEEP [--json] [--out DIR]`: plots and tables from a run or sweep folder (no torch)."""

from __future__ import annotations

import json

from launcher.runs import resolve


def register(sub) -> None:
    p = sub.add_parser("report", help="plots and tables (Markdown, CSV, PNG) from a run or a sweep folder")
    p.add_argument("path", metavar="RUN_OR_SWEEP", help="a run folder, a sweep folder, or a name under the runs folder")
    p.add_argument("--out", help="where the files go (default RUN_OR_SWEEP/report)")
    p.add_argument("--json", action="store_true", help="print paths written, table rows and missing runs as JSON")
    p.add_argument("--runs-dir", help="where run folders are (default ./runs; env TELEPATHY_RUNS)")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    from telepathy.report import report  # noqa: PLC0415  (matplotlib: only this subcommand needs it)

    rep = report(resolve(args.path, args.runs_dir), args.out)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
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
