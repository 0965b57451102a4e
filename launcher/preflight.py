"""Before anything is written or submitted: is everything the runs read from the Hub in the cache their jobs
see? Offline profiles (the default) read nothing else, so a miss here would otherwise surface on every rank
of every task after hours in the queue. The same lists drive `launch prefetch`."""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from telepathy import hub
from telepathy.data import load_spec
from telepathy.errors import UserError
from telepathy.registry import load_registry


@dataclass(frozen=True)
class Gap:
    need: hub.Need
    missing: list[str]


def needs(models: Iterable[str], tasks: Iterable[str]) -> list[hub.Need]:
    """The hub repositories these models (aliases, hub ids, folders) and tasks read, each once."""
    reg = load_registry()
    found: dict[tuple, hub.Need] = {}
    for model in models:
        need = hub.model_need(reg.get(model))
        if need:
            found.setdefault((need.repo_type, need.repo_id, need.revision), need)
    for task in tasks:
        if task.endswith((".jsonl", ".csv")):
            continue
        need = hub.task_need(load_spec(task))
        if need:
            found.setdefault((need.repo_type, need.repo_id, need.revision), need)
    return list(found.values())


def plan_needs(plans) -> list[hub.Need]:
    runs = [p.run for p in plans]
    return needs([m for r in runs for m in (r.sender, r.receiver)], [r.data.task for r in runs])


def gaps(wanted: list[hub.Need], cache: Path) -> list[Gap]:
    return [Gap(n, m) for n in wanted if (m := hub.missing(n, cache))]


def fix_command(wanted: list[hub.Need], cluster: str | None = None, hf_home: str | None = None) -> str:
    models = sorted({n.name for n in wanted if n.repo_type == "model"})
    tasks = sorted({n.name for n in wanted if n.repo_type == "dataset"})
    argv = ["launch", "prefetch", *(a for m in models for a in ("--model", m))]
    argv += [a for t in tasks for a in ("--task", t)]
    if cluster:
        argv += ["--cluster", cluster]
    elif hf_home:
        argv += ["--hf-home", hf_home]
    return shlex.join(argv)


def check_plans(plans, *, cluster: str | None) -> None:
    """The preflight: a one-line error naming what is missing and the command that fetches it."""
    profile = plans[0].profile
    if not profile.offline:
        return  # the nodes download what they need themselves
    wanted = plan_needs(plans)
    if not wanted:
        return
    cache = hub.hub_cache(profile.hf_home)
    missing = gaps(wanted, cache)
    if missing:
        first = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(
            f"{first.need.what} ({first.need.label}) is not in the Hugging Face cache {cache}{more}, which the "
            f"{'jobs read' if plans[0].mode == 'slurm' else 'run reads'} offline; fetch it first on a machine that "
            f"reaches the Hub: {fix_command([g.need for g in missing], cluster, profile.hf_home)}"
        )
