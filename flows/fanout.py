"""Fan-out: one `editforge-generate` flow run drives the whole cluster through Prefect deployments.

With ``run.mode: fan-out`` each stage's partitions are split into blocks of ``run.block_size``, every
block a child flow run of that stage's deployment (``run.deployments``) named after it (`render[0-7]`)
with an idempotency key per attempt (:func:`attempt_key`); a block is submitted once the partitions it
reads are finished, again after a failure (``run.max_block_attempts`` in all). The captions ledger is
extended here, the shard index written here at the end (the captions topped up for
``text.target_triplets``: flows/target.py). A poll costs what changed: the children's states in one API
call, a completed block's manifests read once, the leases of running stages listed every
``LEASES_EVERY_S`` (a lost worker's block crashed and submitted again), the in-flight figures in one
API call; this process publishes the dashboard. A parent started again lists what is finished once,
takes over its run version's children still in flight and submits only what is missing. Children
waiting on a pool where none of the run's children runs are reported after ``run.worker_wait_warn_s``
and fail the run after ``run.worker_wait_fail_s``. docs/monitoring.md has the details and the costs.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from flows.dashboard import LIVE_KEY, Board, finished_ids, read_manifest
from flows.target import top_up
from tasks import registry
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.lease import is_stale, lease_ttl_s, read_lease

READS_PER_POLL = 150  # storage reads one poll may make (manifests, leases); the rest wait for the next poll
LEASES_EVERY_S = (
    30.0  # the leases of running blocks are listed at most this often (a lost worker is slow news)
)
FAILED_POLLS_MAX = 120  # polls in a row the Prefect API or the store may fail before the run gives up
PAGE = 200  # runs per API call (Prefect's default page limit)
WAITING = ("SCHEDULED", "PENDING")


@dataclass
class Block:
    stage: str
    partitions: list[int]
    attempts: int = 0  # submitted by this parent
    number: int = 0  # the last attempt's number in the run version (earlier parents' included)
    flow_run_id: Any = None
    done: bool = False
    history: list[str] = field(default_factory=list)
    state: str | None = None  # the child run's state type as last read
    state_name: str | None = None
    pool: str | None = None
    verifying: list[int] = field(default_factory=list)  # ended Completed: partitions whose manifest is unread

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.partitions[0]}-{self.partitions[-1]}]"

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.stage, tuple(self.partitions)


class BlockFailedError(RuntimeError):
    """A block failed ``run.max_block_attempts`` times."""


class NoWorkerError(RuntimeError):
    """Child runs waited ``run.worker_wait_fail_s`` on a work pool where none of this run's children ran."""


def plan_blocks(cfg: PipelineConfig, only: list[int] | None = None) -> list[Block]:
    """Every chain stage's partitions (or those of ``only``) in blocks of ``run.block_size``, stages in
    registry order; a one-partition stage (the fine-tune) is planned only with all partitions."""
    size = cfg.run.block_size
    blocks = []
    for stage in registry.chain():
        ids = registry.partition_ids(cfg, stage.name)
        if only is not None:
            if stage.partitions == "one":
                continue
            ids = [i for i in ids if i in set(only)]
        blocks += [Block(stage.name, ids[i : i + size]) for i in range(0, len(ids), size)]
    return blocks


def top_up_blocks(cfg: PipelineConfig, blocks: list[Block], logger: logging.Logger) -> list[Block] | None:
    """Once every text block is done: the blocks of a new captions generation for ``text.target_triplets``
    (flows/target.py), [] when nothing is to add now, None when the target is settled."""
    if not all(b.done for b in blocks if b.stage in ("captions", "finetune", "text")):
        return []
    wanted = top_up(cfg, logger)
    if wanted is None:
        return None
    before = set(registry.partition_ids(cfg, "captions"))
    grown = cfg.model_copy(update={"captions": cfg.captions.model_copy(update={"num_captions": wanted})})
    registry.prepare(grown, "captions", logger)  # appends the generation (the children find it in the ledger)
    new = [pid for pid in registry.partition_ids(cfg, "captions") if pid not in before]
    return plan_blocks(cfg, new) if new else None


def deployment_name(cfg: PipelineConfig, preset: str, stage: str) -> str:
    return f"editforge-{stage}/{cfg.run.deployments.format(preset=preset, stage=stage)}"


