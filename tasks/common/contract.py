"""The stage contract: partitions, idempotent items, in-partition checkpoints and `_SUCCESS.json`.

A stage's work for one partition is ``work(run: PartitionRun) -> None``; :func:`execute_partition` wraps it
(stages call it through ``tasks.common.stage.execute``): one process per partition (a lease); a partition
finished under the same config hash skipped (:func:`finished`, the one answer to "finished under this
config?"); inputs checked (``MissingInputError``); checkpoints through ``run.checkpoint``; and
``_SUCCESS.json`` written last with every output's sha256 and size, the generic figures (:class:`Stats`) at
its top and the stage's own under ``figures`` (:func:`figures` reads them). The manifest returned is small
(paths and counts): Prefect results never hold the data.

Each rule in full: docs/running.md ("In the code"); what it guarantees: docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common import storage
from tasks.common.errors import PermanentError
from tasks.common.layout import (
    PROGRESS,
    SUCCESS,
    lease_url,
    partition_dir,
    partition_name,
    partition_relative,
    progress_dir,
)
from tasks.common.lease import PartitionLease

log = logging.getLogger("editforge")

# Set by the orchestration layer (flows/dashboard.py) to show a partition's progress on the dashboard:
# called as hook(fraction, figures) — figures: the running counts so far (or None); stage code only calls
# `PartitionRun.report_progress`, so it stays free of Prefect.
ProgressHook = Callable[[float, "dict[str, Any] | None"], None]
PROGRESS_HOOK: ContextVar[ProgressHook | None] = ContextVar("editforge_progress_hook", default=None)


@lru_cache(maxsize=1)
def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("editforge")
    except PackageNotFoundError:
        pkg = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{pkg}+g{sha}" if sha else pkg


class MissingInputError(PermanentError, FileNotFoundError):
    """A stage was run before the stage it reads from; retrying cannot help."""


@dataclass
class Stats:
    """Counts, rejection reasons, timings and value distributions of one partition run (one mechanism)."""

    counts: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(n)

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + int(n)

    def observe(self, name: str, values) -> None:
        self.values.setdefault(name, []).extend(float(v) for v in np.atleast_1d(values) if np.isfinite(v))

    def timer(self, name: str) -> _Timer:
        return _Timer(self, name)

    def __add__(self, other: Stats) -> Stats:
        """Partitions' stats merged (datatrove's way): counts, rejections and timings add, values join."""
        if not isinstance(other, Stats):
            return NotImplemented
        return Stats(
            _added(self.counts, other.counts),
            _added(self.rejected, other.rejected),
            _added(self.timings, other.timings),
            {k: [*self.values.get(k, []), *other.values.get(k, [])] for k in {**self.values, **other.values}},
        )

    def __radd__(self, other: Any) -> Stats:
        """``sum(stats)`` starts from 0."""
        return self + Stats() if other == 0 else NotImplemented

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> Stats:
        """The counts, rejections and timings a partition's manifest holds (its values are quantiles only)."""
        return cls(
            dict(manifest.get("counts") or {}),
            dict(manifest.get("rejected") or {}),
            dict(manifest.get("timings_s") or {}),
        )

    def summary(self) -> dict[str, Any]:
        quantiles = {
            name: {f"q{int(q * 100):02d}": float(np.quantile(v, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
            | {"mean": float(np.mean(v)), "n": len(v)}
            for name, v in sorted(self.values.items())
            if v
        }
        return {
            "counts": dict(sorted(self.counts.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "timings_s": {k: round(v, 3) for k, v in sorted(self.timings.items())},
            "quantiles": quantiles,
        }


def _added(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


class _Timer:
    def __init__(self, stats: Stats, name: str):
        self.stats, self.name = stats, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.stats.timings[self.name] = self.stats.timings.get(self.name, 0.0) + time.perf_counter() - self.t0


class Checkpoint:
    """Append-only parquet chunks for one partition: `done_keys()`, `append()`, `collect()`.

    Each chunk is written atomically under a name derived from its first key, so a re-run that
    rewrites the same batch overwrites the same chunk (no duplicates) and a crash loses at most the
    batch in flight. With ``expected`` keys each append reports progress (keys done); with ``ok`` =
    (column, value), the rows whose column holds the value are counted too (the running figure `ok`).
    """

    def __init__(
        self,
        progress_dir: str,
        key_column: str,
        expected: int | None = None,
        on_progress: Callable[[float, dict[str, Any] | None], None] | None = None,
        ok: tuple[str, Any] | None = None,
    ):
        self.dir = progress_dir
        self.key_column = key_column
        self.expected = expected
        self.on_progress = on_progress
        self.ok = ok
        self._keys: set[str] | None = None
        self._ok = 0  # rows counted as ok: the running figure shown with the progress

    def chunks(self) -> list[str]:
        return storage.list_files(self.dir, "chunk-*.parquet")

    def load(self) -> pd.DataFrame:
        frames = [storage.read_parquet(u) for u in self.chunks()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def done_keys(self) -> set[str]:
        df = self.load()
        return set(df[self.key_column].astype(str)) if len(df) else set()

    def append(self, batch_id: str, df: pd.DataFrame) -> None:
        name = hashlib.sha1(batch_id.encode()).hexdigest()[:16]
        storage.write_parquet_atomic(storage.url_join(self.dir, f"chunk-{name}.parquet"), df)
        if self.expected and self.on_progress:
            keys = df[self.key_column].astype(str)
            column, value = self.ok or (None, None)
            if self._keys is None:  # the first append of this process: what is on disk (this chunk included)
                earlier = self.load()
                self._keys = set(earlier[self.key_column].astype(str)) if len(earlier) else set()
                self._ok = int((earlier[column] == value).sum()) if column in earlier else 0
            elif column in df:
                self._ok += int((df.loc[~keys.isin(self._keys).to_numpy(), column] == value).sum())
            self._keys.update(keys)
            figures: dict[str, Any] = {"done": len(self._keys), "expected": self.expected}
            if column in df:
                figures["ok"] = self._ok
            self.on_progress(len(self._keys) / self.expected, figures)


@dataclass
class PartitionRun:
    stage: str
    partition_id: int
    output_root: str
    config_hash: str
    stats: Stats = field(default_factory=Stats)
    outputs: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # the stage's own: the manifest's `figures`
    # upstream stage -> (its partition this run reads, the config hash it must be finished under)
    inputs: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def dir(self) -> str:
        return partition_dir(self.output_root, self.stage, self.config_hash, self.partition_id)

    def path(self, name: str) -> str:
        return storage.url_join(self.dir, name)

    def relative(self, name: str = "") -> str:
        """``name`` in this partition, relative to the output root (what manifests record: a run can move)."""
        return partition_relative(self.stage, self.config_hash, self.partition_id, name)

    def input_dir(self, stage: str) -> str:
        """The partition of upstream ``stage`` this run reads (checked finished before ``work`` ran)."""
        if stage not in self.inputs:
            raise KeyError(f"{self.stage} does not declare {stage!r} among the stages it reads")
        upstream_id, upstream_hash = self.inputs[stage]
        return partition_dir(self.output_root, stage, upstream_hash, upstream_id)

    def input_path(self, stage: str, name: str) -> str:
        """URL of ``name`` in the partition of upstream ``stage`` this run reads."""
        return storage.url_join(self.input_dir(stage), name)

    def checkpoint(
        self, key_column: str, expected: int | None = None, ok: tuple[str, Any] | None = None
    ) -> Checkpoint:
        """Append-only chunks for this run; with `expected` keys, each append reports progress (and with
        ``ok`` = (column, value), how many rows hold that value)."""
        # keyed by config hash: chunks written under another config are never reused
        return Checkpoint(
            progress_dir(self.dir, self.config_hash), key_column, expected, self.report_progress, ok
        )

    def report_progress(self, fraction: float, figures: dict[str, Any] | None = None) -> None:
        """Tell the dashboard (if one listens) how far this partition is, 0..1, and its running figures."""
        hook = PROGRESS_HOOK.get()
        if hook is not None:
            hook(min(max(float(fraction), 0.0), 1.0), figures)

    def output(self, name: str) -> str:
        """Register `name` as an output of this run (hashed into `_SUCCESS.json`) and return its URL."""
        if name not in self.outputs:
            self.outputs.append(name)
        return self.path(name)


PartitionWork = Callable[[PartitionRun], None]


class CorruptMarkerError(ValueError):
    """A `_SUCCESS.json` that cannot be read."""


def read_success(run_dir: str, logger: logging.Logger | None = None) -> dict[str, Any] | None:
    """The partition's manifest; None when there is none, or when it cannot be read (warned by path)."""
    url = storage.url_join(run_dir, SUCCESS)
    if not storage.exists(url):
        return None
    try:
        done = storage.read_json(url)
        if not isinstance(done, dict):
            raise CorruptMarkerError(f"not a JSON object: {type(done).__name__}")
        return done
    except (ValueError, UnicodeDecodeError) as err:
        (logger or log).warning("%s cannot be read (%s): the partition counts as not done", url, err)
        return None


# what every manifest holds (:func:`_execute`), beside the stage's own figures
GENERIC = frozenset(
    {
        "stage",
        "partition_id",
        "path",
        "config_hash",
        "code_version",
        "wall_time_s",
        "finished_at",
        "outputs",
        "sizes",
        "counts",
        "rejected",
        "timings_s",
        "quantiles",
        "skipped",  # in the manifest a run returns
    }
)


def figures(manifest: dict[str, Any]) -> dict[str, Any]:
    """A partition's own figures (its stage's: render's pass rates, pack's shards, finetune's summary):
    the manifest's ``figures`` section, or, in a manifest written before it had one, every top-level
    key that is not generic (:data:`GENERIC`). The one place that reads them."""
    own = manifest.get("figures")
    if isinstance(own, dict):
        return own
    return {k: v for k, v in manifest.items() if k not in GENERIC}


def output_problems(run_dir: str, manifest: dict[str, Any], verify: str = "size") -> list[str]:
    """What is wrong with a finished partition's outputs: missing files, other sizes, (sha256) other bytes."""
    on_disk = storage.file_sizes(run_dir)
    sizes = manifest.get("sizes") or {}
    problems = []
    for name, sha in (manifest.get("outputs") or {}).items():
        url = storage.url_join(run_dir, name)
        if name not in on_disk:
            problems.append(f"{url} is missing")
        elif name in sizes and on_disk[name] != sizes[name]:
            problems.append(f"{url} has {on_disk[name]} bytes, {sizes[name]} recorded")
        elif verify == "sha256" and storage.sha256_of(url) != sha:
            problems.append(f"{url} does not have the recorded sha256")
    return problems


def finished(run_dir: str, config_hash: str, logger: logging.Logger | None = None) -> dict[str, Any] | None:
    """The one answer to "is this partition finished under this config?": its manifest when the
    `_SUCCESS.json` in ``run_dir`` is readable and carries ``config_hash``, else None."""
    return _if_under(read_success(run_dir, logger), config_hash)


def _if_under(done: dict[str, Any] | None, config_hash: str) -> dict[str, Any] | None:
    return done if done is not None and done.get("config_hash") == config_hash else None


def check_inputs(stage: str, partition_id: int, output_root: str, inputs: dict[str, tuple[int, str]]) -> None:
    """Every input partition is finished under the hash expected, its outputs there with their recorded
    sizes, or MissingInputError naming it."""
    part = partition_name(partition_id)
    for upstream, (upstream_id, expected) in inputs.items():
        upstream_dir = partition_dir(output_root, upstream, expected, upstream_id)
        done = read_success(upstream_dir)
        theirs = partition_name(upstream_id)
        if done is None:
            raise MissingInputError(
                f"{stage} {part} needs {upstream} {theirs} to be finished first "
                f"({storage.url_join(upstream_dir, SUCCESS)} is missing): run the {upstream} stage for this config"
            )
        if done.get("config_hash") != expected:
            raise MissingInputError(
                f"{stage} {part} reads {upstream} {theirs}, which was produced under another config "
                f"(hash {done.get('config_hash')}, this config expects {expected}): run the {upstream} stage first"
            )
        problems = output_problems(upstream_dir, done)
        if problems:
            raise MissingInputError(
                f"{stage} {part} reads {upstream} {theirs}, whose outputs are damaged "
                f"({'; '.join(problems[:3])}): run the {upstream} stage again to redo it"
            )


def execute_partition(
    stage: str,
    partition_id: int,
    output_root: str,
    config_hash: str,
    work: PartitionWork,
    logger: logging.Logger | None = None,
    inputs: dict[str, tuple[int, str]] | None = None,
    verify: str = "size",
) -> dict[str, Any]:
    """Run `work` for one (stage, partition) under the contract; return the small manifest."""
    logger = logger or log
    run = PartitionRun(stage, partition_id, output_root, config_hash, inputs=dict(inputs or {}))
    with PartitionLease(lease_url(output_root, stage, config_hash, partition_id), logger):
        return _execute(run, work, logger, verify)


def _execute(run: PartitionRun, work: PartitionWork, logger: logging.Logger, verify: str) -> dict[str, Any]:
    stage, partition_id, config_hash = run.stage, run.partition_id, run.config_hash
    done = read_success(run.dir, logger)  # read once: finished (skip), another config's (re-run), or none
    if _if_under(done, config_hash):
        problems = output_problems(run.dir, done, verify)
        if not problems:
            logger.info("%s part-%05d: already done (config %s) — skipped", stage, partition_id, config_hash)
            # a crash between the marker and the clean-up below leaves the checkpoint behind: finish the job
            storage.remove(run.path(PROGRESS), recursive=True)
            return {**done, "skipped": True}
        logger.warning(
            "%s part-%05d: finished, but %s — doing it again", stage, partition_id, "; ".join(problems)
        )
    check_inputs(stage, partition_id, run.output_root, run.inputs)  # before anything is written
    if done and done.get("config_hash") != config_hash:
        logger.info(
            "%s part-%05d: config changed (%s -> %s) — re-running; the finished outputs stay until "
            "the new ones are complete",
            stage,
            partition_id,
            done.get("config_hash"),
            config_hash,
        )
    left = storage.remove_temp_files(run.dir)
    if left:
        logger.info(
            "%s part-%05d: removed %d temporary file(s) of an interrupted write",
            stage,
            partition_id,
            len(left),
        )
    t0 = time.perf_counter()
    with storage.recording_writes() as written:
        work(run)
    # hashed as written; an output this run did not write (a resumed run's earlier files) is read back
    sha = {name: written.get(run.path(name)) or storage.sha256_of(run.path(name)) for name in run.outputs}
    on_disk = storage.file_sizes(run.dir)
    manifest = {
        "stage": stage,
        "partition_id": partition_id,
        "path": run.relative(),
        "config_hash": config_hash,
        "code_version": code_version(),
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "finished_at": round(time.time(), 3),  # unix seconds: the dashboard's rates and ETA
        "outputs": sha,
        "sizes": {name: on_disk[name] for name in run.outputs},
        **run.stats.summary(),
        "figures": dict(run.figures),
    }
    storage.write_json_atomic(run.path(SUCCESS), manifest)
    storage.remove(run.path(PROGRESS), recursive=True)
    for name in sorted(set((done or {}).get("outputs") or {}) - set(run.outputs)):
        storage.remove(run.path(name))  # the previous config's outputs this run did not write again
    logger.info(
        "%s part-%05d: done in %.1fs %s rejected=%s",
        stage,
        partition_id,
        manifest["wall_time_s"],
        manifest["counts"],
        manifest["rejected"],
    )
    return {**manifest, "skipped": False}
