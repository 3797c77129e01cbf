"""The command-line options every EditForge command shares, and the one place config is validated.

`editforge run|stage|train|config|report|calibrate-early` and `python -m flows.generate` /
`python -m flows.train` all take `--preset` and `--set KEY=VALUE` through these definitions and load
the config through :func:`load_or_exit`, so a bad key, a bad `name`, an `output_root` that cannot be
written (or, for a command that reads a run, that holds nothing) or a bad `EDITFORGE_LEASE_TTL_S` fails
at once, before Prefect starts, with one message naming it and exit code 2; :func:`reported` does the
same for a failure during the run (one `error:` line, exit 2 when a retry cannot fix it, else 1;
`--debug` shows the tracebacks instead).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

import typer

from tasks.common.config import PipelineConfig, load_config
from tasks.common.errors import PermanentError, is_permanent

Preset = Annotated[str, typer.Option("--preset", "-p", help="preset name (demo, paper, fast, ...) or a YAML file")]
Overrides = Annotated[list[str] | None, typer.Option("--set", "-s", help="KEY=VALUE override, e.g. render.steps=20 "
                                                                           "(repeatable)")]
Partitions = Annotated[str | None, typer.Option(help="e.g. 0,3,10-19 (default: all)")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks (Prefect's and the error's) instead of one line")]


def load_or_exit(preset: str, overrides: list[str] | None,
                 root: Literal["write", "read", "none"] = "write") -> PipelineConfig:
    """The validated config, or the error naming the key on stderr and exit code 2.

    ``root``: what the command does with ``output_root`` — ``write`` (it must be writable or creatable, its
    bucket there; the lease settings valid), ``read`` (a run must be there) or ``none`` (not used)."""
    from tasks.common import storage
    from tasks.common.lease import lease_ttl_s

    try:
        cfg = load_config(preset, overrides or [])
        if root == "write":
            lease_ttl_s()
        if root != "none":
            storage.check_output_root(cfg.output_root, write=root == "write")
        return cfg
    except PermanentError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except OSError as err:  # an object store that cannot be reached: may pass on a retry
        typer.echo(f"error: output_root: cannot reach it ({type(err).__name__}: {str(err)[:300]})", err=True)
        raise typer.Exit(1) from None


Verify = Annotated[bool, typer.Option("--verify", help="before skipping a finished partition, check its outputs' "
                                                       "sha256 too (sets verify=sha256; sizes are always checked)")]


def with_verify(overrides: list[str] | None, verify: bool) -> list[str]:
    return [*(overrides or []), *(["verify=sha256"] if verify else [])]


def parse_partitions(spec: str | None) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; None -> all. A malformed spec is a BadParameter naming it."""
    if not spec:
        return None
    ids: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise typer.BadParameter(f"{spec!r}: expected partition ids and ranges such as 0,3,10-19", param_hint="--partitions")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise typer.BadParameter(f"{spec!r}: the range {part.strip()} ends before it starts", param_hint="--partitions")
        ids += list(range(first, last + 1))
    return ids


class _OneLine(logging.Filter):
    """Drops the traceback from a log record (its message line stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


@contextmanager
def reported(debug: bool) -> Iterator[None]:
    """A failure inside the block as a person reads it: one message, exit 2 (permanent) or 1."""
    if debug:
        yield
        return
    quiet = _OneLine()
    for name in RUN_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as err:
        permanent = is_permanent(err)
        typer.echo(f"error: {err}" if str(err) else f"error: {type(err).__name__}", err=True)
        if not permanent:
            typer.echo(f"({type(err).__name__}, not a setting or input problem: run again with --debug for the "
                       "traceback)", err=True)
        raise typer.Exit(2 if permanent else 1) from None
    finally:
        for name in RUN_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)


def run_command(command: Callable[..., None], argv: list[str] | None, prog: str, doc: str | None = None) -> int:
    """Run one typer command as a program (`python -m flows.<name>`); return its exit code."""
    app = typer.Typer(add_completion=False, help=doc, rich_markup_mode=None)
    app.command()(command)
    try:  # standalone: usage errors print as usual; every outcome ends in SystemExit with its code
        app(args=argv, prog_name=prog)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0
