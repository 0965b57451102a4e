"""Recipes: a whole experiment as data (`configs/recipes/<name>.yaml`, or the user's folder layered over it),
expanded into the plans of every run and the array jobs that run them.

    description: what the recipe reproduces
    pairs: [llama8b-instruct-mistral7b-instruct]     registry pairs (SENDER-RECEIVER, or one alias)
    tasks: [sst2, agnews, trec]                      task names (configs/tasks) or task files
    methods: [bridge, lora, ...]                     names in telepathy.config.METHODS
    seeds: [42, 123, 456]
    soft_tokens: [32]                                K values: a row per value for bridge and prompt tuning
    gpus: 1                                          per run
    global_batch: 16                                 samples per optimizer step (micro-batch from the planner)
    settings: {steps: 1500, lr: 2.0e-4, ...}         every run, by the names of `launch`'s flags
    method_settings: {lora: {lr: 1.0e-4, gpus: 2}}   per method, over `settings`
    cost: {mfu: 0.35, decode_mfu: 0.1, peak_tflops: 989}   the dry run's GPU-hour estimate

Expansion, per pair and task: a run per seed (and K) for the methods that depend on the seed (bridge,
prompt_tuning, lora); one run for the linear probe (deterministic); the evaluation-only methods ride on the
bridge's runs (`_layout_runs`), so a deterministic one is evaluated once and k-shot once per seed.
Flags given to `launch --recipe` win over the recipe: run settings (`--steps 5`), `--gpus`, `--global-batch`,
and `--task`, `--seed`, `--soft-tokens`, `--method`, which replace the recipe's lists (as do `--seeds` and
`--methods` with several values).
Validation: a bad key or value is one line naming the file and the key. Torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.flags import RUN_FLAGS, SWITCHES, LaunchRequest, names
from launcher.plan import Plan, make_plan, run_config, task_defaults
from launcher.profiles import load_profile
from launcher.runs import check_name, runs_root
from launcher.table import load_table
from telepathy import shape
from telepathy.config import BASELINES, METHODS, DataConfig
from telepathy.data import load_spec, load_task, split_size
from telepathy.errors import UserError
from telepathy.paths import config_file, config_names, read_yaml
from telepathy.registry import Pair, load_registry

SCHEMA = 1
# Run settings a recipe's own lists decide (the flag, and the list that owns it).
LISTS = {"task": "tasks", "seed": "seeds", "soft-tokens": "soft_tokens", "method": "methods", "baselines": "methods"}
# Settings whose config field may be null (all examples; the registry's default head count or tapped layer).
NULLABLE = {"eval-samples", "train-samples", "heads", "source-layer"}
_UNSAFE = re.compile(r"[^A-Za-z0-9.+=-]+")


@dataclass(frozen=True)
class Cost:
    """How counted FLOPs become GPU-hours: model FLOPs utilisation of whole-sequence passes (training,
    prefill, label scoring) and of token-by-token decoding (memory-bound), at the GPU's dense bf16 peak."""

    mfu: float = 0.35
    decode_mfu: float = 0.10
    peak_tflops: float = 989.0  # H100 SXM, dense bf16

    def gpu_hours(self, flops: dict[str, float]) -> float:
        peak = self.peak_tflops * 1e12
        return (flops["dense"] / (self.mfu * peak) + flops["decode"] / (self.decode_mfu * peak)) / 3600


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str
    pairs: tuple[str, ...]
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    soft_tokens: tuple[int, ...] = (32,)
    gpus: int = 1
    global_batch: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # flag -> value (parsed)
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    cost: Cost = Cost()
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RecipeRun:
    """One run of a recipe: its plan and what it is in the table."""

    plan: Plan
    methods: tuple[str, ...]  # its method, then the baselines it evaluates
    task: str
    seed: int
    soft_tokens: int | None
    gpu_hours: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": Path(self.plan.run.run_dir).name,
            "run_dir": self.plan.run.run_dir,
            "methods": list(self.methods),
            "pair": self.plan.shape.pair.name,
            "task": self.task,
            "seed": self.seed,
            "soft_tokens": self.soft_tokens,
            "gpus": self.plan.layout.world_size,
            "gpu_hours": round(self.gpu_hours, 4),
        }


