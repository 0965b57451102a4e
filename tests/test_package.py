"""The wheel as a shared cluster environment installs it: built from this checkout, installed non-editable into
a fresh virtual environment (its dependencies taken from this one), and run from an unrelated folder."""

import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO


def test_the_installed_wheel_plans_and_trains_from_any_folder(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("telepathy-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # dependencies (torch, transformers, ...) from this environment; not its editable telepathy (a path in a
    # .pth file does not run the .pth files inside it, so the editable finder stays out)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = subprocess.run(
        [str(python), "-c", "import launcher, telepathy.paths as p; print(launcher.__file__); print(p.configs_dir())"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        check=True,
    )
    module, configs = where.stdout.split()
    assert module.startswith(str(site)) and configs == str(site / "telepathy" / "configs")

    launch = str(venv / "bin" / "launch")
    dry = subprocess.run(
        [launch, "--pair", "llama3b-qwen3b", "--gpus", "4", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    assert "table row llama3b-qwen3b" in dry.stdout and f"TELEPATHY_CONFIGS={elsewhere}" in dry.stdout
    recipe = subprocess.run(  # the shipped recipes are package data
        [launch, "--recipe", "table1", "--dry-run"], capture_output=True, text=True, cwd=elsewhere, timeout=120
    )
    assert recipe.returncode == 0, recipe.stderr
    assert f"({site / 'telepathy' / 'configs' / 'recipes' / 'table1.yaml'})" in recipe.stdout

    run = subprocess.run(
        [
            launch,
            "--pair",
            "tiny-llama-tiny-qwen",
            "--task",
            "demo",
            "--debug",
            "--steps",
            "2",
            "--eval-samples",
            "4",
            "--baselines",
            "",
            "--latency-samples",
            "0",
            "--name",
            "w",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (elsewhere / "runs" / "w" / "eval.json").is_file() and "task demo: n=4" in run.stdout
