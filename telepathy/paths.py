"""Where the project's data files live (configs/, data/); overridable for tests and snapshots."""

import os
from pathlib import Path

import yaml

from telepathy.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def configs_dir() -> Path:
    return Path(os.environ.get("TELEPATHY_CONFIGS", REPO_ROOT / "configs"))


def data_dir() -> Path:
    return Path(os.environ.get("TELEPATHY_DATA", Path(__file__).resolve().parent / "data"))


def read_yaml(path: Path, what: str, missing_fix: str):
    """A config file's YAML, or a one-line UserError naming the file (and line) and the fix."""

    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found; {missing_fix}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{what} {path} is not valid YAML{where}; fix the file") from None
