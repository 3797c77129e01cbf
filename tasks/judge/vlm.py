"""The VLM judge's requests and answers: images as base64 data URLs, the rubric's messages, the JSON verdict.

A request is one chat completion per candidate pair: the rubric (``prompts/judge_system.txt``), the
instruction and both captions (``judge_user.txt``), then the original and the edited image as
``image_url`` parts (``data:image/jpeg;base64,...``, resized to ``judges.vlm.image_size`` on the longest
side), with ``temperature``, ``seed`` and ``max_completion_tokens`` from ``judges.vlm`` and, unless
``response_format: none``, a JSON response format (``json_schema``: the verdict's schema, strict).

The answer is parsed as JSON (a fenced code block or prose around one object is tolerated) and validated
with pydantic (:class:`Verdict`: three scores in [0, 10] and a reason); anything else is ``unparseable``
and counted as such. The overall score is VIEScore's: sqrt(min(semantic scores) x quality), the
semantic scores being the instruction followed and the unedited content preserved.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
from typing import Annotated, Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prompts.templates import judge_messages
from tasks.common.config import VLMJudgeConfig

RUBRIC = "viescore-v1"  # the rubric's name and version, recorded with every judgment
Score = Annotated[float, Field(ge=0, le=10, strict=True)]
JUDGMENT_COLUMNS = [
    "sample_key",
    "caption_id",
    "vlm_rubric",
    "vlm_model",
    "vlm_status",
    "vlm_instruction",
    "vlm_preservation",
    "vlm_quality",
    "vlm_score",
    "vlm_reasoning",
    "vlm_raw",
    "vlm_error",
    "vlm_prompt_tokens",
    "vlm_completion_tokens",
    "vlm_batch",
    "vlm_input_sha",
]


class Verdict(BaseModel):
    """The rubric's answer: three integers 0-10 (numbers accepted) and a short reason."""

    model_config = ConfigDict(extra="ignore")

    instruction_followed: Score
    preservation: Score
    quality: Score
    reasoning: str = ""

    @property
    def overall(self) -> float:
        """VIEScore's overall: sqrt(min(instruction followed, preservation) x quality), in [0, 10]."""
        return math.sqrt(min(self.instruction_followed, self.preservation) * self.quality)


VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "instruction_followed": {"type": "integer"},
        "preservation": {"type": "integer"},
        "quality": {"type": "integer"},
        "reasoning": {"type": "string"},
    },
    "required": ["instruction_followed", "preservation", "quality", "reasoning"],
    "additionalProperties": False,
}
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


def parse_verdict(text: str | None) -> tuple[Verdict | None, str | None]:
    """(the verdict, None) or (None, why it is unparseable)."""
    if not text or not text.strip():
        return None, "empty answer"
    body = _FENCE.sub("", text.strip())
    try:
        data = json.loads(body)
    except ValueError:
        start, end = body.find("{"), body.rfind("}")
        if start < 0 or end <= start:
            return None, "no JSON object in the answer"
        try:
            data = json.loads(body[start : end + 1])
        except ValueError as err:
            return None, f"invalid JSON: {err}"
    if not isinstance(data, dict):
        return None, f"expected a JSON object, got {type(data).__name__}"
    try:
        return Verdict.model_validate(data), None
    except ValidationError as err:
        first = err.errors()[0]
        return None, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def image_url(png: bytes, v: VLMJudgeConfig) -> str:
    """A rendered PNG as the data URL the judge is sent (resized, re-encoded as ``image_format``)."""
    if v.image_format == "png" and v.image_size is None:
        data, mime = png, "image/png"
    else:
        image = Image.open(io.BytesIO(png)).convert("RGB")
        if v.image_size is not None and max(image.size) > v.image_size:
            scale = v.image_size / max(image.size)
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                Image.Resampling.LANCZOS,
            )
        buf = io.BytesIO()
        if v.image_format == "png":
            image.save(buf, format="PNG")
            mime = "image/png"
        else:
            image.save(buf, format="JPEG", quality=v.image_quality)
            mime = "image/jpeg"
        data = buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def input_sha(urls: list[str]) -> str:
    """What the judge saw, as a short digest of its image URLs (recorded per judgment)."""
    return hashlib.sha256("\n".join(urls).encode("ascii")).hexdigest()[:16]


def request_body(
    v: VLMJudgeConfig, instruction: str, input_caption: str, output_caption: str, urls: list[str]
) -> dict[str, Any]:
    """The chat completion request grading one pair (``urls``: original, edited)."""
    parts = [{"type": "image_url", "image_url": {"url": url, "detail": v.detail}} for url in urls]
    body: dict[str, Any] = {
        "model": v.model,
        "messages": judge_messages(instruction, input_caption, output_caption, parts),
        "temperature": v.temperature,
        "seed": v.seed,
        "max_completion_tokens": v.max_tokens,
    }
    if v.response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif v.response_format == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "edit_judgment", "strict": True, "schema": VERDICT_SCHEMA},
        }
    return body


def judgment_row(
    sample_key: str,
    caption_id: str,
    v: VLMJudgeConfig,
    *,
    raw: str | None,
    status: str | None = None,
    error: str | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    batch: bool = False,
    sha: str = "",
) -> dict[str, Any]:
    """One judged sample: the scores when the answer parses (``status`` ok), else ``unparseable`` or
    ``refused`` (the request was refused by the server) with why."""
    verdict = None
    if status is None:
        verdict, error = parse_verdict(raw)
        status = "ok" if verdict is not None else "unparseable"
    nan = float("nan")
    return {
        "sample_key": sample_key,
        "caption_id": caption_id,
        "vlm_rubric": RUBRIC,
        "vlm_model": v.model,
        "vlm_status": status,
        "vlm_instruction": verdict.instruction_followed if verdict else nan,
        "vlm_preservation": verdict.preservation if verdict else nan,
        "vlm_quality": verdict.quality if verdict else nan,
        "vlm_score": round(verdict.overall, 6) if verdict else nan,
        "vlm_reasoning": verdict.reasoning if verdict else None,
        "vlm_raw": raw,
        "vlm_error": error,
        "vlm_prompt_tokens": int(prompt_tokens),
        "vlm_completion_tokens": int(completion_tokens),
        "vlm_batch": bool(batch),
        "vlm_input_sha": sha,
    }
