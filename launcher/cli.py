"""`launch`: the one entry point. Subcommands live in launcher/cmd_*.py, each with register() and a handler.

    launch --pair llama3b-qwen3b --gpus 4 [--dry-run]      plan and submit (SLURM), or --local / --debug
    launch memory | status | logs | cancel | resubmit | report | models

Bad input -> `error: <one line>` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

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
}


class Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = Parser(prog="launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    importlib.import_module(COMMANDS[command]).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
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
