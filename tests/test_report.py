"""`launch report`: sweep tables (mean ± std over seeds), missing runs, PNGs, and no torch import."""

import csv
import json
import statistics
import subprocess
import sys

import pytest
from PIL import Image

from telepathy import report
from telepathy.config import RunConfig

from conftest import REPO

# bridge accuracy per (soft_tokens, seed); (32, 3) has not finished (no eval.json)
BRIDGE = {(8, 1): 90.0, (8, 2): 92.0, (8, 3): 94.0, (32, 1): 80.0, (32, 2): 81.0, (32, 3): None}
LATENCY = {1: 10.0, 2: 12.0, 3: 17.0}


def write_run(run_dir, soft_tokens, seed, bridge_acc):
    cfg = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir=str(run_dir), name=run_dir.name)
    cfg.replace(bridge={"soft_tokens": soft_tokens}, train={"seed": seed}).save(run_dir / "config.json")
    if bridge_acc is not None:
        ev = {"methods": {"bridge": {"accuracy": bridge_acc, "latency_ms": LATENCY[seed]},
                          "receiver": {"accuracy": 50.0, "latency_ms": 8.0}}}
        (run_dir / "eval.json").write_text(json.dumps(ev))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for (k, seed), acc in BRIDGE.items():
        write_run(root / f"soft_tokens={k},seed={seed}", k, seed, acc)
    return root


def run_cli(*args):
    """The real CLI in a fresh interpreter, which must not have imported torch or transformers."""
    code = ("import sys; from launcher.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "sys.exit(f'imported {heavy}') if heavy else sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_sweep_table_mean_std_over_seeds_and_missing_runs(sweep):
    r = run_cli("report", str(sweep), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema"] == 1 and out["kind"] == "sweep"
    assert out["missing"] == ["soft_tokens=32,seed=3"]
    rows = {row["config"]["bridge.soft_tokens"]: row for row in out["rows"]}
    assert [row["config"] for row in out["rows"]] == [{"bridge.soft_tokens": 8}, {"bridge.soft_tokens": 32}]
    assert rows[8]["seeds"] == [1, 2, 3] and rows[32]["seeds"] == [1, 2]
    assert rows[32]["pending"] == ["soft_tokens=32,seed=3"]
    acc8 = rows[8]["methods"]["bridge"]["accuracy"]
    assert acc8["mean"] == pytest.approx(92.0) and acc8["std"] == pytest.approx(2.0) and acc8["n"] == 3
    acc32 = rows[32]["methods"]["bridge"]["accuracy"]
    assert acc32["mean"] == pytest.approx(80.5) and acc32["std"] == pytest.approx(statistics.stdev([80.0, 81.0]))
    lat8 = rows[8]["methods"]["bridge"]["latency_ms"]
    assert lat8["mean"] == pytest.approx(13.0) and lat8["std"] == pytest.approx(statistics.stdev([10.0, 12.0, 17.0]))
    assert rows[8]["methods"]["receiver"]["accuracy"] == {"mean": 50.0, "std": 0.0, "n": 3}

    md = (sweep / "report" / "summary.md").read_text()
    assert "| 8 | 3 | 92.0 ± 2.0 | 50.0 ± 0.0 | 13.0 ± 3.6 | 8.0 ± 0.0 |" in md
    assert "| 32 | 2 | 80.5 ± 0.7 |" in md
    assert "soft_tokens=32,seed=3" in md
    with open(sweep / "report" / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["soft_tokens"] for t in table] == ["8", "32"]
    assert float(table[0]["bridge_accuracy_mean"]) == pytest.approx(92.0)
    assert float(table[0]["bridge_accuracy_std"]) == pytest.approx(2.0)
    assert float(table[1]["bridge_accuracy_std"]) == pytest.approx(statistics.stdev([80.0, 81.0]))

    png = sweep / "report" / "accuracy.png"
    assert str(png) in out["written"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 450)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # drawn, not blank


def test_sweep_with_nothing_finished_still_reports(tmp_path):
    root = tmp_path / "sweep"
    for seed in (1, 2):
        write_run(root / f"seed={seed}", 8, seed, None)
    rep = report.report(root)
    assert rep.missing == ["seed=1", "seed=2"]
    assert [p.name for p in rep.written] == ["summary.md", "summary.csv"]  # no plot without a result


def test_only_seed_sweep_is_one_configuration(tmp_path):
    root = tmp_path / "sweep"
    for seed, acc in ((1, 70.0), (2, 74.0)):
        write_run(root / f"seed={seed}", 8, seed, acc)
    rep = report.report(root, tmp_path / "out")
    assert len(rep.rows) == 1 and rep.rows[0]["config"] == {}
    assert rep.rows[0]["methods"]["bridge"]["accuracy"]["mean"] == pytest.approx(72.0)
    assert (tmp_path / "out" / "summary.csv").exists()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_folder_is_one_line_exit_2(tmp_path, make):
    path = tmp_path / "nothing"
    if make == "empty":
        path.mkdir()
    r = run_cli("report", str(path))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