# ---------------------------------------------------------------------------------------------- reading


def recipe_names() -> list[str]:
    return config_names("recipes")


def _fail(path: Path, key: str, problem: str) -> UserError:
    return UserError(f"{path}: {key}: {problem}")


def _list(raw: dict, key: str, path: Path, kind: type, default=None) -> tuple:
    value = raw.get(key, default)
    if value is None:
        raise _fail(path, key, "missing; list at least one")
    value = value if isinstance(value, list) else [value]
    if not value or any(not isinstance(v, kind) or isinstance(v, bool) for v in value):
        raise _fail(path, key, f"must be a list of {kind.__name__}s (got {value!r})")
    if len(set(value)) != len(value):
        raise _fail(path, key, f"lists a value twice ({value!r})")
    return tuple(value)


def _setting(path: Path, where: str, flag: str, value: Any) -> tuple[str, Any]:
    """(flag, parsed value) of one recipe setting, by the flag table's own parser."""
    flag = str(flag).replace("_", "-")
    if flag in LISTS:
        raise _fail(path, where, f"'{flag}' is decided by the recipe's '{LISTS[flag]}' list; set it there")
    if flag in SWITCHES:
        if not isinstance(value, bool):
            raise _fail(path, where, f"'{flag}' is on or off: true or false (got {value!r})")
        return flag, value
    if flag not in RUN_FLAGS:
        known = ", ".join([*RUN_FLAGS, *SWITCHES])
        raise _fail(path, where, f"unknown setting '{flag}'; use the names of launch's flags ({known})")
    if value is None:
        if flag not in NULLABLE:
            raise _fail(path, where, f"'{flag}' cannot be null")
        return flag, None
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise _fail(path, where, f"'{flag}': {value!r} is not a single value")
    try:
        return flag, RUN_FLAGS[flag][2](str(value))
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise _fail(path, where, f"bad value {value!r} ({e})") from None


