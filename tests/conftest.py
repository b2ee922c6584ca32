"""Shared pytest set-up: a bounded hypothesis profile so the whole suite fits CI's time."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("SECATEURS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# CI runs two xdist workers on two cores: one torch thread each avoids oversubscription, which
# slowed some tests 15x on the shared machine. SECATEURS_TEST_THREADS overrides it.
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("SECATEURS_TEST_THREADS", "1")))
