"""Where configuration is read from: the shipped configs, and the user's own folder layered over them.

Shipped: the package's `configs/` (inside an installed wheel: telepathy/configs; in a checkout or a job's
code snapshot: the top-level configs/ beside telepathy/), or $TELEPATHY_CONFIGS. The user's folder
($TELEPATHY_CONFIG_DIR, `launch --config-dir DIR`, default $XDG_CONFIG_HOME/telepathy or
~/.config/telepathy) holds the user's own cluster profiles, tasks, recipes, models and measured memory-table
rows: a file there wins over the shipped one of the same name, the registry and the memory table add the
user's entries to the shipped ones, and everything the launcher writes goes there, never into the package.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from telepathy.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout (or the folder holding the installed packages)
PACKAGE = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """The shipped configuration folder."""
    if os.environ.get("TELEPATHY_CONFIGS"):
        return Path(os.environ["TELEPATHY_CONFIGS"])
    installed = PACKAGE / "configs"
    return installed if installed.is_dir() else REPO_ROOT / "configs"


def user_config_dir() -> Path:
    """The user's configuration folder (it need not exist)."""
    if os.environ.get("TELEPATHY_CONFIG_DIR"):
        return Path(os.environ["TELEPATHY_CONFIG_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "telepathy"


def config_file(relative: str) -> Path:
    """The user's file when it exists, else the shipped one (which may not exist either)."""
    mine = user_config_dir() / relative
    return mine if mine.is_file() else configs_dir() / relative


def config_layers(relative: str) -> list[Path]:
    """Every existing copy of a file that layers (registry, memory table): shipped first, then the user's."""
    return [p for p in (configs_dir() / relative, user_config_dir() / relative) if p.is_file()]


def config_names(folder: str, suffix: str = ".yaml") -> list[str]:
    """Names available in a configuration folder (clusters, tasks, recipes), shipped and the user's."""
    names = {p.stem for root in (configs_dir(), user_config_dir()) for p in (root / folder).glob(f"*{suffix}")}
    return sorted(names)


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
