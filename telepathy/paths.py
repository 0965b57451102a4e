"""Where the project's data files live (configs/, data/); overridable for tests and snapshots."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def configs_dir() -> Path:
    return Path(os.environ.get("TELEPATHY_CONFIGS", REPO_ROOT / "configs"))


def data_dir() -> Path:
    return Path(os.environ.get("TELEPATHY_DATA", Path(__file__).resolve().parent / "data"))
