"""How many of a compare's pipelines run side by side, and the devices each gets
(pipeline.orchestration.devices), on a machine faked to have GPUs or cores."""

import pytest

from pipeline.config.schema import ConfigError, parse_config
from pipeline.orchestration import devices


def compare(parallel="auto", **sections):
    return parse_config({"name": "x", "compare": {"arms": {"ce": {"name": "ce"}}, "parallel": parallel}, **sections})


@pytest.fixture
def gpus(monkeypatch, tmp_path):
    """Four GPUs' device files, as a container sees the host's GPUs 2-5, and no CUDA_VISIBLE_DEVICES."""
    for i in range(2, 6):
        (tmp_path / f"nvidia{i}").touch()
    (tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(devices, "DEVICES", tmp_path)
    monkeypatch.setattr("pipeline.config.schema.DEVICES", tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_each_pipeline_gets_gpus_of_its_own(gpus, monkeypatch):
    assert devices.visible_gpus() == ["0", "1", "2", "3"]  # CUDA's numbers, not the files'
    assert devices.pipeline_devices(compare(1, launch={"num_processes": 8}), 8) == [{}]  # one at a time: always
    assert devices.pipeline_devices(compare(), 8) == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(4)]
    two_each = compare(launch={"num_processes": 2})
    assert devices.pipeline_devices(two_each, 8) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    tp = compare(2, sampling={"tensor_parallel_size": 2})
    assert devices.pipeline_devices(tp, 8) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert devices.pipeline_devices(compare(), 3) == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(3)]  # 3 to run
    assert devices.pipeline_devices(compare(1), 8) == [{}]  # one at a time: the whole machine, as without compare
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert devices.pipeline_devices(compare(), 8) == [{"CUDA_VISIBLE_DEVICES": "5"}, {"CUDA_VISIBLE_DEVICES": "7"}]
    with pytest.raises(ConfigError, match=r"^compare\.parallel: 3 pipelines side by side need 1 GPU each .*and 2 are "
                                          r"visible: lower it, or set it to auto$"):
        devices.pipeline_devices(compare(3), 8)


def test_without_gpus_the_cores_hold_as_many_as_launch_cpu_threads_allow(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever the machine has
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert devices.pipeline_devices(compare(), 8) == [{}]  # each stage takes every core: one at a time
    assert devices.pipeline_devices(compare(launch={"cpu_threads": 2}), 8) == [{}] * 4
    assert devices.pipeline_devices(compare(3, launch={"cpu_threads": 2}), 8) == [{}] * 3
    assert devices.pipeline_devices(compare(1, launch={"cpu_threads": 16}), 8) == [{}]  # more threads than cores
    with pytest.raises(ConfigError, match=r"^compare\.parallel: 2 pipelines side by side need 8 cores each "
                                          r"\(launch\.cpu_threads unset: all\), and 8 are here: .*cpu_threads fits more"):
        devices.pipeline_devices(compare(2), 8)
