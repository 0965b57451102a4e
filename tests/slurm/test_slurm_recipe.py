"""The demo recipe end to end on the real local cluster: every method (bridge, prompt tuning, LoRA, linear
probe, the zero-shot, k-shot and text-relay baselines, the primer-only floor), two seeds, tiny steps, as one
array job; then `launch report` on its folder, every number of which is recomputed here from the runs'
predictions.jsonl (and the cost from their manifests), and `--extra-seeds` on a copy whose seeds disagree."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shlex
import shutil
import statistics
from pathlib import Path

import pytest
from cluster import launch, logs, wait_done
from PIL import Image
from scipy.stats import binomtest

from launcher.cli import main
from telepathy.config import METHODS
from telepathy.rundir import RunDir

pytestmark = pytest.mark.slurm


def wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def cli(*args: str) -> tuple[int, str]:
    """The CLI in this process (the report and dry runs import no torch; a fresh interpreter costs seconds)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(args))
    return rc, out.getvalue()


def recompute(root: Path) -> dict:
    """Per (run, method): the correct marks of both readings, straight from predictions.jsonl."""
    out = {}
    for folder in sorted(p for p in root.iterdir() if RunDir(p).predictions.is_file()):
        for line in RunDir(folder).predictions.read_text().splitlines():
            r = json.loads(line)
            marks = out.setdefault((folder.name, r["method"]), {"generated": {}, "scored": {}})
            if r["generated"] is not None:
                marks["generated"][r["id"]] = r["generated_label"] == r["gold"]
            marks["scored"][r["id"]] = r["scored_label"] == r["gold"]
    return out


@pytest.fixture(scope="module")
def demo(slurm_cluster, tmp_path_factory):
    runs = tmp_path_factory.mktemp("recipe")
    flags = ["--cluster", "local", "--steps", "4", "--eval-samples", "16", "--train-samples", "64"]
    out = launch("--recipe", "demo", *flags, "--name", "demo", "--runs-dir", str(runs))
    assert out.returncode == 0, out.stderr
    root = runs / "demo"
    rows = wait_done(root, timeout=600)
    assert [r["state"] for r in rows] == ["COMPLETED"] * len(rows), logs(root)
    rc, report = cli("report", str(root), "--json")
    assert rc == 0
    return root, json.loads(report)


def test_every_method_ran_as_one_array_and_wrote_predictions(demo):
    root, _ = demo
    record = json.loads(RunDir(root).jobs.read_text())
    assert len(record["submissions"]) == 1 and len(record["tasks"]) == 7  # one array job
    evaluated = {}
    ids = set()
    for folder in (p for p in root.iterdir() if RunDir(p).is_run()):
        ev = json.loads(RunDir(folder).eval.read_text())
        ids.add(tuple(ev["ids"]))
        for m in ev["methods"]:
            evaluated.setdefault(m, []).append(json.loads(RunDir(folder).config.read_text())["train"]["seed"])
        cost = json.loads(RunDir(folder).manifest.read_text())["cost"]
        assert cost["device"] == "cpu" and set(cost["device_seconds"]) == {"load", "cache", "train", "eval"}
    assert len(ids) == 1 and len(next(iter(ids))) == 16  # every method scored the same examples
    assert {m: sorted(s) for m, s in evaluated.items()} == {m: [1, 2] if METHODS[m].seeded else [1] for m in METHODS}


