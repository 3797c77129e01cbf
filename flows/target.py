"""Top the captions up until ``text.target_triplets`` triplets are accepted (the paper's 454,445).

The text stage rejects some completions, so sampling N captions gives fewer than N triplets. With
``text.target_triplets`` set, once every text partition is finished the generate flow asks
:func:`top_up` how many captions the ledger should hold: the accepted count so far, the acceptance
rate measured on the captions processed, and the shortfall give the captions still needed (plus 10%,
so one round usually suffices). It is passed as ``captions.num_captions``, which makes the captions
stage append a generation (:mod:`tasks.captions.generations`) whose new partitions then run through
captions and text. Nothing is lost or redone on a resume: the ledger and the finished partitions
are the whole state, so a killed run picks up where it was.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from tasks import registry
from tasks.captions.generations import ledger
from tasks.common.config import PipelineConfig

log = logging.getLogger("editforge")


@dataclass(frozen=True)
class Standing:
    accepted: int
    processed: int
    taken: int

    @property
    def rate(self) -> float:
        return self.accepted / self.processed if self.processed else 0.0


def standing(cfg: PipelineConfig, gens: list | None = None) -> Standing:
    """Triplets accepted and captions processed by the finished text partitions; captions in the ledger
    (``gens``: the ledger, when the caller has read it)."""
    done = [m for m in registry.manifests(cfg, "text").values() if m]
    gens = ledger(cfg) if gens is None else gens
    return Standing(
        accepted=sum(m["counts"].get("out", 0) for m in done),
        processed=sum(m["counts"].get("in", 0) for m in done),
        taken=gens[-1].record["total_taken"] if gens else 0,
    )


def top_up(cfg: PipelineConfig, logger: logging.Logger | None = None) -> int | None:
    """The ``captions.num_captions`` that should meet the target, or None when it is met (or cannot be)."""
    logger = logger or log
    target = cfg.text.target_triplets
    if not target:
        return None
    gens = ledger(cfg)
    now = standing(cfg, gens)
    if now.accepted >= target:
        logger.info("text: %d triplets accepted, target %d met", now.accepted, target)
        return None
    if gens and gens[-1].record["threshold"] >= 1.0:
        logger.warning(
            "text: %d of %d target triplets; the sources hold no caption not taken yet", now.accepted, target
        )
        return None
    if now.accepted == 0:
        logger.warning(
            "text: no triplet accepted from %d captions: not sampling more for the target", now.processed
        )
        return None
    more = math.ceil((target - now.accepted) / now.rate * 1.1)
    logger.info(
        "text: %d of %d target triplets (%.0f%% of %d captions accepted): sampling %d more captions",
        now.accepted,
        target,
        100 * now.rate,
        now.processed,
        more,
    )
    return now.taken + more
