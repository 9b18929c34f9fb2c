import os

# No test may reach a hub; everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test Prefect servers would try to send usage data: with no internet they log errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Commands run by the tests use Prefect's temporary servers and leave no server behind; the kept
# server `posttrain run` uses otherwise has its own test (tests/e2e/test_cli.py).
os.environ.setdefault("POSTTRAIN_PREFECT_SERVER", "temporary")
