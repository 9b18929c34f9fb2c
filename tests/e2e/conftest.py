"""The end-to-end tests: pipelines and commands in real processes, under a Prefect API."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True, scope="session")
def prefect_server():
    """One temporary Prefect API (SQLite) for the whole session, as Prefect's docs advise."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