def run_key(cfg: PipelineConfig) -> str:
    """What identifies a run version (its name and pack hash): the head of its child runs' idempotency
    keys, how a restarted parent finds the children of the run it takes over."""
    return f"editforge-{cfg.name}-{registry.stage_hash(cfg, 'pack')[:8]}"


def attempt_key(cfg_key: str, block: Block, attempt: int) -> str:
    return f"{cfg_key}/{block.label}/{attempt}"


def rounds(seconds: float, poll_s: float) -> int:
    """A wait in poll rounds (at least one)."""
    return max(1, math.ceil(seconds / poll_s))


class FanOut:
    """The driver: :meth:`start` once, :meth:`poll` until it returns True, :meth:`finish` (see module doc)."""

    def __init__(
        self, cfg: PipelineConfig, preset: str, overrides: list[str], logger: logging.Logger, client
    ):
        self.cfg, self.preset, self.overrides, self.logger, self.client = (
            cfg,
            preset,
            overrides,
            logger,
            client,
        )
        self.board = Board(cfg)
        self.board.extra["mode"] = "fan-out"
        self.hashes = self.board.hashes
        self.key = run_key(cfg)
        self.blocks = plan_blocks(cfg)
        self.done: dict[str, set[int]] = {s: set() for s in self.hashes}  # finished under this config
        self.manifests: dict[str, dict[int, dict]] = {s: {} for s in self.hashes}
        self.unread: dict[str, list[int]] = {s: [] for s in self.hashes}  # listed finished, manifest not read
        self.before: dict[str, set[int]] = {
            s: set() for s in self.hashes
        }  # finished when this parent started
        self.owners: dict[tuple[str, int], tuple[float, dict | None]] = {}  # lease: (mtime read at, owner)
        self.stalled: dict[
            str, int
        ] = {}  # pool -> poll rounds with children waiting and none of ours running
        self.warned: dict[str, str] = {}  # pool -> what was said
        self.top_ups = 0 if cfg.text.target_triplets else None  # None: no target, or the target is settled
        self.polls = 0
        self.reads = 0  # storage reads in the current poll (manifests, leases)
        self.stats: dict[str, Any] = {}  # the last poll's: seconds, listings, reads, api calls, submitted
        self.dirty: set[str] = set()  # stages whose table changed since it was published
        self.leases_at = -math.inf  # when the leases were last listed (monotonic)
        self.failed_polls = 0  # in a row
        self.parent_id = _own_flow_run_id()

    # -- start: what is finished, what is in flight ----------------------------------------------------

    def start(self) -> None:
        for stage, config_hash in self.hashes.items():
            ids = set(finished_ids(self.cfg.output_root, stage, config_hash))  # one listing per stage
            self.done[stage] |= ids
            self.before[stage] = ids
            self.unread[stage] = sorted(ids)
        self._totals()
        for block in self.blocks:
            block.done = all(pid in self.done[block.stage] for pid in block.partitions)
        adopted = self._adopt()
        finished = sum(b.done for b in self.blocks)
        self.logger.info(
            "fan-out: %d blocks, %d already finished, %d in flight adopted (run %s)",
            len(self.blocks),
            finished,
            adopted,
            self.key,
        )

    def _runs(self, flow_run_filter) -> list:
        runs, offset = [], 0
        while True:
            page = self.client.read_flow_runs(flow_run_filter=flow_run_filter, limit=PAGE, offset=offset)
            self.stats["api"] = self.stats.get("api", 0) + 1
            runs += page
            if len(page) < PAGE:
                return runs
            offset += PAGE

    def _adopt(self) -> int:
        """The child runs earlier parents of this run version submitted, found by their idempotency keys
        (attempts 1, 2, ... until one is missing): the newest in flight or Completed becomes this parent's
        (a completed one is verified like any); the numbering goes on after the last. Only this parent's
        own submissions count towards ``run.max_block_attempts`` (a re-run after a failure starts afresh)."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

        width, adopted = self.cfg.run.max_block_attempts, 0
        pending = [b for b in self.blocks if not b.done]
        first = 1
        while pending:
            keys = {attempt_key(self.key, b, a): (b, a) for b in pending for a in range(first, first + width)}
            names, runs = list(keys), []
            for i in range(0, len(names), PAGE):
                runs += self._runs(
                    FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=names[i : i + PAGE]))
                )
            found: dict[int, int] = {}
            for run in sorted(runs, key=lambda r: keys[r.idempotency_key][1]):
                block, attempt = keys[run.idempotency_key]
                block.number = attempt
                found[id(block)] = found.get(id(block), 0) + 1
                state = run.state_type.value if run.state_type else None
                if state == "COMPLETED" or (run.state is not None and not run.state.is_final()):
                    block.flow_run_id = run.id  # the next poll reads its state
                else:
                    block.flow_run_id = None
                    block.history.append(state or "?")
            pending = [b for b in pending if found.get(id(b)) == width]  # every attempt there: look further
            first += width
        for b in self.blocks:
            adopted += b.flow_run_id is not None
        return adopted

    # -- a poll ---------------------------------------------------------------------------------------

    def poll(self) -> bool:
        """One round; True when every block is done (and the captions target settled)."""
        t0 = time.perf_counter()
        self.polls += 1
        self.reads = 0
        self.stats = {"poll": self.polls, "listings": 0, "reads": 0, "api": 0, "submitted": 0}
        try:
            self._top_up()
            self._states()
            self._verify()
            self._leases()
            self._submit()
            self._waiting()
            self._live()
            self._fill()
            self._publish()
            self.failed_polls = 0
        except (BlockFailedError, NoWorkerError):
            raise
        except (
            httpx.HTTPError,
            OSError,
        ) as err:  # a server restarting, a store that throttles: the next poll
            status = getattr(getattr(err, "response", None), "status_code", None)
            self.failed_polls += 1
            if self.failed_polls >= FAILED_POLLS_MAX or (
                status is not None and status < 500 and status != 429
            ):
                raise
            self.logger.warning(
                "fan-out: poll %d failed (%s: %s); trying again (%d of %d in a row)",
                self.polls,
                type(err).__name__,
                str(err).splitlines()[0][:300],
                self.failed_polls,
                FAILED_POLLS_MAX,
            )
        self.stats.update(reads=self.reads, seconds=round(time.perf_counter() - t0, 4))
        return all(b.done for b in self.blocks) and self.top_ups is None

    def _budget(self) -> bool:
        return self.reads < READS_PER_POLL

    def _top_up(self) -> None:
        if self.top_ups is None:
            return
        added = (
            top_up_blocks(self.cfg, self.blocks, self.logger)
            if self.top_ups < self.cfg.text.max_top_ups
            else None
        )
        if added is None:
            self.top_ups = None
        elif added:
            self.top_ups += 1
            self.blocks += added
            self._totals()
            self.logger.info(
                "fan-out: %d block(s) added for captions generation %d", len(added), self.top_ups
            )

    def _states(self) -> None:
        """Every child in flight in one API call (per ``PAGE``); a final state handled."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        flying = {b.flow_run_id: b for b in self.blocks if b.flow_run_id is not None and not b.verifying}
        ids = list(flying)
        for i in range(0, len(ids), PAGE):
            for run in self._runs(FlowRunFilter(id=FlowRunFilterId(any_=ids[i : i + PAGE]))):
                block = flying.get(run.id)
                if block is None:
                    continue
                block.state = run.state_type.value if run.state_type else None
                block.state_name = run.state_name
                block.pool = run.work_pool_name
                if run.state is not None and run.state.is_final():
                    self._ended(block, run.state)

    def _ended(self, block: Block, state) -> None:
        block.history.append(state.type.value)
        if state.is_completed():
            block.verifying = [pid for pid in block.partitions if pid not in self.manifests[block.stage]]
            if not block.verifying:
                self._block_done(block)
            return
        self._retry(block, f"ended {state.type.value} ({state.message})")

    def _retry(self, block: Block, why: str) -> None:
        if block.attempts >= self.cfg.run.max_block_attempts:
            raise BlockFailedError(
                f"fan-out: {block.label} failed {block.attempts} times ({', '.join(block.history)}): {why}"
            )
        self.logger.warning("fan-out: %s %s: submitting it again", block.label, why)
        block.flow_run_id, block.verifying, block.state = None, [], None

    def _block_done(self, block: Block) -> None:
        block.done, block.flow_run_id, block.verifying = True, None, []

    def _read(self, stage: str, pid: int) -> dict | None:
        self.reads += 1
        manifest = read_manifest(self.cfg.output_root, stage, self.hashes[stage], pid, strict=True)
        if manifest is not None:  # kept without the per-file hashes (a render partition lists every image)
            self.manifests[stage][pid] = {k: v for k, v in manifest.items() if k not in ("outputs", "sizes")}
            self.done[stage].add(pid)
            self.board.add(stage, manifest, skipped=pid in self.before[stage])
            self.dirty.add(stage)
        return manifest

    def _totals(self) -> None:
        """The dashboard's partitions per stage, from the plan (no request)."""
        for stage in self.hashes:
            self.board.totals[stage] = sum(len(b.partitions) for b in self.blocks if b.stage == stage)

    def _verify(self) -> None:
        """The partitions of the blocks that ended Completed: each `_SUCCESS.json` read once."""
        for block in self.blocks:
            while block.verifying and self._budget():
                pid = block.verifying[0]
                if self._read(block.stage, pid) is None:
                    missing = layout.success_url(
                        self.cfg.output_root, block.stage, self.hashes[block.stage], pid
                    )
                    self.done[block.stage].discard(pid)
                    self._retry(block, f"ended Completed, but {missing} is not there under this config")
                    break
                block.verifying.pop(0)
                if not block.verifying:
                    self._block_done(block)

    def _leases(self) -> None:
        """Blocks running whose lease owner is gone: marked crashed (then submitted again)."""
        if time.monotonic() - self.leases_at < max(LEASES_EVERY_S, self.cfg.run.poll_s):
            return
        self.leases_at = time.monotonic()
        running: dict[str, list[Block]] = {}
        for b in self.blocks:
            if b.flow_run_id is not None and b.state == "RUNNING":
                running.setdefault(b.stage, []).append(b)
        here, ttl = socket.gethostname(), lease_ttl_s()
        self.board.extra["running"] = {}
        for stage, blocks in running.items():
            folder = layout.leases_dir(self.cfg.output_root, stage, self.hashes[stage])
            held = {name: info for name, info in storage.listing(folder).items() if name.startswith("part-")}
            self.stats["listings"] += 1
            self.board.extra.setdefault("running", {})[stage] = len(held)
            for block in blocks:
                gone = []
                for pid in block.partitions:
                    info = held.get(f"{layout.partition_name(pid)}.json")
                    if info is None:
                        continue
                    seen = self.owners.get((stage, pid))
                    aged = time.time() - info["mtime"] > ttl  # no heartbeat for the TTL: looks lost
                    if (seen is None or (aged and seen[0] != info["mtime"])) and self._budget():
                        self.reads += 1  # its owner, once; again only to confirm a lease that looks lost
                        owner = read_lease(
                            layout.lease_url(self.cfg.output_root, stage, self.hashes[stage], pid)
                        )
                        self.owners[(stage, pid)] = seen = (info["mtime"], owner)
                    owner = seen[1] if seen else None
                    if not owner:
                        continue
                    dead_here = (
                        owner.get("host") == here
                        and isinstance(owner.get("pid"), int)
                        and not storage.pid_alive(owner["pid"])
                    )
                    if dead_here or (aged and seen[0] == info["mtime"] and is_stale(owner, ttl)):
                        gone.append(f"part-{pid:05d} (pid {owner.get('pid')} on {owner.get('host')})")
                if gone:
                    from prefect.states import Crashed

                    message = f"its worker is gone: {', '.join(gone)} left behind"
                    self.client.set_flow_run_state(block.flow_run_id, Crashed(message=message), force=True)
                    self.stats["api"] += 1
                    block.history.append("CRASHED")
                    self._retry(block, message)

    def _ready(self, block: Block) -> bool:
        stage = registry.get(block.stage)
        for upstream in stage.upstreams(self.cfg):
            wanted = {stage.upstream_partition(registry.get(upstream), pid) for pid in block.partitions}
            if not wanted <= self.done[upstream]:
                return False
        return True

    def _submit(self) -> None:
        from prefect.deployments import run_deployment

        for block in self.blocks:
            if block.done or block.flow_run_id is not None or not self._ready(block):
                continue
            number = block.number + 1  # kept only once submitted: a retried submission reuses the key
            name = block.label if number == 1 else f"{block.label} attempt {number}"
            run = run_deployment(
                deployment_name(self.cfg, self.preset, block.stage),
                timeout=0,
                as_subflow=True,
                flow_run_name=name,
                idempotency_key=attempt_key(self.key, block, number),
                parameters={
                    "preset": self.preset,
                    "overrides": self.overrides,
                    "partitions": block.partitions,
                },
            )
            block.number, block.attempts = number, block.attempts + 1
            block.flow_run_id, block.state, block.pool = run.id, "SCHEDULED", run.work_pool_name
            self.stats["submitted"] += 1
            self.stats["api"] += 3  # the deployment, the parent's task run, the flow run
            self.logger.info("fan-out: %s submitted as flow run %s (attempt %d)", name, run.id, block.number)

    # -- no silent deadlock -------------------------------------------------------------------------------

    def _waiting(self) -> None:
        """Pools where children wait while none of this run's children runs: counted, reported, failed."""
        waiting: dict[str, list[Block]] = {}
        running: set[str] = set()
        for b in self.blocks:
            if b.flow_run_id is None or b.pool is None:
                continue
            if b.state in WAITING:
                waiting.setdefault(b.pool, []).append(b)
            elif b.state == "RUNNING":
                running.add(b.pool)
        warn = rounds(self.cfg.run.worker_wait_warn_s, self.cfg.run.poll_s)
        fail = rounds(self.cfg.run.worker_wait_fail_s, self.cfg.run.poll_s)
        for pool in list(self.stalled):
            if pool not in waiting or pool in running:
                self.stalled.pop(pool)
                if self.warned.pop(pool, None):
                    self.logger.info("fan-out: work pool '%s' runs this run's children again", pool)
        for pool, blocks in waiting.items():
            if pool in running:
                continue
            self.stalled[pool] = self.stalled.get(pool, 0) + 1
            n = self.stalled[pool]
            if n >= warn and (pool not in self.warned or n >= fail):
                labels = ", ".join(b.label for b in blocks[:4]) + (
                    f" and {len(blocks) - 4} more" if len(blocks) > 4 else ""
                )
                why = self._diagnose(pool)
                message = (
                    f"{len(blocks)} child run(s) ({labels}) waited {n} poll rounds (≥ {n * self.cfg.run.poll_s:.0f} s) "
                    f"on work pool '{pool}' with none of this run's children running there: {why}"
                )
                if n >= fail:
                    self._cancel(blocks, f"no worker took it on work pool '{pool}'")
                    raise NoWorkerError(
                        f"fan-out: {message}; failing after run.worker_wait_fail_s="
                        f"{self.cfg.run.worker_wait_fail_s:g} (the waiting child runs are cancelled)"
                    )
                self.warned[pool] = message
                self.logger.warning(
                    "fan-out: %s (failing after run.worker_wait_fail_s=%g)",
                    message,
                    self.cfg.run.worker_wait_fail_s,
                )
                from flows.dashboard import _emit, _resource

                _emit(
                    "editforge.run.waiting-for-worker",
                    _resource(self.cfg, "run"),
                    {"pool": pool, "waiting": [b.label for b in blocks], "rounds": n, "message": why},
                )
        self.board.extra["waiting"] = [{"pool": p, "message": m} for p, m in self.warned.items()]

    def _diagnose(self, pool: str) -> str:
        """Why nothing runs on ``pool``: paused, no worker online, or every worker busy (with what)."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            WorkPoolFilter,
            WorkPoolFilterName,
        )

        try:
            wp = self.client.read_work_pool(pool)
            workers = self.client.read_workers_for_work_pool(pool)
            busy = self.client.read_flow_runs(
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["RUNNING", "PENDING"]))
                ),
                limit=20,
            )
            self.stats["api"] += 3
        except Exception as err:  # the report must not stop the run
            return f"the pool could not be read ({type(err).__name__}: {err})"
        online = [w.name for w in workers if getattr(w.status, "value", w.status) == "ONLINE"]
        parts = []
        if wp.is_paused:
            parts.append(f"the pool is paused (`prefect work-pool resume {pool}`)")
        if not online:
            parts.append(f"no worker is online on it: start one (`prefect worker start --pool {pool}`)")
        else:
            parts.append(
                f"{len(online)} worker(s) online ({', '.join(online[:4])}), busy with {len(busy)} run(s)"
                + (": " + ", ".join(f"'{r.name}'" for r in busy[:4]) if busy else "")
            )
            if self.parent_id is not None and any(r.id == self.parent_id for r in busy):
                parts.append(
                    "one of them is this parent run itself, holding a slot its children need: run the "
                    "parent on a pool of its own (docs/monitoring.md)"
                )
        if wp.concurrency_limit is not None:
            parts.append(f"the pool's concurrency limit is {wp.concurrency_limit}")
        return "; ".join(parts)

    def _cancel(self, blocks: list[Block], why: str) -> None:
        from prefect.states import Cancelled

        for b in blocks:
            try:
                self.client.set_flow_run_state(b.flow_run_id, Cancelled(message=why), force=True)
            except Exception as err:
                self.logger.warning("fan-out: %s not cancelled (%s)", b.label, err)

    # -- what the dashboard shows -----------------------------------------------------------------------

    def _live(self) -> None:
        """The running figures of the partitions in flight: their progress artifacts, one API call."""
        import json

        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

        ids = [b.flow_run_id for b in self.blocks if b.state == "RUNNING" and registry.get(b.stage).progress]
        live: dict[tuple[str, int], dict] = {}
        if ids:
            found = self.client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=ids[:PAGE]),
                    type=ArtifactFilterType(any_=["progress"]),
                ),
                limit=PAGE,
            )
            self.stats["api"] += 1
            for artifact in found:
                try:
                    record = json.loads((artifact.metadata_ or {}).get(LIVE_KEY, "null"))
                except ValueError:
                    continue
                if (
                    record
                    and record.get("fraction", 1) < 1
                    and record["partition"] not in self.done.get(record["stage"], ())
                ):
                    live[(record["stage"], record["partition"])] = record
        self.board.live = live

    def _fill(self) -> None:
        """With the reads a poll has left: the manifests of partitions that were finished when this parent
        started (their figures in the tables; all of them by the end)."""
        for stage, pids in self.unread.items():
            while pids and self._budget():
                pid = pids.pop(0)
                if pid not in self.manifests[stage]:
                    self._read(stage, pid)

    def _publish(self) -> None:
        states = [b for b in self.blocks if not b.done]
        self.board.extra["blocks"] = {
            "running": sum(b.state == "RUNNING" for b in states),
            "queued on a pool": sum(b.state in WAITING for b in states),
            "waiting for their inputs": sum(b.flow_run_id is None for b in states),
            "retried": sum(b.attempts > 1 for b in self.blocks),
            "failed once or more": sum(any(h != "COMPLETED" for h in b.history) for b in self.blocks),
            "done": sum(b.done for b in self.blocks),
        }
        self.board.extra["mode"] = f"fan-out, poll {self.polls}"
        try:
            for stage in sorted(self.dirty):
                self.board.publish_stage(stage)
            self.dirty.clear()
            self.board.publish_status()
        except Exception as err:  # the dashboard never stops the run
            self.logger.warning("fan-out: the dashboard was not published (%s)", err)

    # -- the end ------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, list[dict]]:
        """Every manifest (those not read during the run read now), the shard index, the final tables."""
        for stage in self.hashes:
            for pid in registry.partition_ids(self.cfg, stage):
                if pid not in self.manifests[stage]:
                    self._read(stage, pid)
        manifests = {s: [self.manifests[s][p] for p in sorted(self.manifests[s])] for s in self.hashes}
        registry.finalize(self.cfg, "pack", manifests["pack"], self.logger)
        self.board.live = {}
        self.board.extra.pop("waiting", None)
        self._publish()
        for stage in self.hashes:
            self.board.publish_stage(stage)
        return manifests


def _own_flow_run_id():
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run.id if ctx and ctx.flow_run else None


def fan_out(
    cfg: PipelineConfig, preset: str, overrides: list[str], logger: logging.Logger
) -> dict[str, list[dict]]:
    """Run the chain as child flow runs of the stage deployments (see module doc); return the manifests."""
    from prefect.client.orchestration import get_client

    registry.prepare(cfg, "captions", logger)  # the captions ledger, once, before any captions block
    with get_client(sync_client=True) as client:
        driver = FanOut(cfg, preset, overrides, logger, client)
        driver.start()
        while not driver.poll():
            time.sleep(cfg.run.poll_s)
        return driver.finish()
