"""`launch [run]`: resolve pair, plan, then dry-run, debug (in-process), local (torchrun) or SLURM submission."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.plan import MODES, Plan, make_plan, torchrun_command
from launcher.profiles import OVERRIDABLE, add_profile_flags, load_profile
from launcher.table import load_table
from launcher.rundir import check_name, default_name, runs_root, write_run_files
from telepathy.config import BACKENDS, BridgeConfig, DataConfig, EvalConfig, RunConfig, TrainConfig
from telepathy.errors import UserError
from telepathy.data import load_spec
from telepathy.registry import load_registry


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


# Flags that set RunConfig fields: flag -> (section, field, type). One table, shared with --sweep keys.
RUN_FLAGS = {
    "task": ("data", "task", str), "max-length": ("data", "max_length", positive_int),
    "eval-samples": ("data", "eval_samples", positive_int),
    "steps": ("train", "steps", positive_int), "lr": ("train", "lr", positive_float),
    "seed": ("train", "seed", int), "warmup-steps": ("train", "warmup_steps", int),
    "checkpoint-every": ("train", "checkpoint_every", positive_int), "zero-stage": ("train", "zero_stage", int),
    "soft-tokens": ("bridge", "soft_tokens", positive_int), "depth": ("bridge", "depth", positive_int),
    "heads": ("bridge", "heads", positive_int), "source-layer": ("bridge", "source_layer", int),
    "diversity-weight": ("bridge", "diversity_weight", float),
    "baselines": ("eval", "baselines", lambda t: tuple(b for b in t.split(",") if b)),
    "latency-samples": ("eval", "latency_samples", int),
}


def register(sub) -> None:
    p = sub.add_parser("run", help="plan and launch a training run (the default command)")
    p.set_defaults(handler=handle)
    m = sub.add_parser("models", help="list the model registry's aliases")
    m.add_argument("--json", action="store_true")
    m.set_defaults(handler=handle_models)
    who = p.add_argument_group("models")
    who.add_argument("--pair", help="SENDER-RECEIVER aliases, e.g. llama3b-qwen3b (one alias = single-model mode)")
    who.add_argument("--sender", help="alias, hub id or local checkpoint directory")
    who.add_argument("--receiver", help="alias, hub id or local checkpoint directory (default: the sender)")
    how = p.add_argument_group("where and how")
    how.add_argument("--gpus", type=positive_int, default=1, help="total GPUs (or processes with --local on CPU)")
    how.add_argument("--backend", default="ddp", help=f"one of {', '.join(BACKENDS)}")
    mode = how.add_mutually_exclusive_group()
    mode.add_argument("--debug", action="store_const", dest="mode", const="debug", help="one process, no torchrun, few steps")
    mode.add_argument("--local", action="store_const", dest="mode", const="local", help="torchrun --standalone on this machine")
    mode.add_argument("--slurm", action="store_const", dest="mode", const="slurm", help="submit to SLURM (default when reachable)")
    how.add_argument("--dry-run", action="store_true", help="print the plan and the exact sbatch script; write nothing")
    how.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON (stable schema)")
    how.add_argument("--name", help="run name (default: PAIR-TASK-TIMESTAMP)")
    how.add_argument("--runs-dir", help="where run folders go (default ./runs; env TELEPATHY_RUNS)")
    how.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                     help="sweep a field (seed, lr, steps, soft_tokens, depth, task, pair, ...): one SLURM array job")
    bat = p.add_argument_group("batch")
    bat.add_argument("--global-batch", type=positive_int, help="samples per optimizer step over all GPUs (default: the table's)")
    bat.add_argument("--micro-batch", type=positive_int, help="per-GPU micro-batch (default: table row or memory model)")
    bat.add_argument("--activation-checkpointing", action="store_true", help="checkpoint receiver layers")
    bat.add_argument("--sender-cache", action=argparse.BooleanOptionalAction, default=None,
                     help="read the sender's tapped-layer states from the shared cache ($TELEPATHY_CACHE); "
                          "pays off for sweeps and multi-epoch runs")
    cfg = p.add_argument_group("training (RunConfig fields)")
    for flag, (_, _, typ) in RUN_FLAGS.items():
        cfg.add_argument(f"--{flag}", type=typ, default=None)
    add_profile_flags(p)


def handle_models(args) -> int:
    reg = load_registry()
    rows = [{"alias": s.alias, "hub_id": s.hub_id, "family": s.family, "params_b": round(s.n_params / 1e9, 3),
             "hidden": s.hidden, "layers": s.layers, "weights": s.weights} for s in reg.models.values()]
    if args.json:
        print(json.dumps({"models": rows}, indent=2))
    else:
        for r in rows:
            print(f"{r['alias']:<20} {r['family']:<8} {r['params_b']:>7.3f} B  {r['hub_id'] or '(random weights, test)'}")
    return 0


def run_config_from_args(args, pair, run_dir: str, name: str) -> RunConfig:
    sections: dict[str, dict] = {"bridge": {}, "train": {}, "data": {}, "eval": {}}
    for flag, (section, field, _) in RUN_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            sections[section][field] = value
    if args.activation_checkpointing:
        sections["train"]["activation_checkpointing"] = True
    if args.sender_cache is not None:
        sections["train"]["sender_cache"] = args.sender_cache
    if args.mode == "debug":  # a few steps to see everything run end to end
        sections["train"].setdefault("steps", 20)
        sections["data"].setdefault("eval_samples", 32)
    return RunConfig(sender=pair.sender.source if pair.sender.path else pair.sender.alias,
                     receiver=pair.receiver.source if pair.receiver.path else pair.receiver.alias,
                     run_dir=run_dir, backend=args.backend, name=name,
                     bridge=BridgeConfig(**sections["bridge"]), train=TrainConfig(**sections["train"]),
                     data=DataConfig(**sections["data"]), eval=EvalConfig(**sections["eval"]))


@functools.lru_cache(maxsize=64)
def task_max_length(task: str) -> int:
    """Fail at planning, not on a compute node: the task must exist. Its spec's usual sender length
    (e.g. AG News 256) is the default --max-length; data files use DataConfig's."""
    if task.endswith((".jsonl", ".csv")):
        if not Path(task).is_file():
            raise UserError(f"task file {task} not found; pass an existing .jsonl/.csv file or a task name")
        return DataConfig.max_length
    return load_spec(task).max_length or DataConfig.max_length


