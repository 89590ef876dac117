"""Fixtures shared by the worker tests that run the real tiny engine (CPU).

worker: a served worker (HTTP API and control socket) on a tiny engine, one
per test module. reference: a second engine with the same weights (same
seed), driven directly, that the served answers are checked against.
"""
from __future__ import annotations

import pytest
from worker_harness import engine_config, served

from agentcg.worker.engine import Engine


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with served(tmp_path_factory.mktemp("worker")) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference():
    return Engine(engine_config())
