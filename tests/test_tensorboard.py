"""TensorBoard event files beside metrics.jsonl, read back with tensorboard's own EventAccumulator."""

import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from telepathy import tb


def scalars_of(run_dir):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_records_become_scalars(tmp_path):
    sink = tb.TensorBoardSink(tmp_path)
    for step in (1, 2, 3):
        sink.write(
            {
                "step": step,
                "loss": 3.0 - step,
                "lr": 1e-4 * step,
                "grad_norm": 0.5,
                "samples_per_s": 10.0 * step,
                "memory": {"rss_gib": 1.25},
                "note": "text is skipped",
                "nan": float("nan"),
                "flag": True,
            }
        )
    sink.write({"kind": "eval", "step": 3, "accuracy": 75.0})
    sink.write({"loss": 9.0})  # no step: nothing to plot it against
    sink.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    s = scalars_of(tmp_path)
    assert set(s) == {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "train/memory/rss_gib",
        "eval/accuracy",
    }
    assert s["train/loss"] == [(1, 2.0), (2, 1.0), (3, 0.0)]
    assert [v for _, v in s["train/samples_per_s"]] == [10.0, 20.0, 30.0]
    assert s["train/memory/rss_gib"][0][1] == 1.25
    assert s["eval/accuracy"] == [(3, 75.0)]


def test_disabled_writes_nothing(tmp_path):
    sink = tb.TensorBoardSink(tmp_path, enabled=False)
    sink.write({"step": 1, "loss": 1.0})
    sink.close()
    assert not sink.active and not list(tmp_path.iterdir())


def test_missing_tensorboard_says_so_once_and_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an uninstalled package looks like
    monkeypatch.setattr(tb, "_warned", False)
    sinks = [tb.TensorBoardSink(tmp_path / str(i)) for i in range(2)]
    for s in sinks:
        s.write({"step": 1, "loss": 1.0})
        s.close()
    err = capsys.readouterr().err
    assert err.count("TensorBoard logging off") == 1
    assert not any(s.active for s in sinks)
