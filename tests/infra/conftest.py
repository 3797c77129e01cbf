"""The integration tier's shared helpers (prefect_cluster.py, beside this file) on the import path (the S3 API
its tests write to is tests/conftest.py's `s3`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
