import os

# No test may reach a hub; everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test Prefect servers would try to send usage data: with no internet they log errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


import pytest


@pytest.fixture(autouse=True, scope="session")
def prefect_server():
    """One temporary Prefect API (SQLite) for the whole session, as Prefect's docs advise."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