def build_plans(args) -> tuple[list[Plan], Path | None]:
    """One plan, or one per sweep task (sharing a sweep folder)."""
    reg = load_registry()
    profile = load_profile(args.cluster, {k: getattr(args, f"profile_{k}") for k in OVERRIDABLE})
    mode = args.mode or "slurm"
    root = runs_root(args.runs_dir)
    table = load_table()  # once, not per sweep task

    def plan_for(pair, run_dir: Path, name: str, overrides: dict | None = None) -> Plan:
        cfg = run_config_from_args(args, pair, str(run_dir), name)
        if overrides:
            cfg = cfg.replace(**overrides)
        if args.max_length is None:
            cfg = cfg.replace(data={"max_length": task_max_length(cfg.data.task)})
        return make_plan(pair, cfg, gpus=args.gpus, profile=profile, mode=mode,
                         global_batch=args.global_batch, micro_batch=args.micro_batch, table=table)

    pair = reg.pair(args.pair, args.sender, args.receiver)
    task = args.task or DataConfig.task
    if not args.sweep:
        name = check_name(args.name) if args.name else default_name(pair.name, task)
        return [plan_for(pair, root / name, name)], None
    from launcher.sweep import expand_sweep  # noqa: PLC0415 (only sweeps need it)

    sweep_name = check_name(args.name) if args.name else default_name(pair.name, task)
    sweep_dir = root / sweep_name
    plans = []
    for task_name, spec in expand_sweep(args.sweep):
        task_pair = reg.pair(spec.pop("pair")) if "pair" in spec else pair
        plans.append(plan_for(task_pair, sweep_dir / task_name, f"{sweep_name}.{task_name}", spec))
    return plans, sweep_dir


