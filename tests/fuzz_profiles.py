"""Hypothesis settings for the fuzz suites (`tests/**/test_*_fuzz.py`).

`make test` runs the `ci` profile: derandomized (the same generated cases every run, so a failure is
reproducible and no run depends on luck), no example database, no per-example deadline (a time bound per
example is a timing test; the work is bounded by the size of what is generated instead, and pytest's
timeout bounds a whole test). `EDITFORGE_FUZZ=explore` draws new random cases, 20x as many, and keeps the
failures it finds in `.hypothesis/` — run it when hunting; add what it finds as an `@example` (the corpus
that grows with every bug found).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI_EXAMPLES = {"small": 60, "medium": 150, "large": 300}
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("EDITFORGE_FUZZ", "ci")
settings.load_profile(PROFILE)


def examples(size: str) -> int:
    """Generated cases per test at this size (`explore`: 20x)."""
    return CI_EXAMPLES[size] * (20 if PROFILE == "explore" else 1)
