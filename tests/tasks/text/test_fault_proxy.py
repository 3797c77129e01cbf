"""Online generation through a fault proxy (tests/fakes/fault_proxy.py) in front of the OpenAI-compatible fake:
connections reset before and after the answer, answers cut in half, slow streams and an answer that never
comes, each placed by its request number; the triplets are the bytes of a clean run."""

from __future__ import annotations

from pathlib import Path

from fakes.fault_proxy import FaultProxy
from text_helpers import make_captions, openai_config, write_captions

from tasks.text.stage import run as run_text_partition

MODEL = "ft:gpt-4o-mini-2024-07-18:fake-org:editforge:abc123"
SETTINGS = (f"text.openai.model={MODEL}", "text.openai.concurrency=4", "text.openai.checkpoint_every=4",
            "text.openai.checkpoint_interval_s=3600", "text.max_attempts=2")
FAULTS = {1: "reset", 2: "lost", 5: "partial", 7: "slow", 9: "stall", 11: "reset", 13: "partial", 17: "lost",
          20: "slow", 24: "partial"}


def _bytes(root: Path, manifest: dict) -> bytes:
    return (root / manifest["path"] / "triplets.parquet").read_bytes()


def test_faults_between_the_client_and_the_server_end_with_the_clean_bytes(fake, tmp_path):
    fake.knobs.malformed_rate = 0.3  # some captions take a second try: more requests to break
    captions = make_captions(24)
    clean = tmp_path / "clean"
    write_captions(str(clean), 0, captions)
    reference = run_text_partition(openai_config(fake, clean, *SETTINGS), 0)

    root = tmp_path / "proxied"
    write_captions(str(root), 0, captions)
    with FaultProxy(fake.base_url, FAULTS) as proxy:
        cfg = openai_config(fake, root, *SETTINGS, f"text.openai.base_url={proxy.base_url}",
                            "text.openai.request_timeout_s=3")
        manifest = run_text_partition(cfg, 0)
    assert proxy.faults_done() == {"reset": 2, "lost": 2, "partial": 3, "slow": 2, "stall": 1}
    assert _bytes(root, manifest) == _bytes(clean, reference)
    c = manifest["counts"]
    assert c["generation_attempts"] == reference["counts"]["generation_attempts"]
    assert c.get("retries_connection", 0) + c.get("retries_deadline", 0) + c.get("retries_timeout", 0) == 8, c
