"""metrics.jsonl writer, the plain progress lines, and the optional-DeepSpeed error."""

import io
import json
import sys

import pytest

from telepathy.errors import UserError
from telepathy.metrics import MetricsWriter, Progress, format_duration, read_metrics


def test_writer_appends_json_lines_on_rank0_only(tmp_path):
    import torch

    w = MetricsWriter(tmp_path / "a")
    w.write({"kind": "train", "step": 1, "loss": torch.tensor(2.5)})
    w.write({"kind": "train", "step": 2, "loss": 2.0})
    w.close()
    assert read_metrics(tmp_path / "a") == [
        {"kind": "train", "step": 1, "loss": 2.5},
        {"kind": "train", "step": 2, "loss": 2.0},
    ]
    MetricsWriter(tmp_path / "b", enabled=False).write({"kind": "train", "step": 1})
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_writer_rejects_what_json_cannot_hold(tmp_path):
    with pytest.raises(TypeError):
        MetricsWriter(tmp_path).write({"kind": "train", "step": 1, "x": object()})


def test_plain_progress_prints_every_n_steps_with_eta():
    out = io.StringIO()  # not a TTY: plain lines, as in a SLURM log
    p = Progress(total=30, start=0, every=10, stream=out)
    for step in range(1, 31):
        p.update(step, f"loss {1 / step:.3f}")
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["10/30", "20/30", "30/30"]
    assert all("steps/s" in line and "eta" in line for line in lines)
    assert "eta 0m00s" in lines[-1]


def test_durations():
    assert format_duration(59) == "0m59s" and format_duration(3725) == "1h02m" and format_duration(float("inf")) == "?"


def test_missing_deepspeed_is_a_one_line_user_error(monkeypatch):
    from telepathy.backends import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what Python does when the package is absent
    with pytest.raises(UserError, match=r"pip install telepathy\[deepspeed\]"):
        import_deepspeed()


def test_deepspeed_config_filled_from_run_config(tmp_path):
    from telepathy.backends import deepspeed_config
    from telepathy.config import RunConfig

    cfg = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir=str(tmp_path), backend="deepspeed")
    cfg = cfg.replace(train={"micro_batch": 3, "grad_accum": 5, "grad_clip": 0.5, "zero_stage": 3})
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    filled = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"])
    assert filled == (3, 5, 0.5)
    # an fp32 engine: the model's own autocast computes in bf16, as under every other backend
    assert "bf16" not in ds and "fp16" not in ds and "auto" not in json.dumps(ds)


def test_terminal_progress_is_a_live_bar():
    import os
    import select

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        p = Progress(total=5, start=1, stream=tty)
        for step in range(2, 6):
            p.update(step, f"loss {1 / step:.3f}")
        p.close()
    chunks = []
    while select.select([master], [], [], 0.2)[0]:  # the bar arrives in several writes
        try:
            chunks.append(os.read(master, 65536))
        except OSError:  # EIO once the terminal's other end is closed and drained
            break
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert "5/5" in shown and "loss 0.200" in shown and "\r" in shown  # redrawn in place, not new lines


def test_read_metrics_skips_a_line_cut_by_a_kill(tmp_path):
    from telepathy.metrics import read_metrics
    from telepathy.rundir import RunDir

    RunDir(tmp_path).metrics.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    assert read_metrics(tmp_path) == [{"kind": "train", "step": 1}]


def test_progress_plain_lines_for_any_work_with_label_unit_rate_and_eta():
    import io

    from telepathy.metrics import Progress

    out = io.StringIO()  # not a terminal: plain lines, as in SLURM logs
    p = Progress(100, every=25, stream=out, label="eval", unit="sample")
    for done in (16, 32, 48, 64, 80, 96, 100):  # chunks that never land on a multiple of 25
        p.update(done, "bridge")
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["32/100", "64/100", "80/100", "100/100"]
    assert all(line.startswith("eval ") and "samples/s" in line and "eta" in line for line in lines)
