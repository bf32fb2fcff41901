"""Fixtures of the search tests that start Ray."""
from __future__ import annotations

import pytest
import ray

from search.ray_setup import LOCAL_RAY_SYSTEM_CONFIG


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray for one test module (2 CPUs), shut down after it."""
    started = not ray.is_initialized()
    if started:  # address="local": a fresh cluster of our own, never one that happens to run here
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    yield
    if started:
        ray.shutdown()