def _settings(path: Path, where: str, raw: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(path, where, "must be a mapping of setting: value")
    out = {}
    for k, v in raw.items():
        if k in extra:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _fail(path, f"{where}.{k}", f"must be a whole number >= 1 (got {v!r})")
            out[k] = v
            continue
        flag, value = _setting(path, f"{where}.{k}", k, v)
        out[flag] = value
    return out


def load_recipe(name: str) -> Recipe:
    """A recipe by name (the user's folder over the shipped one) or by path, validated."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else config_file(f"recipes/{name}.yaml")
    if not path.is_file():
        raise UserError(f"recipe '{name}' not found ({path}); available: {', '.join(recipe_names()) or 'none'}")
    raw = read_yaml(path, "recipe", "check the path")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping; see configs/recipes/demo.yaml")
    known = {f.name for f in dataclasses.fields(Recipe)} - {"name", "path"}
    for key in raw:
        if key not in known:
            raise _fail(path, str(key), f"unknown key; known: {', '.join(sorted(known))}")
    reg = load_registry()
    pairs = _list(raw, "pairs", path, str)
    for p in pairs:
        try:
            reg.pair(p)
        except UserError as e:
            raise _fail(path, "pairs", str(e)) from None
    tasks = _list(raw, "tasks", path, str)
    for t in tasks:
        try:
            task_defaults(t)
        except UserError as e:
            raise _fail(path, "tasks", str(e)) from None
    methods = _list(raw, "methods", path, str)
    for m in methods:
        if m not in METHODS:
            raise _fail(path, "methods", f"unknown method '{m}'; use any of {', '.join(METHODS)}")
    seeds = _list(raw, "seeds", path, int)
    soft_tokens = _list(raw, "soft_tokens", path, int, default=[Recipe.soft_tokens[0]])
    if any(k < 1 for k in soft_tokens):
        raise _fail(path, "soft_tokens", f"must be >= 1 (got {list(soft_tokens)})")
    scalars = {}
    for key in ("gpus", "global_batch"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise _fail(path, key, f"must be a whole number >= 1 (got {v!r})")
        if v is not None:
            scalars[key] = v
    method_settings = {}
    raw_ms = raw.get("method_settings") or {}
    if not isinstance(raw_ms, dict):
        raise _fail(path, "method_settings", "must map method names to settings")
    for m, s in raw_ms.items():
        if m not in METHODS:
            raise _fail(path, f"method_settings.{m}", f"unknown method; use any of {', '.join(METHODS)}")
        method_settings[m] = _settings(path, f"method_settings.{m}", s, extra=("gpus", "global_batch"))
    raw_cost = raw.get("cost") or {}
    if not isinstance(raw_cost, dict):
        raise _fail(path, "cost", "must be a mapping (mfu, decode_mfu, peak_tflops)")
    for k, v in raw_cost.items():
        if k not in {f.name for f in dataclasses.fields(Cost)}:
            raise _fail(path, f"cost.{k}", "unknown; use mfu, decode_mfu, peak_tflops")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 or (k.endswith("mfu") and v > 1):
            raise _fail(path, f"cost.{k}", f"must be a positive number{' up to 1' if k.endswith('mfu') else ''}")
    recipe = Recipe(
        name=path.stem,
        path=str(path),
        pairs=pairs,
        tasks=tasks,
        methods=methods,
        seeds=seeds,
        soft_tokens=soft_tokens,
        settings=_settings(path, "settings", raw.get("settings")),
        method_settings=method_settings,
        cost=Cost(**{k: float(v) for k, v in raw_cost.items()}),
        description=str(raw.get("description") or ""),
        **scalars,
    )
    return recipe


# ---------------------------------------------------------------------------------------------- expanding


def _sections(settings: dict[str, Any]) -> dict[str, Any]:
    """Flag -> value as RunConfig.replace() sections (top-level fields for section "")."""
    out: dict[str, Any] = {}
    for flag, value in settings.items():
        section, name = SWITCHES[flag] if flag in SWITCHES else RUN_FLAGS[flag][:2]
        if section:
            out.setdefault(section, {})[name] = value
        else:
            out[name] = value
    return out


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if isinstance(v, dict):
                out.setdefault(k, {}).update(v)
            else:
                out[k] = v
    return out


def with_cli(recipe: Recipe, request: LaunchRequest, methods: str | None, seeds: str | None) -> Recipe:
    """The recipe with the command line's lists: --methods, --seeds, and the run flags that name one value of a
    list (--task, --seed, --soft-tokens, --method)."""
    o = request.overrides
    changes: dict[str, Any] = {}
    if methods or o.get("method"):
        chosen = names(methods) if methods else (o["method"],)
        bad = [m for m in chosen if m not in METHODS]
        if bad:
            raise UserError(f"--methods: unknown method '{bad[0]}'; use any of {', '.join(METHODS)}")
        changes["methods"] = chosen
    if seeds or o.get("train", {}).get("seed") is not None:
        try:
            changes["seeds"] = tuple(int(s) for s in names(seeds)) if seeds else (o["train"]["seed"],)
        except ValueError:
            raise UserError(f"--seeds {seeds!r}: give comma-separated whole numbers, e.g. --seeds 1,2,3") from None
        if not changes["seeds"] or len(set(changes["seeds"])) != len(changes["seeds"]):
            raise UserError(f"--seeds {seeds!r}: give each seed once")
    if o.get("data", {}).get("task"):
        changes["tasks"] = (o["data"]["task"],)
    if o.get("bridge", {}).get("soft_tokens"):
        changes["soft_tokens"] = (o["bridge"]["soft_tokens"],)
    if o.get("eval", {}).get("baselines") is not None:
        raise UserError("--baselines does not go with --recipe: list the methods in the recipe (or --methods)")
    return dataclasses.replace(recipe, **changes)


def _cli_sections(request: LaunchRequest) -> dict[str, Any]:
    """The command line's run settings, without what the recipe's lists decide."""
    drop = {("data", "task"), ("train", "seed"), ("bridge", "soft_tokens"), ("", "method"), ("eval", "baselines")}
    out: dict[str, Any] = {}
    for k, v in request.overrides.items():
        if isinstance(v, dict):
            kept = {f: x for f, x in v.items() if (k, f) not in drop}
            if kept:
                out[k] = kept
        elif ("", k) not in drop:
            out[k] = v
    return out


def _layout_runs(recipe: Recipe) -> list[dict[str, Any]]:
    """Every run as (pair, task, methods, seed, K), in table order. Per pair and task: the trained methods in
    the recipe's order, a run per seed (and K) of each seeded one. The evaluation-only methods ride on the
    bridge's runs of the first K, which hold the receiver and the sender's body already (the full sender is
    completed from it): its first seed's run evaluates every one of them, the others only the seeded ones
    (k-shot), so a deterministic method is evaluated once, on the very examples the bridge is. Without a
    bridge in the recipe they get runs of their own, grouped the same way."""
    out = []
    trained = [m for m in recipe.methods if METHODS[m].trains]
    evaluated = [m for m in recipe.methods if m in BASELINES]

    def riders(i: int) -> tuple[str, ...]:
        return tuple(m for m in evaluated if METHODS[m].seeded or i == 0)

    for pair in recipe.pairs:
        for task in recipe.tasks:
            for m in trained:
                ks = recipe.soft_tokens if m in ("bridge", "prompt_tuning") else (None,)
                seeds = recipe.seeds if METHODS[m].seeded else recipe.seeds[:1]
                for k in ks:
                    for i, s in enumerate(seeds):
                        host = m == "bridge" and k == ks[0]
                        out.append(dict(pair=pair, task=task, methods=(m, *(riders(i) if host else ())), seed=s, k=k))
            if "bridge" not in trained:
                for i, seed in enumerate(recipe.seeds):
                    if riders(i):
                        out.append(dict(pair=pair, task=task, methods=riders(i), seed=seed, k=None))
    return out


def _run_name(index: int, run: dict[str, Any], many_pairs: bool) -> str:
    first = run["methods"][0]
    what = first if METHODS[first].trains or len(run["methods"]) == 1 else "eval"
    task = Path(run["task"]).stem if run["task"].endswith((".jsonl", ".csv", ".yaml")) else run["task"]
    parts = ([run["pair"]] if many_pairs else []) + [what, task] + ([f"k{run['k']}"] if run["k"] else [])
    return f"{index:03d}-" + _UNSAFE.sub("_", "-".join(parts + [f"s{run['seed']}"]))[:96]


def default_name(recipe: Recipe) -> str:
    return check_name(f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def recipe_runs(
    recipe: Recipe, request: LaunchRequest, gpus: int | None = None
) -> tuple[Path, list[RecipeRun], dict[int, Path]]:
    """(the recipe's run folder, every run with its plan and cost, the folder that submits each GPU count's
    array: the run folder itself when every run has the same layout, else one sub-folder per GPU count).
    `gpus`: the command line's --gpus, which wins over the recipe's."""
    if request.mode != "slurm":
        raise UserError("a recipe runs as SLURM array jobs; drop --debug/--local (or run one configuration alone)")
    reg = load_registry()
    profile = load_profile(request.cluster, request.profile_overrides)
    table = load_table()
    name = check_name(request.name) if request.name else default_name(recipe)
    root = runs_root(request.runs_dir) / name
    cli = _cli_sections(request)
    layout = _layout_runs(recipe)

    def gpus_of(methods: tuple[str, ...]) -> int:
        if gpus is not None:
            return gpus
        return recipe.method_settings.get(methods[0], {}).get("gpus", recipe.gpus)

    counts = sorted({gpus_of(r["methods"]) for r in layout})
    folders = {g: root if len(counts) == 1 else root / f"gpus{g}" for g in counts}
    many_pairs = len(recipe.pairs) > 1
    runs = []
    sizes: dict[str, tuple[int, int, int]] = {}
    for index, r in enumerate(layout):
        pair: Pair = reg.pair(r["pair"])
        method, baselines = r["methods"][0], r["methods"][1:]
        per_method = {
            k: v for k, v in recipe.method_settings.get(method, {}).items() if k in RUN_FLAGS or k in SWITCHES
        }
        fixed: dict[str, Any] = {
            "method": method,
            "data": {"task": r["task"]},
            "train": {"seed": r["seed"]},
            "eval": {"baselines": baselines},
        }
        if r["k"] is not None:
            fixed["bridge"] = {"soft_tokens": r["k"]}
        base = _merge(_sections(recipe.settings), _sections(per_method))
        if method != "bridge":  # the sender cache feeds the bridge alone (RunConfig refuses it elsewhere)
            base.get("train", {}).pop("sender_cache", None)
        gpus = gpus_of(r["methods"])
        run_name = _run_name(index, r, many_pairs)
        run_dir = folders[gpus] / run_name
        req = dataclasses.replace(request, overrides=base, gpus=gpus)
        try:
            cfg = run_config(req, pair, run_dir, f"{name}.{run_name}", _merge(cli, fixed))
        except UserError as e:
            raise UserError(f"{recipe.path}: run {run_name}: {e}") from None
        global_batch = (
            request.global_batch or recipe.method_settings.get(method, {}).get("global_batch") or recipe.global_batch
        )
        plan = make_plan(
            pair,
            cfg,
            gpus=gpus,
            profile=profile,
            mode="slurm",
            global_batch=global_batch,
            micro_batch=request.micro_batch,
            table=table,
        )
        if r["task"] not in sizes:
            sizes[r["task"]] = _sizes(r["task"])
        n_train, n_eval, n_labels = sizes[r["task"]]
        d = plan.run.data
        n_train = min(n_train, d.train_samples or n_train)
        n_eval = min(n_eval, d.eval_samples or n_eval)
        flops = shape.run_flops(plan.run, pair, plan.batch.global_batch, n_train, n_eval, n_labels)
        runs.append(RecipeRun(plan, r["methods"], r["task"], r["seed"], r["k"], recipe.cost.gpu_hours(flops)))
    return root, runs, folders


def _sizes(task: str) -> tuple[int, int, int]:
    """(train, eval, labels) of a task for the cost estimate: a hub task's `sizes` (0 where the spec has
    none), a local task's files counted."""
    spec = None if task.endswith((".jsonl", ".csv")) else load_spec(task)
    if spec is not None and spec.dataset:
        return split_size(spec, "train") or 0, split_size(spec, "eval") or 0, len(spec.labels)
    t = load_task(DataConfig(task=task))
    return len(t.train), len(t.eval), len(t.spec.labels)


