"""`launch report` on real trainer output: run plots and eval table, sweep tables (mean ± std over seeds),
missing runs, and no torch import by the CLI.

One real debug run (tiny-llama -> tiny-qwen, demo task, a few steps, real evaluation) per module; sweeps
are copies of it with the configuration and the numbers changed, so they keep the trainer's real schema.
"""

import csv
import json
import shutil
import statistics
import subprocess
import sys

import pytest
from conftest import REPO
from PIL import Image

from launcher.plan import make_plan
from launcher.profiles import load_profile
from launcher.sweep import expand_sweep
from telepathy import manifest, report
from telepathy.config import RunConfig
from telepathy.metrics import eval_record
from telepathy.registry import load_registry

PNG_SIZE = (800, 450)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A run folder written by the real trainer: config.json, plan.json, metrics.jsonl, eval.json."""
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    cfg = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir=str(run_dir), name="demo").replace(
        train={"steps": 6, "log_every": 2, "warmup_steps": 2, "checkpoint_every": 100},
        data={"task": "demo", "eval_samples": 8},
        eval={"latency_samples": 1, "relay_tokens": 8, "max_new_tokens": 4},
    )
    pair = load_registry().pair("tiny-llama-tiny-qwen")
    plan = make_plan(pair, cfg, gpus=1, profile=load_profile("local"), mode="debug")
    plan.write()
    from telepathy.train import run

    run(plan.run)
    return run_dir


def run_cli(*args):
    """The real CLI in a fresh interpreter, which must not have imported torch or transformers."""
    code = (
        "import sys; from launcher.cli import main; rc = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {heavy}') if heavy else sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def assert_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == PNG_SIZE
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # something was drawn


# ---- one run ------------------------------------------------------------------------------------------


def test_run_report_plots_and_eval_table(real_run, tmp_path):
    r = run_cli("report", str(real_run), "--json", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["schema"], out["kind"], out["missing"]) == (1, "run", [])
    names = [p.rsplit("/", 1)[-1] for p in out["written"]]
    assert names == ["loss.png", "throughput.png", "memory.png", "eval.md", "eval.csv"]
    for name in names[:3]:
        assert_png(tmp_path / "out" / name)

    ev = json.loads((real_run / "eval.json").read_text())
    assert [row["method"] for row in out["rows"]] == list(ev["methods"])
    with open(tmp_path / "out" / "eval.csv") as f:
        table = {row["method"]: row for row in csv.DictReader(f)}
    for method, result in ev["methods"].items():
        assert float(table[method]["accuracy"]) == pytest.approx(100 * result["accuracy"])
        assert int(table[method]["unmatched"]) == result["unmatched"]
        lat = ev["latency_ms"].get(method)
        assert (float(table[method]["latency_ms"]) if table[method]["latency_ms"] else None) == (
            pytest.approx(lat["median"]) if lat else None
        )
    md = (tmp_path / "out" / "eval.md").read_text()
    assert f"task demo: n={ev['n']}" in md and f"| bridge | {100 * ev['accuracy']['bridge']:.1f} |" in md


def test_run_by_name_under_the_runs_folder(real_run, tmp_path):
    r = run_cli("report", real_run.name, "--runs-dir", str(real_run.parent), "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(real_run)


def test_memory_plot_compares_the_plans_prediction_with_measurements(real_run):
    run = report.load_run(real_run)
    plan = json.loads((real_run / "plan.json").read_text())
    assert report.predicted_gib(run) == pytest.approx(plan["run"]["predicted_peak_gib"])
    measured = report.measured_memory(run.metrics)
    assert list(measured) == ["loaded", "first_step"]
    assert all(v > 0 for m in measured.values() for v in m.values())


def test_run_without_results_yet(real_run, tmp_path):
    """A run still training: plots from what is there, the table missing and said so."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "plan.json"):
        shutil.copy(real_run / name, partial / name)
    lines = (real_run / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    rep = report.report(partial)
    assert [p.name for p in rep.written] == ["loss.png", "throughput.png", "memory.png"]
    assert rep.missing == ["partial"] and any("no evaluation yet" in n for n in rep.notes)


def test_requeued_run_plots_the_resumed_attempt(real_run):
    """After a requeue the steps past the last checkpoint are logged again, later in metrics.jsonl."""
    run = report.load_run(real_run)
    train = [r for r in run.metrics if r["kind"] == "train"]
    again = [{**r, "loss": r["loss"] + 100.0} for r in train[-2:]]  # the resumed attempt's records
    steps, losses = report.series(run.metrics + again, "loss")
    assert steps == [r["step"] for r in train]
    assert losses == [r["loss"] for r in train[:-2]] + [r["loss"] for r in again]


# ---- sweeps -------------------------------------------------------------------------------------------

# bridge accuracy (fraction) per (soft_tokens, seed); (32, 3) has not finished (no eval.json)
BRIDGE = {(8, 1): 0.90, (8, 2): 0.92, (8, 3): 0.94, (32, 1): 0.80, (32, 2): 0.81, (32, 3): None}
LATENCY = {1: 10.0, 2: 12.0, 3: 17.0}  # bridge median ms per seed
UNFINISHED = "005-soft-tokens=32-seed=3"


def copy_run(real_run, run_dir, overrides, bridge_acc):
    """The real run, re-labelled as one task of a sweep (RunConfig overrides), with chosen bridge numbers."""
    run_dir.mkdir(parents=True)
    cfg = RunConfig.load(real_run / "config.json").replace(**overrides, run_dir=str(run_dir), name=run_dir.name)
    cfg.save(run_dir / "config.json")
    shutil.copy(real_run / "metrics.jsonl", run_dir / "metrics.jsonl")
    if bridge_acc is not None:
        ev = json.loads((real_run / "eval.json").read_text())
        ev["methods"]["bridge"]["accuracy"] = ev["accuracy"]["bridge"] = bridge_acc
        ev["latency_ms"]["bridge"]["median"] = LATENCY[cfg.train.seed]
        (run_dir / "eval.json").write_text(json.dumps(ev))


def make_sweep(real_run, root, specs, accuracy):
    """Task folders named and configured as `launch --sweep` does (launcher.sweep.expand_sweep)."""
    names = []
    for name, overrides in expand_sweep(specs):
        cfg = RunConfig.load(real_run / "config.json").replace(**overrides)
        copy_run(real_run, root / name, overrides, accuracy(cfg))
        names.append(name)
    return names


@pytest.fixture
def sweep(real_run, tmp_path):
    root = tmp_path / "sweep"
    names = make_sweep(
        real_run, root, ["soft_tokens=8,32", "seed=1,2,3"], lambda cfg: BRIDGE[cfg.bridge.soft_tokens, cfg.train.seed]
    )
    assert names[-1] == UNFINISHED
    return root


def test_sweep_table_mean_std_over_seeds_and_missing_runs(sweep, real_run):
    r = run_cli("report", str(sweep), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["schema"], out["kind"]) == (1, "sweep")
    assert out["missing"] == [UNFINISHED] and out["states"] == {UNFINISHED: "not started"}
    assert [row["config"] for row in out["rows"]] == [{"bridge.soft_tokens": 8}, {"bridge.soft_tokens": 32}]
    rows = {row["config"]["bridge.soft_tokens"]: row for row in out["rows"]}
    assert rows[8]["seeds"] == [1, 2, 3] and rows[32]["seeds"] == [1, 2]
    assert rows[32]["pending"] == [UNFINISHED]
    acc8 = rows[8]["methods"]["bridge"]["accuracy"]
    assert (acc8["mean"], acc8["std"], acc8["n"]) == (pytest.approx(92.0), pytest.approx(2.0), 3)
    acc32 = rows[32]["methods"]["bridge"]["accuracy"]
    assert (acc32["mean"], acc32["std"]) == (pytest.approx(80.5), pytest.approx(statistics.stdev([80.0, 81.0])))
    lat8 = rows[8]["methods"]["bridge"]["latency_ms"]
    assert (lat8["mean"], lat8["std"]) == (pytest.approx(13.0), pytest.approx(statistics.stdev([10.0, 12.0, 17.0])))
    # baselines are the real run's, identical in every copy: std 0 over three seeds
    ev = json.loads((real_run / "eval.json").read_text())
    assert rows[8]["methods"]["receiver"]["accuracy"] == {
        "mean": pytest.approx(100 * ev["accuracy"]["receiver"]),
        "std": 0.0,
        "n": 3,
    }

    md = (sweep / "report" / "summary.md").read_text()
    assert md.splitlines()[0].startswith("| soft_tokens | seeds | bridge acc (%) |")
    assert "| 8 | 3 | 92.0 ± 2.0 |" in md and "| 32 | 2 | 80.5 ± 0.7 |" in md
    assert "13.0 ± 3.6" in md  # bridge latency
    assert UNFINISHED in md
    with open(sweep / "report" / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["soft_tokens"] for t in table] == ["8", "32"]
    assert float(table[0]["bridge_accuracy_mean"]) == pytest.approx(92.0)
    assert float(table[0]["bridge_accuracy_std"]) == pytest.approx(2.0)
    assert float(table[1]["bridge_accuracy_std"]) == pytest.approx(statistics.stdev([80.0, 81.0]))
    assert "receiver_latency_ms_mean" not in table[0]  # not timed by evaluate.py: no empty column

    assert str(sweep / "report" / "accuracy.png") in out["written"]
    assert_png(sweep / "report" / "accuracy.png")


def test_sweep_with_nothing_finished_still_reports(real_run, tmp_path):
    root = tmp_path / "sweep"
    names = make_sweep(real_run, root, ["seed=1,2,3"], lambda cfg: None)
    manifest.start(RunConfig.load(root / names[1] / "config.json"))  # started, still running
    manifest.start(RunConfig.load(root / names[2] / "config.json"))
    manifest.finish(root / names[2], "failed", MemoryError())
    r = run_cli("report", str(root))
    assert r.returncode == 0, r.stderr
    assert (
        f"missing: 3 run(s) have no evaluation yet: {names[0]} (not started), {names[1]} (running), "
        f"{names[2]} (failed (MemoryError))"
    ) in r.stdout
    assert sorted(p.name for p in (root / "report").iterdir()) == ["summary.csv", "summary.md"]  # no plot


def test_seed_only_sweep_is_one_configuration(real_run, tmp_path):
    root = tmp_path / "sweep"
    make_sweep(real_run, root, ["seed=1,2"], lambda cfg: {1: 0.70, 2: 0.74}[cfg.train.seed])
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


# ---- TensorBoard from the same records ------------------------------------------------------------------


def test_tensorboard_event_files_of_a_real_run(real_run, tmp_path):
    """The trainer's own event files (written beside metrics.jsonl through MetricsWriter), read back with
    tensorboard's EventAccumulator; and the evaluation as a metrics record through the same sink."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from telepathy.metrics import read_metrics
    from telepathy.tb import TensorBoardSink

    def scalars(folder):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    records = read_metrics(real_run)
    got = scalars(real_run)
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "train/tokens_per_s",
        "memory/rss_gib",
        "memory/predicted_peak_gib",
    } <= set(got)
    train = [r for r in records if r["kind"] == "train"]
    assert got["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert got["train/lr"] == [(r["step"], pytest.approx(r["lr"])) for r in train]

    ev = json.loads((real_run / "eval.json").read_text())
    sink = TensorBoardSink(tmp_path)
    sink.write(eval_record(ev, step=train[-1]["step"]))
    sink.close()
    got = scalars(tmp_path)
    assert got["eval/accuracy/bridge"] == [(train[-1]["step"], pytest.approx(100 * ev["accuracy"]["bridge"]))]
    assert got["eval/latency_ms/bridge"][0][1] == pytest.approx(ev["latency_ms"]["bridge"]["median"])


def test_real_run_manifest_and_eval_in_tensorboard(real_run):
    from telepathy.metrics import read_metrics

    assert manifest.load(real_run)["exit"] == {"state": "completed"}
    assert read_metrics(real_run)[-1]["kind"] == "eval"
