"""What a stage's key digests (pipeline.runtime.contract, pipeline.orchestration.runner), and
what the runner hands a stage's process, without running a stage."""

import json

import pytest

from pipeline.config.schema import parse_config
from pipeline.orchestration.runner import StageRunner, what_changed
from pipeline.results.manifest import DamagedResult, Manifest
from pipeline.runtime.contract import Input
from stages import evaluate, pairs, sft


def config(tmp_path, **sections):
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    data = {"sft": {"path": str(suite)}, "target_eval": {"path": str(suite)}, **sections.pop("data", {})}
    return parse_config({"name": "keys", "results_dir": str(tmp_path / "results"), "data": data, **sections})


def planned(tmp_path, module, inputs=None, **sections):
    return StageRunner(config(tmp_path), tracker=None).plan("x", module.STAGE, config(tmp_path, **sections),
                                                            {"model": Input(tmp_path, "m")} if inputs is None else inputs)


def test_a_suites_verifier_changes_the_evaluation_key_but_not_its_samples_key(tmp_path):
    exact = planned(tmp_path, evaluate)
    math = planned(tmp_path, evaluate, data={"target_eval": {"path": str(tmp_path / "suite.jsonl"), "verifier": "math"}})
    assert math.key != exact.key and math.samples_key == exact.samples_key  # re-scored, not sampled again
    more = planned(tmp_path, evaluate, sampling={"max_tokens": 7})
    assert more.key != exact.key and more.samples_key != exact.samples_key
    other_baseline = planned(tmp_path, evaluate, {"model": Input(tmp_path, "m"), "baseline": Input(tmp_path, "b")})
    assert other_baseline.key != exact.key and other_baseline.samples_key == exact.samples_key


def test_the_code_verifiers_limits_are_in_the_pairs_key_only_for_code(tmp_path):
    samples = {"samples": Input(tmp_path, "s")}
    exact, longer = (planned(tmp_path, pairs, samples, evaluate={"code_timeout_s": t}) for t in (10, 20))
    assert exact.key == longer.key
    code = {"pairs": {"prompts": {"path": str(tmp_path / "suite.jsonl"), "verifier": "code"}}}
    short, long = (planned(tmp_path, pairs, samples, evaluate={"code_timeout_s": t, "allow_untrusted_code": True,
                                                               "code_isolation": "none"}, **code) for t in (10, 20))
    assert short.key != long.key


def test_a_key_follows_its_inputs_content_and_its_data(tmp_path):
    one, same, other = (planned(tmp_path, sft, {"model": Input(tmp_path / p, d)}) for p, d in
                        (("a", "d1"), ("b", "d1"), ("a", "d2")))
    assert one.key == same.key != other.key  # where a model lies does not matter, what it holds does
    assert one.digests["data.train"] and set(one.digests) == {"model", "data.train"}


