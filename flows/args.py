"""The `--preset` / `--set` command line shared by the `python -m flows.<name>` entry points."""

from __future__ import annotations

import argparse
import sys

from tasks.common.config import ConfigError, load_config


def preset_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="preset name (demo, paper, fast, ...) or a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set render.steps=20 (repeatable)")
    return parser


def config_ok(args: argparse.Namespace) -> bool:
    """Validate the preset and overrides before Prefect starts; print the error naming the key."""
    try:
        load_config(args.preset, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    return True
