"""`launch prefetch`: download exactly what runs will read from the Hugging Face Hub into the cluster's cache.

    launch prefetch --pair llama8b-mistral7b --task sst2 --cluster mycluster     config, tokenizer, safetensors, splits
    launch prefetch --pair P --sweep task=sst2,agnews,trec                       every task of a sweep
    launch prefetch --recipe table1 --cluster mycluster                          every pair and task of a recipe
    launch prefetch --pair P --task sst2 --check [--json]                        presence only, no network

Run it on a login node (compute nodes are usually offline). It checks gated access first (a missing or
refused HF_TOKEN is one line naming the repository and the fix), shows sizes, then downloads with
huggingface_hub into the profile's `hf_home` (or --hf-home, else this environment's HF_HOME). --check lists
what is missing and the command that fetches it, and exits 1 if anything is.
"""

from __future__ import annotations

import argparse
import json
import sys

from launcher import preflight
from launcher.flags import add_model_flags
from launcher.profiles import OVERRIDABLE, add_profile_flags, load_profile
from launcher.sweep import PAIR_KEY, expand_sweep
from telepathy import hub
from telepathy.errors import UserError
from telepathy.registry import load_registry

SCHEMA = 1


def register(sub) -> None:
    p = sub.add_parser(
        "prefetch",
        help="download what runs read from the Hugging Face Hub (login node)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(p)
    p.add_argument("--model", action="append", default=[], metavar="M", help="another model (alias or hub id)")
    p.add_argument("--task", action="append", default=[], metavar="T", help="a task whose splits to fetch (repeatable)")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="the pairs and tasks of a sweep (as for launch)",
    )
    p.add_argument("--recipe", metavar="NAME", help="every pair and task of a recipe (configs/recipes/NAME.yaml)")
    p.add_argument("--check", action="store_true", help="presence only, no network: list what is missing")
    p.add_argument("--json", action="store_true", help="machine-readable output (stable schema)")
    add_profile_flags(p)
    p.set_defaults(handler=handle)


def _wanted(args) -> list[hub.Need]:
    reg = load_registry()
    models, tasks = list(args.model), list(args.task)
    if args.pair or args.sender:
        pair = reg.pair(args.pair, args.sender, args.receiver)
        models += [pair.sender.source, pair.receiver.source]
    for _, overrides in expand_sweep(args.sweep) if args.sweep else []:
        if PAIR_KEY in overrides:
            pair = reg.pair(overrides[PAIR_KEY])
            models += [pair.sender.source, pair.receiver.source]
        if "task" in overrides.get("data", {}):
            tasks.append(overrides["data"]["task"])
    if args.recipe:
        from launcher.recipe import load_recipe  # noqa: PLC0415  (only with --recipe)

        recipe = load_recipe(args.recipe)
        for name in recipe.pairs:
            pair = reg.pair(name)
            models += [pair.sender.source, pair.receiver.source]
        tasks += list(recipe.tasks)
    if not models and not tasks:
        raise UserError("nothing to prefetch; name a --recipe, --pair, --model or --task (or a --sweep of them)")
    return preflight.needs(models, tasks)


def handle(args) -> int:
    wanted = _wanted(args)
    profile = load_profile(args.cluster, {k: getattr(args, f"profile_{k}") for k in OVERRIDABLE})
    cache = hub.hub_cache(profile.hf_home)  # the profile's hf_home (--hf-home DIR), else HF_HOME
    if args.check:
        return _check(args, wanted, cache)
    return _fetch(args, wanted, cache)


def _row(need: hub.Need, cache) -> dict:
    gaps = hub.missing(need, cache)
    return {
        "what": need.what,
        "repo_type": need.repo_type,
        "repo_id": need.repo_id,
        "revision": need.revision,
        "present": not gaps,
        "missing": gaps,
        "bytes": hub.cached_bytes(need, cache) if not gaps else None,
    }


def _check(args, wanted: list[hub.Need], cache) -> int:
    rows = [_row(n, cache) for n in wanted]
    gaps = [n for n, r in zip(wanted, rows) if not r["present"]]
    fix = preflight.fix_command(gaps, args.cluster, args.profile_hf_home) if gaps else None
    if args.json:
        print(json.dumps({"schema": SCHEMA, "cache": str(cache), "items": rows, "fix": fix}, indent=2))
        return 1 if gaps else 0
    print(f"Hugging Face cache: {cache}")
    for need, r in zip(wanted, rows):
        if r["present"]:
            print(f"  ok       {need.what:<20} {need.label}  {_size(r['bytes'])}")
        else:
            print(f"  MISSING  {need.what:<20} {need.label}  ({'; '.join(r['missing'][:3])})")
    if gaps:
        print(f"fetch what is missing (where the Hub is reachable): {fix}")
        return 1
    print("everything is in the cache")
    return 0


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _network(error: Exception) -> UserError:
    offline = hub.offline()
    why = "HF_HUB_OFFLINE is set" if offline else f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    unset = ", with HF_HUB_OFFLINE unset" if offline else ""
    return UserError(
        f"cannot reach the Hugging Face Hub ({why}); run `launch prefetch` where it is reachable "
        f"(a login node){unset}, or check HF_ENDPOINT and proxies"
    )


def _fetch(args, wanted: list[hub.Need], cache) -> int:
    from huggingface_hub import get_token  # noqa: PLC0415  (huggingface_hub only when downloading)
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled  # noqa: PLC0415

    token = get_token()
    todo = [n for n in wanted if hub.missing(n, cache)]
    done = []
    try:
        for need in todo:  # every access problem first: nothing is half-downloaded for a refused repository
            hub.check_access(need, token)
        for need in todo:
            files = hub.remote_files(need, token)
            print(
                f"fetching {need.what} ({need.label}): {len(files)} files, {_size(sum(files.values()))} -> {cache}",
                file=sys.stderr,
                flush=True,
            )
            hub.fetch(need, cache, token)
            done.append(need)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, OSError) as e:
        raise _network(e) from None
    except Exception as e:  # noqa: BLE001  httpx connection errors vary by version: all mean "unreachable"
        if type(e).__module__.startswith(("httpx", "requests", "urllib3")):
            raise _network(e) from None
        raise
    rows = [_row(n, cache) for n in wanted]
    if args.json:
        print(
            json.dumps(
                {"schema": SCHEMA, "cache": str(cache), "items": rows, "fetched": [n.what for n in done]}, indent=2
            )
        )
    else:
        for need, r in zip(wanted, rows):
            state = "fetched" if need in done else "cached"
            print(f"  {state:<8} {need.what:<20} {need.label}  {_size(r['bytes'])}")
    left = [r for r in rows if not r["present"]]
    if left:
        raise UserError(
            f"{left[0]['what']} is still incomplete in {cache} ({'; '.join(left[0]['missing'][:3])}); "
            "run `launch prefetch` again"
        )
    return 0
