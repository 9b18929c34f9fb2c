"""The devices of the pipelines a `compare` runs side by side (`compare.parallel`): each pipeline
its own GPUs, or on a machine without GPUs its own cores. Told without importing torch: the flow's
process must not initialise CUDA, which its stages' processes use."""

from __future__ import annotations

import os

from pipeline.config.schema import DEVICES, ConfigError, PipelineConfig, cuda_gpu_visible

GPU_ENV = "CUDA_VISIBLE_DEVICES"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them; without that
    variable, CUDA's numbers for the driver's device files (one for WSL2's, which does not say).
    Only their count: in a container the files keep the host's numbers, CUDA counts from 0."""
    if not cuda_gpu_visible():
        return []
    if (named := os.environ.get(GPU_ENV)) is not None:
        return [d.strip() for d in named.split(",") if d.strip()]
    return [str(i) for i in range(len(list(DEVICES.glob("nvidia[0-9]*"))) or 1)]


def gpus_per_pipeline(cfg: PipelineConfig) -> int:
    """What one pipeline's stages use at most: a training stage's processes, or the sampling's engines."""
    return max(cfg.launch.num_processes, cfg.sampling.tensor_parallel_size * cfg.sampling.data_parallel_size)


def pipeline_devices(cfg: PipelineConfig, pipelines: int) -> list[dict[str, str]]:
    """One environment per pipeline that may run at once (at most `pipelines`), added to its
    stages' own: its GPUs; {} on a machine without GPUs, where each stage takes its
    `launch.cpu_threads` alone or side by side (a vLLM CPU engine binds its own threads as it
    would alone), and {} for one pipeline at a time, which keeps the whole machine. Refuses a
    `compare.parallel` the devices cannot hold."""
    wanted = cfg.compare.parallel
    gpus = visible_gpus()
    if gpus:
        each = gpus_per_pipeline(cfg)
        fit = len(gpus) // each
        need = (f"{each} GPU{'s' * (each > 1)} each (the most of launch.num_processes and sampling."
                f"tensor_parallel_size x data_parallel_size), and {len(gpus)} are visible")
    else:
        cores = len(os.sched_getaffinity(0))
        each = cfg.launch.cpu_threads or cores
        fit = cores // each
        need = f"{each} cores each (launch.cpu_threads{'' if cfg.launch.cpu_threads else ' unset: all'}), and {cores} are here"
    if wanted != "auto" and wanted > max(fit, 1):  # one at a time always runs, on whatever there is
        advice = "" if gpus else ("; a lower launch.cpu_threads fits more, and changes the weights a CPU trains (the "
                                  "same for every pipeline)")
        raise ConfigError(f"compare.parallel: {wanted} pipelines side by side need {need}: lower it, or set it to "
                          f"auto{advice}")
    count = max(1, min(fit if wanted == "auto" else wanted, pipelines))
    if count == 1 or not gpus:
        return [{}] * count
    return [{GPU_ENV: ",".join(gpus[i * each:(i + 1) * each])} for i in range(count)]
