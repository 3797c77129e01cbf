"""Hugging Face parquet export with the released dataset's columns.

`original_prompt, original_image, edit_prompt, edited_prompt, edited_image` — the columns of the
paper's released `timbrooks/instructpix2pix-clip-filtered` dataset, so existing trainers (diffusers'
`train_instruct_pix2pix.py`) read it unchanged. Images are stored as `{bytes, path}` structs and the
schema carries the `huggingface` features metadata, so `datasets.load_dataset("parquet", ...)`
decodes them as `Image` features.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.common import storage

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("original_prompt", pa.string()),
        ("original_image", IMAGE),
        ("edit_prompt", pa.string()),
        ("edited_prompt", pa.string()),
        ("edited_image", IMAGE),
    ]
).with_metadata(
    {
        "huggingface": json.dumps(
            {
                "info": {
                    "features": {
                        "original_prompt": {"dtype": "string", "_type": "Value"},
                        "original_image": {"_type": "Image"},
                        "edit_prompt": {"dtype": "string", "_type": "Value"},
                        "edited_prompt": {"dtype": "string", "_type": "Value"},
                        "edited_image": {"_type": "Image"},
                    }
                }
            }
        )
    }
)


def hf_rows(samples: list[dict], image_format: str) -> dict[str, list]:
    """Columns for the export from WebDataset sample dicts (as built by `tasks.pack.shards.sample_dict`)."""
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for s in samples:
        meta = json.loads(s["json"])
        key = s["__key__"]
        cols["original_prompt"].append(meta["input"])
        cols["original_image"].append(
            {"bytes": s[f"input.{image_format}"], "path": f"{key}_input.{image_format}"}
        )
        cols["edit_prompt"].append(meta["edit"])
        cols["edited_prompt"].append(meta["output"])
        cols["edited_image"].append(
            {"bytes": s[f"edited.{image_format}"], "path": f"{key}_edited.{image_format}"}
        )
    return cols


def write_hf_parquet(url: str, samples: list[dict], image_format: str) -> None:
    table = pa.Table.from_pydict(hf_rows(samples, image_format), schema=SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(url, sink.getvalue())
