"""`launch`: the one entry point (subcommands live in launcher/cmd_*.py, each with register() and a handler).

Bad input -> `error: <one line>` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from telepathy.errors import UserError

# Subcommand name -> module. Imported only when used, so `launch --dry-run` stays fast.
COMMANDS = {
    "run": "launcher.cmd_run",
    "models": "launcher.cmd_run",
    "memory": "launcher.cmd_memory",
    "status": "launcher.cmd_jobs",
    "logs": "launcher.cmd_jobs",
    "cancel": "launcher.cmd_jobs",
    "resubmit": "launcher.cmd_jobs",
    "report": "launcher.cmd_report",
    "prefetch": "launcher.cmd_prefetch",
}


USAGE = """usage: launch [run] --pair SENDER-RECEIVER [options]    plan and start a training run
       launch SUBCOMMAND ...

Train a bridge from a frozen sender LLM to a frozen receiver LLM, on SLURM (default), with torchrun here
(--local) or in this process (--debug).

  launch --pair llama3b-qwen3b --gpus 4 --dry-run     the plan and the exact sbatch script; writes nothing
  launch --pair llama3b-qwen3b --gpus 4               submit (one task per node, torchrun inside)
  launch --pair tiny-llama-tiny-qwen --task demo --debug      one process on this machine (CPU or GPU)
  launch --recipe table1 [--dry-run]                  a whole experiment (configs/recipes/): every run as array jobs

main options (all: `launch run --help`)
  --pair A-B | --sender A --receiver B   models: registry aliases (`launch models`), hub ids or local folders
  --task NAME                            sst2, agnews, trec, banking77, boolq, demo, or a .jsonl/.csv file
  --gpus N   --backend ddp|fsdp|deepspeed   --cluster PROFILE   --account A   --partition P
  --steps N  --lr X  --seed N  --soft-tokens K  --sweep KEY=V1,V2 (one SLURM array job)
  --method M                             bridge, prompt_tuning, lora, linear_probe, receiver_zero_shot, ...
  --recipe NAME [--methods M1,M2] [--seeds S1,S2]   a recipe's runs (flags given win over the recipe)
  --dry-run [--json]   --debug   --local   --name NAME   --runs-dir DIR

subcommands
  models                      the model registry's aliases
  prefetch --pair P --task T  download what runs read from the Hugging Face Hub (login node); --check: offline
                              (--recipe NAME: every pair and task of a recipe)
  memory --pair P             per-GPU memory of a step and the micro-batch that fits (--trace, --measure)
  status | logs | cancel | resubmit RUN_OR_SWEEP     submitted runs and sweeps
  report RUN_OR_SWEEP         tables and plots (a recipe's folder: Table 1 with intervals and paired tests)

--config-dir DIR (or TELEPATHY_CONFIG_DIR): your own cluster profiles, tasks, recipes, models and measured
memory-table rows, layered over the shipped ones (default ~/.config/telepathy).
Every command that shows something takes --json (stable schema). Bad input: one line, exit code 2.
"""


class Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):
        if message.endswith("expected one argument"):  # `--sbatch-args --x=1`: argparse took --x=1 for a flag
            message += " (a value that starts with '-' goes as --flag=VALUE)"
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = Parser(prog="launch", add_help=False)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    importlib.import_module(COMMANDS[command]).register(sub)
    return parser


def _config_dir(argv: list[str]) -> list[str]:
    """`--config-dir DIR` anywhere on the line: the user's configuration folder for every subcommand (it
    becomes TELEPATHY_CONFIG_DIR, which the job scripts and the workers see too)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config-dir" or arg.startswith("--config-dir="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value:
                raise UserError("--config-dir needs a folder; see `launch --help`")
            os.environ["TELEPATHY_CONFIG_DIR"] = str(Path(value).expanduser().absolute())
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    return out


class _Warnings(logging.Handler):
    """The launcher's warnings (e.g. SLURM output it could not parse) as `warning: ...` on stderr."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("warning: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)  # sys.stderr now, not at construction


def main(argv: list[str] | None = None) -> int:
    handler = _Warnings()
    logging.getLogger("launcher").addHandler(handler)
    try:
        return _main(argv)
    finally:
        logging.getLogger("launcher").removeHandler(handler)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _config_dir(argv)
        mine = os.environ.get("TELEPATHY_CONFIG_DIR")
        if mine and Path(mine).expanduser().is_file():  # else every layered lookup would silently miss it
            raise UserError(f"configuration folder {mine} (--config-dir, TELEPATHY_CONFIG_DIR) is a file; use a folder")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    command = argv[0] if argv and argv[0] in COMMANDS else "run"
    if command == "run" and argv[:1] == ["run"]:
        argv = argv[1:]
    try:
        args = build_parser(command).parse_args([command] + (argv if command == "run" else argv[1:]))
        return int(args.handler(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `launch status | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