def test_the_report_is_recomputed_from_predictions(demo):
    root, doc = demo
    marks = recompute(root)
    assert doc["schema"] == 1 and doc["kind"] == "recipe" and doc["missing"] == []
    seeds = {name: json.loads(RunDir(root / name).config.read_text())["train"]["seed"] for name, _ in marks}
    # per run: accuracy and Wilson interval of both readings
    for entry in doc["runs"]:
        for reading in ("generated", "scored"):
            m = marks[entry["run"], entry["method"]][reading]
            if not m:
                assert entry[reading] is None and entry["method"] == "linear_probe"
                continue
            k, n = sum(m.values()), len(m)
            assert (entry[reading]["correct"], entry[reading]["n"]) == (k, n) == (k, 16)
            assert entry[reading]["wilson"] == pytest.approx(list(wilson(k, n)), abs=1e-9)
    # per cell: mean, sample std and count over seeds
    for cell in doc["cells"]:
        reading = "scored" if cell["fallback"] else cell["reading"]
        values = sorted(
            (seeds[name], 100 * sum(m[reading].values()) / 16)
            for (name, method), m in marks.items()
            if method == cell["method"]
        )
        assert cell["seeds"] == [s for s, _ in values] and cell["values"] == pytest.approx([v for _, v in values])
        assert cell["n"] == (2 if METHODS[cell["method"]].seeded else 1) and cell["deterministic"] != (cell["n"] == 2)
        assert cell["mean"] == pytest.approx(statistics.fmean(cell["values"]))
        if cell["n"] == 2:
            assert cell["std"] == pytest.approx(statistics.stdev(cell["values"]))
    # paired tests: exact McNemar on the discordant examples, Holm over each reading's family
    for reading in ("generated", "scored"):
        tests = [t for t in doc["tests"] if t["reading"] == reading]
        assert len(tests) == 2 * (len(METHODS) - 1)  # both bridge seeds against every other method
        for t in tests:
            mine = marks[t["bridge_run"], "bridge"][reading]
            theirs = (
                marks[t["baseline_run"], t["baseline"]][reading] or marks[t["baseline_run"], t["baseline"]]["scored"]
            )
            b = sum(mine[i] and not theirs[i] for i in mine)
            c = sum(theirs[i] and not mine[i] for i in mine)
            assert (t["bridge_only"], t["baseline_only"], t["n"]) == (b, c, 16)
            assert t["p"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue if b + c else 1.0)
        ordered = sorted(tests, key=lambda t: t["p"])
        running = 0.0
        for i, t in enumerate(ordered):
            running = max(running, min(1.0, (len(ordered) - i) * t["p"]))
            assert t["p_holm"] == pytest.approx(running) and t["significant"] == (running < 0.05)
    assert doc["correction"] == "Holm-Bonferroni"
    # cost: the manifests' device-seconds, summed per method
    for c in doc["cost"]:
        runs = [
            p
            for p in root.iterdir()
            if RunDir(p).is_run() and json.loads(RunDir(p).config.read_text())["method"] == c["method"]
        ]
        total = sum(sum(json.loads(RunDir(p).manifest.read_text())["cost"]["device_seconds"].values()) for p in runs)
        assert c["runs"] == len(runs) and c["total_device_seconds"] == pytest.approx(total, abs=0.01)
    md = (root / "report" / "table.md").read_text()
    assert "Holm-Bonferroni" in md and "McNemar" in md and "95% intervals" in md and "| bridge |" in md
    with Image.open(root / "report" / "table.png") as im:
        assert im.format == "PNG" and im.size == (800, 450)
    assert sorted(p.name for p in (root / "report").iterdir()) == ["table.csv", "table.json", "table.md", "table.png"]


def test_extra_seeds_for_cells_whose_seeds_disagree(demo, tmp_path):
    root, _ = demo
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("code", "slurm", "report", "checkpoints"))
    # seed 2 of the bridge answers everything right in this copy: its seeds now disagree
    (seed2,) = [p for p in copy.iterdir() if p.name.startswith("001-bridge")]
    lines = [json.loads(line) for line in RunDir(seed2).predictions.read_text().splitlines()]
    RunDir(seed2).predictions.write_text(
        "".join(json.dumps({**r, "scored_label": r["gold"], "generated_label": r["gold"]}) + "\n" for r in lines)
    )
    rc, out = cli("report", str(copy), "--extra-seeds", "--json")
    assert rc == 0
    doc = json.loads(out)
    bridge = [c for c in doc["cells"] if c["method"] == "bridge" and c["reading"] == "generated"]
    assert bridge[0]["values"][1] == 100.0 and bridge[0]["flags"][0].startswith("seeds disagree")
    (extra,) = [e for e in doc["extra_seeds"] if e["method"] == "bridge"]
    assert extra["seeds"] == [3, 4, 5] and extra["task"] == "demo"
    argv = shlex.split(extra["command"])
    assert argv[:2] == ["launch", "--recipe"] and "--steps" in argv and argv[argv.index("--seeds") + 1] == "3,4,5"
    # the printed command plans exactly those runs, inside the recipe's folder
    rc, planned = cli(*argv[1:], "--dry-run", "--json")
    assert rc == 0
    tasks = json.loads(planned)["arrays"][0]["tasks"]
    assert [(t["methods"], t["seed"]) for t in tasks] == [(["bridge"], s) for s in (3, 4, 5)]
    assert all(Path(t["run_dir"]).parent.parent == copy for t in tasks)
    rc, text = cli("report", str(copy), "--extra-seeds")
    assert rc == 0 and "add seeds 3, 4, 5" in text and "launch --recipe" in text