def test_a_model_the_config_names_is_keyed_by_its_files_or_its_hub_id(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    before = Input.model(str(tmp_path / "model")).digest
    (tmp_path / "model" / "config.json").write_text('{"changed": 1}')
    assert Input.model(str(tmp_path / "model")).digest != before
    assert Input.model("org/model").digest == "hub:org/model"


def test_the_wiring_must_hand_over_the_inputs_run_takes(tmp_path):
    with pytest.raises(TypeError, match=r"stage 'sft': inputs \['model'\] are missing"):
        planned(tmp_path, sft, {})
    with pytest.raises(TypeError, match=r"inputs \['tokenizer'\] are not parameters of its run"):
        planned(tmp_path, sft, {"model": Input(tmp_path, "m"), "tokenizer": Input(tmp_path, "t")})


def test_what_changed_names_the_settings_and_inputs_or_an_older_manifest(tmp_path):
    now = planned(tmp_path, sft, sft={"trainer": {"learning_rate": 1e-4}})
    old = Manifest("sft", "k", {}, inputs={**now.digests, "model": "other"},
                   settings={**now.settings, "sft": {**now.settings["sft"], "trainer": {"learning_rate": 1e-5}}})
    assert what_changed(old, now) == "sft.trainer.learning_rate: 1e-05 -> 0.0001; model changed"
    assert "made before stages recorded their settings" in what_changed(Manifest("sft", "k", {}), now)


def test_a_manifest_whose_inputs_or_settings_are_not_a_mapping_is_damaged(tmp_path):
    body = {"stage": "sft", "key": "k", "outputs": {}, "inputs": None}
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(DamagedResult, match="inputs or settings are not a mapping"):
        Manifest.read(tmp_path)


class StageEnv:
    """The tracker's part of a stage's environment (its MLflow run), as a real tracker gives it."""

    def stage_env(self, run_id: str) -> dict[str, str]:
        return {"MLFLOW_RUN_ID": run_id}


@pytest.mark.parametrize(("module", "rescored", "warm"), [(evaluate, False, True), (evaluate, True, False),
                                                          (pairs, False, False)])
def test_the_runner_gives_the_warm_engines_address_to_a_stage_that_samples(tmp_path, monkeypatch, module, rescored,
                                                                            warm):
    from pipeline.orchestration import runner as runtime

    given = {}
    monkeypatch.setattr(runtime, "sampler_env", lambda sampling, devices, client: {"POSTTRAIN_SAMPLER": "/run/socket"})
    monkeypatch.setattr(runtime, "run_in_process", lambda stage, cfg, out, record, env, log_line, **paths:
                        given.update(env=env, paths=paths))
    runner = StageRunner(config(tmp_path), tracker=StageEnv())
    monkeypatch.setattr(runner, "saved_samples", lambda planned: tmp_path if rescored else None)
    inputs = {"samples": Input(tmp_path, "s")} if module is pairs else {"model": Input(tmp_path, "m")}
    runner.execute(runner.plan("x", module.STAGE, config(tmp_path), inputs), "run")
    assert ("POSTTRAIN_SAMPLER" in given["env"]) == warm and given["env"]["MLFLOW_RUN_ID"] == "run"
    assert ("samples" in given["paths"]) == (rescored or module is pairs)


@pytest.mark.parametrize(("error_type", "stopped"), [("TimedOut", True), ("ValueError", False)])
def test_a_sampling_stage_past_its_time_limit_stops_the_warm_engine_it_waited_on(tmp_path, monkeypatch, error_type,
                                                                                 stopped):
    """Its request may hang in the engine, which would hold every later stage: the next gets a new one."""
    from pipeline.orchestration import runner as runtime
    from pipeline.runtime.process import StageError

    stops = []
    monkeypatch.setattr(runtime, "sampler_env", lambda sampling, devices, client: {"POSTTRAIN_SAMPLER": "/run/socket"})
    monkeypatch.setattr(runtime, "stop_sampler", lambda devices, client: stops.append((devices, client)))

    def fails(*args, **kwargs):
        raise StageError("stage 'x' failed", error_type=error_type)

    monkeypatch.setattr(runtime, "run_in_process", fails)
    runner = StageRunner(config(tmp_path), tracker=StageEnv(), devices={"CUDA_VISIBLE_DEVICES": "1"})
    planned = runner.plan("x", evaluate.STAGE, config(tmp_path), {"model": Input(tmp_path, "m")})
    with pytest.raises(StageError):
        runner.execute(planned, "run")
    # If the sampler answers this stage's request (its client: the stage's folder), not another pipeline's.
    assert stops == ([({"CUDA_VISIBLE_DEVICES": "1"}, str(planned.out))] if stopped else [])


def test_a_pipelines_devices_and_threads_reach_its_stages_and_not_their_keys(tmp_path, monkeypatch):
    from pipeline.orchestration import runner as runtime

    given = {}
    monkeypatch.setattr(runtime, "sampler_env", lambda sampling, devices, client: given.update(sampler=devices) or {})
    monkeypatch.setattr(runtime, "run_in_process", lambda stage, cfg, out, record, env, log_line, **paths:
                        given.update(env=env))
    cfg = config(tmp_path, launch={"cpu_threads": 3})
    runner = StageRunner(cfg, tracker=StageEnv(), devices={"CUDA_VISIBLE_DEVICES": "2,3"})
    planned = runner.plan("x", evaluate.STAGE, cfg, {"model": Input(tmp_path, "m")})
    runner.execute(planned, "run")
    assert given["env"]["CUDA_VISIBLE_DEVICES"] == "2,3" and given["env"]["OMP_NUM_THREADS"] == "3"
    assert given["sampler"] == {"CUDA_VISIBLE_DEVICES": "2,3"}  # the warm engine on the pipeline's GPUs
    alone = StageRunner(config(tmp_path), tracker=StageEnv())
    assert planned.key == alone.plan("x", evaluate.STAGE, config(tmp_path), {"model": Input(tmp_path, "m")}).key
    alone.execute(alone.plan("x", evaluate.STAGE, config(tmp_path), {"model": Input(tmp_path, "m")}), "run")
    assert "CUDA_VISIBLE_DEVICES" not in given["env"] and "OMP_NUM_THREADS" not in given["env"]


def test_pipelines_sharing_a_stage_run_it_once_the_others_reuse_it(tmp_path, monkeypatch):
    import threading

    from pipeline.orchestration import runner as runtime

    started, release, ran = threading.Event(), threading.Event(), []

    def stage_process(stage, cfg, out, record, env, log_line, **paths):
        ran.append(out)
        started.set()
        release.wait(10)
        manifest = Manifest("sft", out.name, {}, metrics={"x": 1.0}, **record)
        manifest.write(out)
        return manifest

    class Tracker(StageEnv):
        def start_stage(self, *args):
            return "run"

        def reuse(self, *args):
            return "producer"

        def finish_stage(self, *args):
            pass

        def link(self, run_id):
            return run_id

    monkeypatch.setattr(runtime, "run_in_process", stage_process)
    cfg = config(tmp_path)
    runners = [StageRunner(cfg, tracker=Tracker()) for _ in range(2)]
    plans = [r.plan("sft", sft.STAGE, cfg, {"model": Input(tmp_path, "m")}) for r in runners]
    first = threading.Thread(target=runners[0].run, args=(plans[0],))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=runners[1].run, args=(plans[1],))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waits on the first's run of the same key
    release.set()
    first.join(10)
    second.join(10)
    assert len(ran) == 1
    assert [r.results[0].cached for r in runners] == [False, True]


