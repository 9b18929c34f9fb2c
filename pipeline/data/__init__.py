"""Data sets: reading a local file or a hub data set into rows (sources.py), their digests, the
hub's checks (hub.py), and the starter config of `posttrain init` (starter.py)."""

# The shipped lm-eval tasks (pipeline/evaluation/lm_eval_tasks/suites.py) import it from here:
# their files' bytes are part of the evaluate stage's key, so their import line stays as it was.
from pipeline.data.sources import iter_jsonl

__all__ = ["iter_jsonl"]
