"""What the VLM judge costs: tokens and money per judged sample and per kept pair (torch-free).

Prices come from ``judges.vlm.prices`` (USD per million tokens, by model id or the longest key that
prefixes it: ``gpt-4o-mini-2024-07-18`` is priced as ``gpt-4o-mini``); a request answered through the
Batch API costs ``batch_discount`` of that. A model the table does not name (a served open model) has
tokens but no price (cost None). The judge stage records each judged sample's tokens and cost in
``judgments.parquet``; its manifest and the filter's hold the totals, per judged sample and per kept pair;
:func:`estimate` projects them for a number of kept pairs (``editforge estimate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.config import TokenPrice, VLMJudgeConfig
from tasks.common.contract import figures


def price_for(model: str, prices: Mapping[str, TokenPrice]) -> TokenPrice | None:
    """The price of ``model``: its own entry, else the longest key it starts with, else None."""
    if model in prices:
        return prices[model]
    keys = sorted((k for k in prices if model.startswith(k)), key=len, reverse=True)
    return prices[keys[0]] if keys else None


def row_costs(rows: pd.DataFrame, v: VLMJudgeConfig) -> np.ndarray:
    """USD per judged row (``vlm_prompt_tokens``, ``vlm_completion_tokens``, ``vlm_batch``); NaN unpriced."""
    price = price_for(v.model, v.prices)
    if price is None or not len(rows):
        return np.full(len(rows), np.nan)
    usd = (
        rows["vlm_prompt_tokens"].to_numpy(dtype=float) * price.input_per_mtok
        + rows["vlm_completion_tokens"].to_numpy(dtype=float) * price.output_per_mtok
    ) / 1e6
    return usd * np.where(rows["vlm_batch"].fillna(False).astype(bool).to_numpy(), v.batch_discount, 1.0)


def spent(rows: pd.DataFrame) -> dict[str, Any]:
    """Totals over the judged rows of ``rows`` (a judgments table, or samples joined with one)."""
    judged = rows[rows["vlm_status"].notna()] if "vlm_status" in rows else rows.iloc[:0]
    cost = judged["vlm_cost_usd"].to_numpy(dtype=float) if "vlm_cost_usd" in judged else np.zeros(0)
    return {
        "judged": len(judged),
        "prompt_tokens": int(judged["vlm_prompt_tokens"].fillna(0).sum()) if len(judged) else 0,
        "completion_tokens": int(judged["vlm_completion_tokens"].fillna(0).sum()) if len(judged) else 0,
        "cost_usd": None if len(judged) and np.isnan(cost).all() else round(float(np.nansum(cost)), 9),
    }


def estimate(
    judge_manifests: Iterable[Mapping[str, Any]],
    filter_manifests: Iterable[Mapping[str, Any]],
    pairs: int | None = None,
) -> dict[str, Any]:
    """Measured tokens and cost from finished manifests, per judged sample and per kept pair, and what
    ``pairs`` kept pairs would cost at that rate (default: the kept pairs measured)."""
    judged = prompt = completion = 0
    cost: float | None = 0.0
    for m in judge_manifests:
        c = m.get("counts", {})
        judged += c.get("vlm_judged", 0)
        prompt += c.get("vlm_prompt_tokens", 0)
        completion += c.get("vlm_completion_tokens", 0)
        usd = figures(m).get("vlm_cost_usd")
        cost = None if cost is None or usd is None else cost + usd
    kept = sum(m.get("counts", {}).get("out", 0) for m in filter_manifests)
    per_pair = cost / kept if cost is not None and kept else None
    return {
        "judged": judged,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": cost,
        "kept_pairs": kept,
        "cost_per_judged_usd": cost / judged if cost is not None and judged else None,
        "tokens_per_judged": (prompt + completion) / judged if judged else None,
        "judged_per_kept_pair": judged / kept if kept else None,
        "cost_per_kept_pair_usd": per_pair,
        "projected_pairs": pairs if pairs is not None else kept,
        "projected_cost_usd": per_pair * (pairs if pairs is not None else kept)
        if per_pair is not None
        else None,
    }
