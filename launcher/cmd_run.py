"""`launch [run]`: resolve the pair, plan, then dry-run, debug (in-process), local (torchrun) or SLURM."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher import preflight
from launcher.flags import add_layout_flags, add_model_flags, add_run_flags, request_from_args
from launcher.plan import Plan, build_plans, torchrun_command
from launcher.profiles import TORCHRUN_ENV
from launcher.show import plan_table
from telepathy.errors import UserError
from telepathy.files import atomic_write_json, read_json
from telepathy.hub import hub_env
from telepathy.registry import load_registry
from telepathy.rundir import RunDir


def register(sub) -> None:
    p = sub.add_parser("run", help="plan and launch a training run (the default command)")
    p.set_defaults(handler=handle)
    add_model_flags(p)
    how = p.add_argument_group("where and how")
    mode = how.add_mutually_exclusive_group()
    mode.add_argument(
        "--debug", action="store_const", dest="mode", const="debug", help="one process, no torchrun, few steps"
    )
    mode.add_argument(
        "--local", action="store_const", dest="mode", const="local", help="torchrun --standalone on this machine"
    )
    mode.add_argument("--slurm", action="store_const", dest="mode", const="slurm", help="submit to SLURM (the default)")
    how.add_argument("--dry-run", action="store_true", help="print the plan and the exact sbatch script; write nothing")
    how.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON (stable schema)")
    how.add_argument("--name", help="run name (default: PAIR-TASK-TIMESTAMP)")
    how.add_argument("--runs-dir", help="where run folders go (default ./runs; env TELEPATHY_RUNS)")
    how.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep a run setting (seed, lr, steps, soft_tokens, depth, task, pair, ...): one SLURM array job",
    )
    rec = p.add_argument_group("recipes (a whole experiment: configs/recipes/NAME.yaml)")
    rec.add_argument("--recipe", metavar="NAME", help="plan and submit every run of a recipe (table1, demo, ...)")
    rec.add_argument("--methods", metavar="M1,M2", help="with --recipe: only these of its methods")
    rec.add_argument("--seeds", metavar="S1,S2", help="with --recipe: these seeds instead of the recipe's")
    add_layout_flags(p, gpus_default=None)
    add_run_flags(p)
    m = sub.add_parser("models", help="list the model registry's aliases")
    m.add_argument("--json", action="store_true")
    m.set_defaults(handler=handle_models)


def handle_models(args) -> int:
    reg = load_registry()
    rows = [
        {
            "alias": s.alias,
            "hub_id": s.hub_id,
            "family": s.family,
            "params_b": round(s.n_params / 1e9, 3),
            "hidden": s.hidden,
            "layers": s.layers,
            "weights": s.weights,
        }
        for s in reg.models.values()
    ]
    if args.json:
        print(json.dumps({"models": rows}, indent=2))
    else:
        for r in rows:
            print(
                f"{r['alias']:<20} {r['family']:<8} {r['params_b']:>7.3f} B  {r['hub_id'] or '(random weights, test)'}"
            )
    return 0


def handle(args) -> int:
    if args.json and not args.dry_run:
        raise UserError("--json goes with --dry-run (use `launch status --json` for submitted runs)")
    if args.recipe:
        return handle_recipe(args)
    if args.methods or args.seeds:
        raise UserError("--methods and --seeds choose among a recipe's runs: add --recipe NAME")
    if args.mode in ("debug", "local") and args.sweep:
        raise UserError("--sweep runs as a SLURM array; drop --debug/--local, or run one configuration locally")
    plans, sweep_dir = build_plans(request_from_args(args))
    if args.dry_run:
        return show_dry_run(plans, sweep_dir, as_json=args.json)
    preflight.check_plans(plans, cluster=args.cluster)
    if plans[0].mode in ("debug", "local"):
        return run_here(plans[0])
    from launcher import slurm, submit  # noqa: PLC0415  (submitit only when submitting)

    if not slurm.slurm_available():
        raise UserError(
            "SLURM is not reachable from here (no sbatch or no controller); use --local or --debug, "
            "or start the test cluster with slurm/up.sh"
        )
    print(submit.submit_slurm(plans, sweep_dir=sweep_dir).summary())
    return 0


def show_dry_run(plans: list[Plan], sweep_dir: Path | None, *, as_json: bool) -> int:
    from launcher import slurm, submit  # noqa: PLC0415  (renders the sbatch text with submitit, as submission does)

    runs = []
    for plan in plans:
        multi = plan.layout.nodes > 1
        nodes = [
            torchrun_command(
                plan,
                config_path=str(plan.run.dir.config),
                node_rank=r,
                rdzv_endpoint="$FIRST_NODE:$PORT" if multi else "",
                rdzv_id="$SLURM_JOB_ID",
            )
            for r in range(plan.layout.nodes)
        ]
        runs.append({"plan": plan.to_dict(), "torchrun": nodes})
    # One script for the whole submission: a sweep is one array job, exactly as submit_slurm sends it.
    sbatch = None
    if plans[0].mode == "slurm":
        sbatch = submit.render_sbatch(plans, sweep_dir=sweep_dir)
        if slurm.slurm_available():  # where SLURM answers, a request no node can satisfy is caught now
            submit.check_fits(plans[0])
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


def run_here(plan: Plan) -> int:
    """--debug: one process, in-process, no torchrun (breakpoints work). --local: torchrun --standalone on
    this machine (gloo on CPU, NCCL on GPUs)."""
    run_dir = plan.run.dir
    if run_dir.plan.exists():
        raise UserError(
            f"run folder {run_dir} already holds a run; choose another --name (or `launch resubmit {run_dir}`)"
        )
    plan.write()
    print(f"run folder: {run_dir}", flush=True)
    os.environ.update(hub_env(plan.profile))  # before huggingface_hub reads it (at import); torchrun inherits it
    if plan.mode == "debug":
        from telepathy.train import run  # noqa: PLC0415  (torch only when training)

        run(plan.run)
        return 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        raise UserError("torchrun not found next to this Python; install torch in this environment")
    argv = torchrun_command(plan, config_path=str(run_dir.config))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes on one machine must not each take every core
    env.update(TORCHRUN_ENV)
    return subprocess.call([torchrun] + argv[1:], env=env)


# ---------------------------------------------------------------------------------------------- recipes


def handle_recipe(args) -> int:
    from launcher import recipe as recipes  # noqa: PLC0415  (only `launch --recipe` plans recipes)

    given = [flag for flag, v in (("--pair", args.pair), ("--sender", args.sender), ("--sweep", args.sweep)) if v]
    if given:
        raise UserError(f"{given[0]} does not go with --recipe: the recipe names its pairs and runs")
    for flag, value in (("--methods", args.methods), ("--seeds", args.seeds)):
        if value is not None and not value.strip(", "):
            example = "bridge,lora" if flag == "--methods" else "1,2"
            raise UserError(f"{flag} is empty; list at least one ({flag} {example})")
    request = request_from_args(args)
    recipe = recipes.with_cli(recipes.load_recipe(args.recipe), request, args.methods, args.seeds)
    root, runs, folders = recipes.recipe_runs(recipe, request, gpus=args.gpus)
    jobs = recipes.arrays(runs, folders)
    if args.dry_run:
        return show_recipe(recipe, root, runs, jobs, as_json=args.json)
    preflight.check_plans([r.plan for r in runs], cluster=args.cluster)
    from launcher import slurm, submit  # noqa: PLC0415  (submitit only when submitting)

    if not slurm.slurm_available():
        raise UserError(
            "SLURM is not reachable from here (no sbatch or no controller); start the test cluster with "
            "slurm/up.sh, or submit from a login node"
        )
    record = recipes.record(root, recipe, request, runs, gpus=args.gpus)
    saved = read_json(RunDir(root).recipe, "recipe record")
    if saved is not None and [r["run_dir"] for r in saved["runs"]] != [r["run_dir"] for r in record["runs"]]:
        raise UserError(f"{root} already holds another recipe's runs; choose another --name")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RunDir(root).recipe, record)
    for folder, members in jobs:
        print(submit.submit_slurm([r.plan for r in members], sweep_dir=folder).summary())
    print(f"recipe {recipe.name}: {len(runs)} runs in {root}; the table: launch report {shlex.quote(str(root))}")
    return 0


def _cost_basis(recipe) -> str:
    c = recipe.cost
    return (
        f"estimated from counted FLOPs at {c.mfu:.0%} MFU (training, prefill, label scoring) and {c.decode_mfu:.0%} "
        f"(token-by-token decoding) of {c.peak_tflops:g} TFLOP/s per GPU, token counts at their caps "
        "(an upper bound), model loading not included"
    )


def show_recipe(recipe, root: Path, runs, jobs, *, as_json: bool) -> int:
    from launcher import slurm, submit  # noqa: PLC0415  (renders the sbatch text with submitit, as submission does)

    arrays = []
    reachable = slurm.slurm_available()  # where SLURM answers, a request no node can satisfy is caught now
    for folder, members in jobs:
        plans = [r.plan for r in members]
        if reachable:
            submit.check_fits(plans[0])
        params = submit.slurm_parameters(plans, name=folder.name, code_dir=RunDir(folder).next_code_snapshot())
        resources = {
            k: params.get(k)
            for k in ("nodes", "gpus_per_node", "cpus_per_task", "mem", "time", "partition", "account", "qos")
        }
        resources["array_parallelism"] = params["array_parallelism"]
        arrays.append(
            {
                "folder": str(folder),
                "tasks": [r.to_dict() for r in members],
                "resources": resources,
                "gpu_hours": round(sum(r.gpu_hours for r in members), 3),
                "sbatch": submit.render_sbatch(plans, sweep_dir=folder),
            }
        )
    total = round(sum(r.gpu_hours for r in runs), 3)
    if as_json:
        doc = {
            "schema": 1,
            "recipe": recipe.to_dict(),
            "root": str(root),
            "arrays": arrays,
            "gpu_hours": total,
            "cost_basis": _cost_basis(recipe),
            "runs": [r.plan.to_dict() for r in runs],
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"recipe {recipe.name} ({recipe.path}){': ' + recipe.description if recipe.description else ''}")
    print(f"folder {root}")
    for i, (a, (_, members)) in enumerate(zip(arrays, jobs), 1):
        res = a["resources"]
        where = ", ".join(f"{k} {res[k]}" for k in ("partition", "account", "qos") if res.get(k))
        print(
            f"\narray job {i}: {len(members)} tasks in {a['folder']}; each {res['nodes']} node(s) x "
            f"{res['gpus_per_node']} GPU(s), {res['cpus_per_task']} CPUs, {res['mem']} memory, "
            f"{res['time']} min{', ' + where if where else ''}; at most {res['array_parallelism']} at once; "
            f"{a['gpu_hours']:.2f} GPU-hours"
        )
        head = ("TASK", "NAME", "METHODS", "DATA", "SEED", "K", "MICRO x ACCUM x GPUS", "GPU-H")
        rows = [head]
        for j, r in enumerate(members):
            b = r.plan.batch
            rows.append(
                (
                    str(j),
                    Path(r.plan.run.run_dir).name,
                    ",".join(r.methods),
                    r.task,
                    str(r.seed),
                    str(r.soft_tokens or "-"),
                    f"{b.micro_batch} x {b.grad_accum} x {r.plan.layout.world_size}",
                    f"{r.gpu_hours:.3f}",
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
        for row in rows:
            print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    print(f"\ntotal: {len(runs)} runs in {len(jobs)} array job(s), {total:.2f} GPU-hours {_cost_basis(recipe)}")
    for i, a in enumerate(arrays, 1):
        print(f"\n# ---- sbatch script of array job {i} (exact bytes submitit submits) ----")
        print(a["sbatch"], end="" if a["sbatch"].endswith("\n") else "\n")
    return 0
