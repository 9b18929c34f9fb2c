"""Progress bars named after the running stage, so a person can tell which stage a bar is for
when several run one after another in one terminal."""

from __future__ import annotations

import os

from tqdm.auto import tqdm

STAGE_ENV = "POSTTRAIN_STAGE"  # the pipeline sets it for each stage process


def stage_bar(*args, desc: str | None = None, **kwargs) -> tqdm:
    """tqdm (its own arguments) with the stage's name before `desc`; vLLM takes it as its
    `use_tqdm` to name its bars too."""
    stage = os.environ.get(STAGE_ENV, "posttrain")
    return tqdm(*args, desc=f"{stage}: {desc}" if desc else stage, **{"dynamic_ncols": True, **kwargs})
