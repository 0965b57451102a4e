"""The house: imports flow one way (no cycle, nothing in telepathy/ reaches up into launcher/), the
launcher never imports the worker's trainer, and the run folder's file names live in telepathy/rundir.py only."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("launcher", "telepathy")
# Run-folder file names; each may appear as a string only in the module that owns the layout.
RUN_FILES = (
    "config.json",
    "plan.json",
    "eval.json",
    "metrics.jsonl",
    "manifest.json",
    "preempted.json",
    "jobs.json",
    "recipe.json",
    "predictions.jsonl",
    "bridge.safetensors",
    "optimizer.pt",
    "state.json",
)
# The same names used for other folders than a run's: a Hugging Face checkpoint's config, a cache entry's manifest.
OTHER_FOLDERS = {
    ("telepathy/registry.py", "config.json"),
    ("telepathy/cache.py", "config.json"),
    ("telepathy/cache.py", "manifest.json"),
    ("telepathy/hub.py", "config.json"),
}


def modules() -> dict[str, ast.Module]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            out[".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = ast.parse(
                f.read_text()
            )
    return out


def imports(tree: ast.Module) -> set[str]:
    """Every module an import statement names, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {d for d in imports(t) if d in mods and d != m} for m, t in mods.items()}


def test_no_import_cycle():
    g, state, cycles = graph(), {}, []

    def visit(u: str, path: list[str]) -> None:
        state[u] = "open"
        for v in sorted(g[u]):
            if state.get(v) == "open":
                cycles.append(path[path.index(v) :] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_worker_package_never_reaches_up_into_the_launcher():
    ups = {(m, d) for m, ds in graph().items() if m.startswith("telepathy") for d in ds if d.startswith("launcher")}
    assert ups == set()


def test_the_launcher_does_not_import_the_trainer():
    # The one exception is `--debug`, which runs the trainer in-process (cmd_run.run_here).
    users = {m for m, ds in graph().items() if m.startswith("launcher") and "telepathy.train" in ds}
    assert users == {"launcher.cmd_run"}


def test_run_folder_file_names_live_in_rundir_only():
    strays = []
    for m, tree in modules().items():
        path = m.replace(".", "/") + ".py"
        if path == "telepathy/rundir.py":
            continue
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                strays += [
                    (path, name, node.lineno)
                    for name in RUN_FILES
                    if name in node.value and (path, name) not in OTHER_FOLDERS
                ]
    assert strays == []


def test_rundir_names_every_file_it_is_asked_for():
    from telepathy.rundir import RunDir

    run = RunDir(Path("/r"))
    named = {
        run.config,
        run.plan,
        run.eval,
        run.metrics,
        run.manifest,
        run.preempted,
        run.jobs,
        run.recipe,
        run.predictions,
        run.step(3).bridge,
        run.step(3).optimizer,
        run.step(3).state,
    }
    assert {p.name for p in named} == set(RUN_FILES)
