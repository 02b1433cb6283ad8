from __future__ import annotations

import pytest

from tests.integration.procs import Cluster


@pytest.fixture
def cluster(tmp_path, request):
    c = Cluster(tmp_path)
    yield c
    c.close()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(c.output())


@pytest.fixture
def up(cluster):
    """A broker and one worker with two processes that runs the examples and the test jobs."""
    cluster.broker()
    cluster.worker(concurrency=2, imports=("corral.examples", "tests.jobs"))
    return cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