def handle(args) -> int:
    if args.json and not args.dry_run:
        raise UserError("--json goes with --dry-run (use `launch status --json` for submitted runs)")
    if args.mode in ("debug", "local") and args.sweep:
        raise UserError("--sweep runs as a SLURM array; drop --debug/--local, or run one configuration locally")
    plans, sweep_dir = build_plans(args)
    if args.dry_run:
        return show_dry_run(plans, sweep_dir, as_json=args.json)
    if plans[0].mode == "debug":
        return run_debug(plans[0])
    if plans[0].mode == "local":
        return run_local(plans[0])
    from launcher import submit  # noqa: PLC0415

    if not submit.slurm_available():
        raise UserError("SLURM is not reachable from here (no sbatch or no controller); use --local or --debug, "
                        "or start the test cluster with slurm/up.sh")
    result = submit.submit_slurm(plans, sweep_dir=sweep_dir)
    print(result.summary())
    return 0


def show_dry_run(plans: list[Plan], sweep_dir: Path | None, *, as_json: bool) -> int:
    from launcher import submit  # noqa: PLC0415 (renders the sbatch text with submitit, as submission does)
    from launcher.show import plan_table

    runs = []
    for plan in plans:
        cfg = str(Path(plan.run.run_dir) / "config.json")
        multi = plan.layout.nodes > 1
        nodes = [torchrun_command(plan, config_path=cfg, node_rank=r, rdzv_endpoint="$FIRST_NODE:$PORT" if multi else "",
                                  rdzv_id="$SLURM_JOB_ID") for r in range(plan.layout.nodes)]
        runs.append({"plan": plan.to_dict(), "torchrun": nodes})
    # One script for the whole submission: a sweep is one array job, exactly as submit_slurm sends it.
    sbatch = submit.render_sbatch(plans, sweep_dir=sweep_dir) if plans[0].mode == "slurm" else None
    if as_json:
        print(json.dumps({"schema": 1, "runs": runs, "sbatch": sbatch}, indent=2))
        return 0
    shown = plans if len(plans) <= 3 else plans[:2]
    for plan, r in zip(shown, runs):
        print(plan_table(plan))
        for rank, argv in enumerate(r["torchrun"]):
            print(f"node {rank}: {' '.join(argv)}")
        print()
    if len(plans) > len(shown):
        print(f"... and {len(plans) - len(shown)} more sweep tasks (--json lists all)\n")
    if sbatch is not None:
        print("# ---- sbatch script (exact bytes submitit submits) ----")
        print(sbatch, end="" if sbatch.endswith("\n") else "\n")
    return 0


def run_debug(plan: Plan) -> int:
    """One process, in-process, no torchrun: breakpoints work."""
    run_dir = Path(plan.run.run_dir)
    write_run_files(plan, run_dir)
    print(f"run folder: {run_dir}", flush=True)
    from telepathy.train import run  # noqa: PLC0415 (torch only when training)

    run(plan.run)
    return 0


def run_local(plan: Plan) -> int:
    """torchrun --standalone on this machine: gloo on CPU, NCCL on GPUs."""
    run_dir = Path(plan.run.run_dir)
    write_run_files(plan, run_dir)
    print(f"run folder: {run_dir}", flush=True)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        raise UserError("torchrun not found next to this Python; install torch in this environment")
    argv = torchrun_command(plan, config_path=str(run_dir / "config.json"))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes on one machine must not each take every core
    return subprocess.call([torchrun] + argv[1:], env=env)