def arrays(runs: list[RecipeRun], folders: dict[int, Path]) -> list[tuple[Path, list[RecipeRun]]]:
    """The array jobs: one per GPU count (a homogeneous resource layout), each with its submitting folder."""
    by: dict[int, list[RecipeRun]] = {}
    for r in runs:
        by.setdefault(r.plan.layout.world_size, []).append(r)
    return [(folders[g], members) for g, members in sorted(by.items())]


def command_flags(request: LaunchRequest, gpus: int | None) -> list[str]:
    """The command line's settings as flags again (what `launch report --extra-seeds` repeats, so added runs
    are planned exactly as the first ones): run settings, layout, cluster and profile overrides."""
    by_field = {(section, name): flag for flag, (section, name, _) in RUN_FLAGS.items()}
    by_field |= {(section, name): flag for flag, (section, name) in SWITCHES.items()}
    out: list[str] = []
    for key, value in sorted(_cli_sections(request).items()):
        section, items = (key, value.items()) if isinstance(value, dict) else ("", [(key, value)])
        for name, x in sorted(items):
            flag = by_field[(section, name)]
            if isinstance(x, bool):
                out.append(f"--{flag}" if x else f"--no-{flag}")
            else:
                out += [f"--{flag}", ",".join(x) if isinstance(x, tuple) else str(x)]
    for flag, value in (("gpus", gpus), ("global-batch", request.global_batch), ("micro-batch", request.micro_batch)):
        if value is not None:
            out += [f"--{flag}", str(value)]
    if request.backend != "ddp":
        out += ["--backend", request.backend]
    if request.cluster:
        out += ["--cluster", request.cluster]
    for k, v in request.profile_overrides.items():
        if v is not None:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def record(
    root: Path, recipe: Recipe, request: LaunchRequest, runs: list[RecipeRun], gpus: int | None = None
) -> dict[str, Any]:
    """What recipe.json holds: the recipe as resolved, the command line's changes (and as flags), every run."""
    return {
        "schema": SCHEMA,
        "recipe": recipe.to_dict(),
        "root": str(root),
        "overrides": json.loads(json.dumps(request.overrides)),
        "flags": command_flags(request, gpus),
        "runs": [r.to_dict() for r in runs],
        "gpu_hours": round(sum(r.gpu_hours for r in runs), 3),
    }