def test_a_shared_stage_that_failed_fails_its_waiters_and_a_stopped_run_starts_nothing(tmp_path):
    import signal
    import threading

    from pipeline.orchestration.runner import key_turn
    from pipeline.runtime import process
    from pipeline.runtime.process import StageError, Stopped

    out, holding, release, seen = tmp_path / "sft" / "key", threading.Event(), threading.Event(), []

    def first(error: Exception) -> None:
        try:
            with key_turn("sft", out):
                holding.set()
                release.wait(10)
                raise error
        except Exception:  # noqa: BLE001 - its own pipeline's to report
            pass

    def waiter() -> None:
        try:
            with key_turn("sft", out):
                seen.append("ran it")
        except StageError as error:
            seen.append(str(error))

    for error, expected in ((ValueError("bad row 3"), "stage 'sft' failed in another pipeline that shares it: "
                                                      "bad row 3"),
                            (StageError("the engine did not start", "TransientError"), "ran it")):  # as a retry
        holding.clear(), release.clear()
        threads = [threading.Thread(target=first, args=(error,)), threading.Thread(target=waiter)]
        threads[0].start()
        assert holding.wait(10)
        threads[1].start()
        threads[1].join(0.3)
        assert threads[1].is_alive()
        release.set()
        for thread in threads:
            thread.join(10)
        assert seen.pop() == expected
    with key_turn("sft", out):  # a run that did not wait on the failure (the user's next try) runs it
        pass
    process.stopping.append(signal.SIGTERM)
    try:
        with pytest.raises(Stopped), key_turn("sft", out):
            pytest.fail("a stopped run started a stage")
    finally:
        process.stopping.clear()
