"""Environment defaults for the embedded Prefect, set before `prefect` is imported.

Prefect state (SQLite database, logs) lives under the project's `.prefect/`, never `~/.prefect`;
analytics are off (no network); the ephemeral server gets a longer start-up timeout because a fresh
SQLite database takes longer than Prefect's default 20 s to migrate on a small machine. Anything
already set in the environment wins, so a real Prefect server (PREFECT_API_URL) is used as is.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "EDITFORGE_CACHE": str(PROJECT_ROOT / ".cache" / "editforge"),
    "TOKENIZERS_PARALLELISM": "false",
    # keep the demo's output readable: our own tqdm bars show progress, not every weight-loading bar
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    # On a small shared CPU, OpenMP spin-waiting across 2 threads made the tiny LM's training step 20x
    # slower (1.5 s vs 0.07 s) whenever another process was busy; one thread is the robust default.
    "OMP_NUM_THREADS": "1",
}

for _key, _value in DEFAULTS.items():
    os.environ.setdefault(_key, _value)
