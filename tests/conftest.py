import os

# No test may reach a hub; everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test Prefect servers would try to send usage data: with no internet they log errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
