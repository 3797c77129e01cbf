"""Fan-out: one `editforge-generate` flow run drives the whole cluster through Prefect deployments.

With ``run.mode: fan-out`` the generate flow does not run the stages itself. It splits each stage's
partitions into blocks of ``run.block_size`` and submits every block as a child flow run of that
stage's deployment (``run.deployments``, e.g. ``demo-render`` → `editforge-render/demo-render`) with
`run_deployment`, so the work pool the deployment names (GPU for render, CPU for filter, ...) and
its workers do the work. A block is submitted as soon as the blocks it reads are finished — render
block 3 does not wait for text block 7 — and the stages that are one partition (the fine-tune) run
once, before anything that reads them. A block that fails is submitted again, at most
``run.max_block_attempts`` times in all, then the run stops naming it. The captions ledger is extended
here once, and the shard index is written here at the end. With ``text.target_triplets``, once every
text block is done the captions are topped up (a new generation, flows/target.py) and the new
partitions' blocks join the plan.

A block whose flow run is still running but whose worker is gone — the lease of a partition it
holds belongs to a process that no longer exists, or has had no heartbeat for `EDITFORGE_LEASE_TTL_S`
(:mod:`tasks.common.lease`) — is marked crashed and submitted again; the new run takes the lease
over and resumes the partition from its checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flows.target import top_up
from tasks import registry
from tasks.common.config import PipelineConfig
from tasks.common.contract import is_done
from tasks.common.layout import lease_url
from tasks.common.lease import is_stale, read_lease


@dataclass
class Block:
    stage: str
    partitions: list[int]
    attempts: int = 0
    flow_run_id: object | None = None
    done: bool = False
    history: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.partitions[0]}-{self.partitions[-1]}]"


class BlockFailedError(RuntimeError):
    """A block failed ``run.max_block_attempts`` times."""


def plan_blocks(cfg: PipelineConfig, only: list[int] | None = None) -> list[Block]:
    """Every chain stage's partitions (or those of ``only``) in blocks of ``run.block_size``, stages in
    registry order; a one-partition stage (the fine-tune) is planned only with all partitions."""
    size = cfg.run.block_size
    blocks = []
    for stage in registry.chain():
        ids = stage.partition_ids(cfg)
        if only is not None:
            if stage.partitions == "one":
                continue
            ids = [i for i in ids if i in set(only)]
        blocks += [Block(stage.name, ids[i: i + size]) for i in range(0, len(ids), size)]
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


class Progress:
    """Which partitions are finished under this config (a finished one stays so: it is read once)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.hashes = {s.name: registry.stage_hash(cfg, s.name) for s in registry.chain()}
        self.finished: set[tuple[str, int]] = set()

    def pending(self, stage: str, partitions: list[int]) -> list[int]:
        left = []
        for pid in partitions:
            if (stage, pid) not in self.finished:
                if is_done(self.cfg.output_root, stage, pid, self.hashes[stage]):
                    self.finished.add((stage, pid))
                else:
                    left.append(pid)
        return left

    def inputs_ready(self, block: Block) -> bool:
        """Every partition this block reads is finished under the hash this config expects."""
        stage = registry.get(block.stage)
        for upstream in stage.upstreams(self.cfg):
            wanted = sorted({stage.upstream_partition(registry.get(upstream), pid) for pid in block.partitions})
            if self.pending(upstream, wanted):
                return False
        return True


def abandoned(cfg: PipelineConfig, block: Block, config_hash: str) -> list[str]:
    """The partitions of a running block whose lease's owner is gone (see module doc)."""
    gone = []
    for pid in block.partitions:
        held = read_lease(lease_url(cfg.output_root, block.stage, config_hash, pid))
        if held and is_stale(held):
            gone.append(f"part-{pid:05d} (pid {held.get('pid')} on {held.get('host')})")
    return gone


def deployment_name(cfg: PipelineConfig, preset: str, stage: str) -> str:
    return f"editforge-{stage}/{cfg.run.deployments.format(preset=preset, stage=stage)}"


def fan_out(cfg: PipelineConfig, preset: str, overrides: list[str], logger: logging.Logger) -> dict[str, list[dict]]:
    """Run the chain as child flow runs of the stage deployments (see module doc); return the manifests."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    registry.prepare(cfg, "captions", logger)  # the captions ledger, once, before any captions block
    blocks, progress = plan_blocks(cfg), Progress(cfg)
    top_ups = 0 if cfg.text.target_triplets else None  # None: no target, or the target is settled
    with get_client(sync_client=True) as client:
        while not all(b.done for b in blocks) or top_ups is not None:
            if top_ups is not None:
                added = top_up_blocks(cfg, blocks, logger) if top_ups < cfg.text.max_top_ups else None
                if added is None:
                    top_ups = None
                elif added:
                    top_ups += 1
                    blocks += added
                    logger.info("fan-out: %d block(s) added for captions generation %d", len(added), top_ups)
            for block in blocks:
                if block.done or block.flow_run_id is not None or not progress.inputs_ready(block):
                    continue
                block.attempts += 1
                run = run_deployment(deployment_name(cfg, preset, block.stage), timeout=0, as_subflow=True,
                                     parameters={"preset": preset, "overrides": overrides,
                                                 "partitions": block.partitions})
                block.flow_run_id = run.id
                logger.info("fan-out: %s submitted as flow run %s (attempt %d)", block.label, run.name, block.attempts)
            for block in blocks:
                if block.done or block.flow_run_id is None:
                    continue
                state = client.read_flow_run(block.flow_run_id).state
                if state is not None and state.is_running() and (gone := abandoned(cfg, block, progress.hashes[block.stage])):
                    from prefect.states import Crashed

                    state = Crashed(message=f"its worker is gone: {', '.join(gone)} left behind")
                    client.set_flow_run_state(block.flow_run_id, state, force=True)
                if state is None or not state.is_final():
                    continue
                block.history.append(state.type.value)
                if state.is_completed() and not progress.pending(block.stage, block.partitions):
                    block.done = True
                    continue
                if block.attempts >= cfg.run.max_block_attempts:
                    raise BlockFailedError(f"fan-out: {block.label} failed {block.attempts} times "
                                           f"({', '.join(block.history)}): {state.message}")
                logger.warning("fan-out: %s ended %s (%s): submitting it again", block.label, state.type.value,
                               state.message)
                block.flow_run_id = None
            time.sleep(cfg.run.poll_s)
    manifests = {s.name: list(registry.manifests(cfg, s.name).values()) for s in registry.chain()}
    registry.finalize(cfg, "pack", manifests["pack"], logger)
    return manifests
