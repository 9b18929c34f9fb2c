"""lm-evaluation-harness tasks as a general suite: config, checks before any stage, metric names,
retention, and a run of the project's two tasks on a small model (the pipeline's own run is in
test_stages)."""

import gzip
import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.config.schema import ConfigError, EvaluateConfig, LmEvalConfig, parse_config
from pipeline.data import hub
from pipeline.data.sources import read_jsonl, write_jsonl
from pipeline.evaluation import lm_eval_suite
from pipeline.evaluation.lm_eval_suite import (check_lm_eval, lm_eval_metrics, lm_eval_model, lm_eval_retention, metric_name,
                                               primary_metric, run_lm_eval)
from pipeline.evaluation.lm_eval_tasks.suites import general_eval_choices

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": f"up {w}=", "answer": w.upper(), "task": "upper"} for w in ("ab", "cd", "ef", "gh", "ij")]
ROWS += [{"prompt": f"rev {w}=", "answer": w[::-1], "task": "reverse"} for w in ("xy", "zw")]


def real_model_config(tmp_path: Path, lm_eval: dict, general: Path | None = None) -> object:
    """A real-model config (a model folder and data files of its own) with these lm-eval settings."""
    model = tmp_path / "model"
    if not model.exists():
        from pipeline.config.schema import DemoConfig
        from pipeline.demo.world import build_model, build_tokenizer

        tiny = DemoConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64)
        build_model(tiny, build_tokenizer(), seed=0).save_pretrained(model)
        build_tokenizer().save_pretrained(model)
    general = general or tmp_path / "general.jsonl"
    if not general.exists():
        write_jsonl(general, ROWS)
    data = {k: {"path": str(general)} for k in ("sft", "target_eval", "general_eval")}
    return parse_config({"name": "t", "model": {"path": str(model)}, "data": data, "evaluate": {"lm_eval": lm_eval}})


def test_tasks_are_names_or_entries_with_few_shot_and_metric():
    settings = LmEvalConfig(tasks=["mmlu", {"task": "gsm8k", "num_fewshot": 5, "metric": "exact_match"}])
    assert [(t.task, t.num_fewshot, t.metric) for t in settings.tasks] == [("mmlu", None, None),
                                                                          ("gsm8k", 5, "exact_match")]


@pytest.mark.parametrize("lm_eval, error", [
    ({"tasks": []}, r"evaluate\.lm_eval\.tasks: .*at least 1"),
    ({"tasks": ["x"], "include_path": ["/no/such/folder"]}, r"evaluate\.lm_eval\.include_path: no folder at /no/such"),
    ({"tasks": ["x"], "limit": 0}, r"evaluate\.lm_eval\.limit: .*greater than 0"),
    ({"tasks": [{"task": "x", "num_fewshot": -1}]}, r"evaluate\.lm_eval\.tasks\.0\.num_fewshot"),
    ({"tasks": [{"task": "x", "shots": 5}]}, r"evaluate\.lm_eval\.tasks\.0\.shots: unknown key"),
    ({"tasks": ["mmlu", {"task": "mmlu", "num_fewshot": 5}]}, r"evaluate\.lm_eval\.tasks: mmlu listed twice"),
])
def test_bad_lm_eval_settings_name_the_key(lm_eval, error):
    with pytest.raises(ConfigError, match=error):
        parse_config({"name": "t", "evaluate": {"lm_eval": lm_eval}})


def test_the_key_holds_the_tasks_their_settings_and_the_task_files(tmp_path):
    # Without lm_eval the key settings are what they were before it existed: old results keep their keys.
    assert "lm_eval" not in EvaluateConfig().key_settings(code=False)
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text("task: mine\n")
    (folder / "__pycache__").mkdir()
    settings = LmEvalConfig(tasks=["mine"], include_path=[str(folder)])
    key = settings.key_settings()
    assert key["version"] == "0.4.13" and key["tasks"] == [{"task": "mine", "num_fewshot": None, "metric": None}]
    assert settings.model_copy(update={"batch_size": 1}).key_settings() == key  # batching is how, not what
    (folder / "__pycache__" / "x.pyc").write_bytes(b"compiled")  # written by importing a task's module
    assert settings.key_settings() == key
    (folder / "mine.yaml").write_text("task: mine\nnum_fewshot: 1\n")
    assert settings.key_settings()["files"] != key["files"]
    assert LmEvalConfig(tasks=["mine"], include_path=[str(folder)], limit=3).key_settings()["limit"] == 3


def test_the_shipped_tasks_files_keep_the_digest_that_existing_results_are_keyed_by():
    """Their bytes are in every evaluate key that scores them: an edit (or a moved import in
    suites.py) makes every such result stale. Change this digest only on purpose."""
    key = LmEvalConfig(tasks=["posttrain_general_exact", "posttrain_general_choice"]).key_settings()
    assert key["files"] == "8a26f5f94f542987deea68f36477e4ddcc32487e7f953b3ec8c9717a05f61241"


def test_metric_names_are_mlflow_names_with_the_filter_as_a_level():
    results = {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                  "exact_match,flexible-extract": 0.6, "exact_match_stderr,flexible-extract": "N/A"},
        "mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.01, "sample_len": 100, "name": "mmlu"},
        "odd task": {"f1 (macro),none": 0.3},
    }
    assert lm_eval_metrics(results) == {
        "general/lm_eval/gsm8k/exact_match/strict-match": 0.5,
        "general/lm_eval/gsm8k/exact_match_stderr/strict-match": 0.1,
        "general/lm_eval/gsm8k/exact_match/flexible-extract": 0.6,
        "general/lm_eval/mmlu/acc": 0.4, "general/lm_eval/mmlu/acc_stderr": 0.01,
        "general/lm_eval/odd task/f1 _macro_": 0.3,
    }
    assert metric_name("mmlu", "acc,none") == "general/lm_eval/mmlu/acc"


def test_a_tasks_score_is_its_row_or_for_a_group_without_an_aggregate_its_tasks_rows():
    results = {"mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.1}, "mmlu_x": {"acc,none": 0.3},
               "plain_group": {"alias": "plain_group"}, "a": {"f1,none": 0.2, "exact_match,none": 0.1},
               "b": {"exact_match,none": 0.5}}
    assert primary_metric(results, "mmlu", ["mmlu_x"], None) == {"mmlu": "general/lm_eval/mmlu/acc"}
    assert primary_metric(results, "plain_group", ["a", "b"], "exact_match") == {
        "a": "general/lm_eval/a/exact_match", "b": "general/lm_eval/b/exact_match"}
    assert primary_metric(results, "a", ["a"], None) == {"a": "general/lm_eval/a/f1"}  # the first it reports
    with pytest.raises(ValueError, match=r"lm-eval task b reports no metric 'f1' \(it reports exact_match\): set its"):
        primary_metric(results, "plain_group", ["a", "b"], "f1")


def test_retention_per_task_and_mean_follows_higher_is_better():
    record = {"primary": {"mmlu": {"mmlu": "general/lm_eval/mmlu/acc"},
                          "ppl_tag": {"a": "general/lm_eval/a/perplexity", "b": "general/lm_eval/b/perplexity"},
                          "new": {"new": "general/lm_eval/new/acc"}},
              "higher_is_better": {"mmlu": {"acc": True}, "a": {"perplexity": False}, "b": {"perplexity": False}}}
    after = {"general/lm_eval/mmlu/acc": 0.3, "general/lm_eval/a/perplexity": 20.0,
             "general/lm_eval/b/perplexity": 10.0, "general/lm_eval/new/acc": 0.5}
    before = {"general/lm_eval/mmlu/acc": 0.4, "general/lm_eval/a/perplexity": 10.0,
              "general/lm_eval/b/perplexity": 10.0, "general/lm_eval/new/acc": 0.0}
    retention = lm_eval_retention(record, after, before)
    assert retention["general/lm_eval/mmlu/retention"] == pytest.approx(0.75)
    assert retention["general/lm_eval/ppl_tag/retention"] == pytest.approx((0.5 + 1.0) / 2)  # lower is better
    assert math.isnan(retention["general/lm_eval/new/retention"])  # the base model scored 0: nothing to retain
    assert math.isnan(retention["general/lm_eval/retention"])
    del record["primary"]["new"]
    assert lm_eval_retention(record, after, before)["general/lm_eval/retention"] == pytest.approx((0.75 + 0.75) / 2)


def test_multiple_choice_rows_hold_the_answer_among_answers_of_the_same_task(tmp_path):
    write_jsonl(tmp_path / "g.jsonl", ROWS)
    rows = general_eval_choices(general_eval=str(tmp_path / "g.jsonl"))["test"].to_list()
    assert rows == general_eval_choices(general_eval=str(tmp_path / "g.jsonl"))["test"].to_list()  # the same each run
    for source, row in zip(ROWS, rows, strict=True):
        assert row["choices"][row["gold"]] == source["answer"]
        same_task = {r["answer"] for r in ROWS if r["task"] == source["task"]}
        assert set(row["choices"]) <= same_task and len(set(row["choices"])) == len(row["choices"])
        assert len(row["choices"]) == min(4, len(same_task))
    assert len({row["gold"] for row in rows}) > 1  # the answer's place varies


def test_unknown_task_names_the_key_and_the_close_names(tmp_path):
    cfg = real_model_config(tmp_path, {"tasks": ["posttrain_general_exact", "posttrain_general_exakt"]})
    with pytest.raises(ConfigError, match=r"evaluate\.lm_eval\.tasks\[1\]: 'posttrain_general_exakt' is not an lm-eval "
                                          r"task.*did you mean posttrain_general_exact"):
        check_lm_eval(cfg, general_chats=False)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub, and empty Hugging Face caches."""
    from datasets import config
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_REACHABLE", None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return tmp_path


def test_the_real_model_example_lists_the_papers_general_tasks_and_fails_offline_naming_their_data(offline, monkeypatch):
    tmp_path = offline
    monkeypatch.chdir(tmp_path)
    text = (REPO / "configs" / "qwen3-humaneval.yaml").read_text().replace("/models/Qwen3-4B-Base", "Qwen/Qwen3-4B-Base")
    for line in text.splitlines():
        if line.strip().startswith("path: data/"):
            (tmp_path / line.split()[1]).parent.mkdir(exist_ok=True)
            (tmp_path / line.split()[1]).write_text("")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "c.yaml").write_text(text)
    from pipeline.config.schema import load_config

    cfg = load_config(tmp_path / "c.yaml")
    assert [t.task for t in cfg.evaluate.lm_eval.tasks] == ["mmlu", "ifeval", "gsm8k"]
    with pytest.raises(ConfigError) as error:
        check_lm_eval(cfg, general_chats=False)
    message = str(error.value)
    assert "evaluate.lm_eval.tasks[0] (mmlu) needs the hub data set cais/mmlu (abstract_algebra, anatomy" in message
    assert "tasks[2] (gsm8k) needs the hub data set openai/gsm8k (main)" in message
    assert "neither in the local Hugging Face cache nor reachable" in message and "\n" not in message
    # Where the hub's data sets are cached, the same config passes.
    for dataset in ("cais--mmlu", "google--IFEval", "openai--gsm8k"):
        (tmp_path / "hub-cache" / f"datasets--{dataset}").mkdir(parents=True)
    check_lm_eval(cfg, general_chats=False)


def test_local_task_files_pass_offline_and_a_missing_data_file_is_named(offline):
    tmp_path = offline
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    write_jsonl(tmp_path / "qa.jsonl", ROWS)
    task = ("task: my_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\ntest_split: test\n"
            "output_type: generate_until\ndoc_to_text: '{{{{prompt}}}}'\ndoc_to_target: '{{{{answer}}}}'\n"
            "metric_list:\n  - metric: exact_match\n")
    (folder / "my_qa.yaml").write_text(task.format(file=tmp_path / "qa.jsonl"))
    cfg = real_model_config(tmp_path, {"tasks": ["my_qa"], "include_path": [str(folder)]})
    check_lm_eval(cfg, general_chats=False)
    (folder / "my_qa.yaml").write_text(task.format(file=tmp_path / "gone.jsonl"))
    with pytest.raises(ConfigError, match=rf"tasks\[0\] \(my_qa\) needs the file {tmp_path / 'gone.jsonl'}"):
        check_lm_eval(cfg, general_chats=False)


def test_the_shipped_tasks_need_a_local_prompt_answer_general_suite(tmp_path):
    cfg = real_model_config(tmp_path, {"tasks": ["posttrain_general_choice"]})
    hub = cfg.data.model_copy(update={"general_eval": cfg.data.general_eval.model_copy(
        update={"path": None, "hub": "org/general"})})
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(posttrain_general_choice\) reads data\.general_eval .* "
                                          r"org/general \(train\) is not one"):
        check_lm_eval(cfg.model_copy(update={"data": hub}), general_chats=False)


def test_the_shipped_tasks_refuse_a_general_suite_of_chats_before_any_stage(tmp_path):
    """lm-eval would get a message list as the prompt and fail in the evaluate stage, after the
    trainings; the check names the task and the file first."""
    from pipeline.orchestration.checks import check_inputs

    text_rows, chats, sft = tmp_path / "text.jsonl", tmp_path / "chats.jsonl", tmp_path / "sft.jsonl"
    write_jsonl(text_rows, ROWS)
    write_jsonl(chats, [r | {"prompt": [{"role": "user", "content": r["prompt"]}]} for r in ROWS])
    write_jsonl(sft, [{"prompt": r["prompt"], "completion": r["answer"]} for r in ROWS])
    cfg = real_model_config(tmp_path, {"tasks": ["posttrain_general_exact"]}, general=chats)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"chat_template": "chatml"}),
                                 "data": cfg.data.model_copy(update={"sft": cfg.data.sft.model_copy(
                                     update={"path": str(sft)})})})
    with pytest.raises(ConfigError, match=rf"tasks\[0\] \(posttrain_general_exact\) reads data\.general_eval .* "
                                          rf"{chats} is not one \(its prompts are chats\): use lm-eval tasks"):
        check_inputs(cfg)
    text = cfg.data.model_copy(update={"general_eval": cfg.data.general_eval.model_copy(update={"path": str(text_rows)})})
    assert cfg.data.target_eval.path == str(chats)
    check_inputs(cfg.model_copy(update={"data": text}))  # the target suite's chats are no matter to the tasks


def test_the_chat_demo_world_with_the_shipped_tasks_fails_before_its_world_is_made():
    from pipeline.orchestration.checks import check_inputs

    chat = parse_config({"name": "x", "demo": {"world": "chat"},
                         "evaluate": {"lm_eval": {"tasks": ["posttrain_general_choice"]}}})
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(posttrain_general_choice\) .* the chat demo world's general "
                                          r"suite is not one \(its prompts are chats\)"):
        check_inputs(chat)
    check_inputs(parse_config({"name": "x", "evaluate": {"lm_eval": {"tasks": ["posttrain_general_choice"]}}}))

def test_the_shipped_tasks_alone_are_checked_without_building_lm_evals_task_index(tmp_path, monkeypatch):
    """`posttrain validate` of the demo config stays under a second: lm-eval's index takes 1.5 s."""
    def no_index(*args):
        raise AssertionError("lm-eval's task index was built")

    monkeypatch.setattr(lm_eval_suite, "task_manager", no_index)
    check_lm_eval(real_model_config(tmp_path, {"tasks": ["posttrain_general_exact", "posttrain_general_choice"]}),
                  general_chats=False)
    with pytest.raises(AssertionError, match="index was built"):  # any other task is looked up in it
        check_lm_eval(real_model_config(tmp_path, {"tasks": ["posttrain_general_exact", "mmlu"]}), general_chats=False)


def test_the_evaluate_key_names_the_engine_with_vllm_and_a_configured_chat_template():
    """lm-eval's results were made by lm-eval's own backends before, and with the tokenizer's own
    template: where that changed, so does the key; elsewhere (the demo's) the key is as it was."""
    from stages import evaluate

    cfg = parse_config({"name": "t", "evaluate": {"lm_eval": {"tasks": ["posttrain_general_exact"]}}})
    plain = evaluate.lm_eval_settings(cfg)
    assert plain == cfg.evaluate.lm_eval.key_settings()
    assert evaluate.settings(cfg)["evaluate"]["lm_eval"] == evaluate.samples_settings(cfg)["lm_eval"] == plain
    vllm = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"backend": "vllm"})})
    assert evaluate.lm_eval_settings(vllm) == {**plain, "model": "the sampling's vLLM engine"}
    templated = parse_config({"name": "t", "model": {"chat_template_kwargs": {"enable_thinking": False}},
                              "evaluate": {"lm_eval": {"tasks": ["posttrain_general_exact"]}}})
    assert evaluate.lm_eval_settings(templated) == plain  # the template is not applied: no matter
    applied = templated.model_copy(update={"evaluate": templated.evaluate.model_copy(update={
        "lm_eval": templated.evaluate.lm_eval.model_copy(update={"apply_chat_template": True})})})
    assert evaluate.lm_eval_settings(applied)["chat_template"] == "the config's"


def test_the_model_follows_sampling_vllm_on_one_engine_of_the_sampling_else_lm_evals_hf(tmp_path, monkeypatch):
    from contextlib import contextmanager

    from pipeline.evaluation.lm_eval_engine import EngineLM
    from pipeline.sampling import sampler

    from lm_eval.models.huggingface import HFLM

    cfg = real_model_config(tmp_path, {"tasks": ["posttrain_general_exact"], "batch_size": 7})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tokenizer": "tok",
                                                                       "chat_template_kwargs": {"x": 1}})})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    with lm_eval_model(tmp_path / "model", tokenizer, cfg) as (backend, lm):  # sampling.backend hf
        assert backend == "hf" and isinstance(lm, HFLM) and lm.tokenizer is tokenizer and lm.batch_size == 7
        assert lm.chat_template_args == {"x": 1} and str(lm.device) == "cpu"
    sessions = []

    @contextmanager
    def session(model, settings, tokenizer_dir, trust):
        sessions.append((model, settings, tokenizer_dir))
        yield lambda name, *args: {"context_length": 320}[name]

    monkeypatch.setattr(sampler, "engine_session", session)
    vllm = cfg.sampling.model_copy(update={"backend": "vllm", "seed": 5, "data_parallel_size": 2})
    with lm_eval_model(tmp_path / "model", tokenizer, cfg.model_copy(update={"sampling": vllm})) as (backend, lm):
        assert backend == "vllm" and isinstance(lm, EngineLM)
        assert lm.max_length == 320 and lm.seed == 5 and lm.tokenizer is tokenizer
        assert lm.chat_template_args == {"x": 1}
    [(model, settings, tokenizer_dir)] = sessions
    # One engine, the sampling's (data-parallel ranks are the sampling's): the warm one where there is one.
    assert model == tmp_path / "model" and tokenizer_dir == "tok"
    assert settings == vllm.model_copy(update={"data_parallel_size": 1})


def test_a_chat_template_without_a_system_role_renders_the_chat_without_it(tmp_path):
    """As lm-eval's backends do: a task's description is a system message, which some templates refuse."""
    from pipeline.evaluation.lm_eval_engine import EngineLM

    real_model_config(tmp_path, {"tasks": ["posttrain_general_exact"]})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                               "{% endif %}{{ m['role'] }}: {{ m['content'] }}|{% endfor %}{{ suffix }}")
    lm = EngineLM(lambda name: 64, tokenizer, seed=0, chat_template_args={"suffix": "go"})
    chat = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "1+1="}]
    assert lm.apply_chat_template(chat) == "user: 1+1=|go"
    assert lm.apply_chat_template(chat[1:]) == "user: 1+1=|go"


def test_the_shipped_tasks_run_on_a_model_by_generation_and_by_log_likelihood(tmp_path):
    cfg = real_model_config(tmp_path, {"tasks": ["posttrain_general_exact",
                                                 {"task": "posttrain_general_choice", "metric": "acc_norm"}]})
    check_lm_eval(cfg, general_chats=False)
    out = tmp_path / "out"
    out.mkdir()
    metrics, record = run_lm_eval(tmp_path / "model", AutoTokenizer.from_pretrained(tmp_path / "model"), cfg, out)
    assert record["backend"] == "hf" and record["n-shot"] == {"posttrain_general_exact": 0, "posttrain_general_choice": 0}
    assert record["primary"] == {"posttrain_general_exact": {"posttrain_general_exact":
                                                             "general/lm_eval/posttrain_general_exact/exact_match"},
                                 "posttrain_general_choice": {"posttrain_general_choice":
                                                              "general/lm_eval/posttrain_general_choice/acc_norm"}}
    assert json.loads((out / "lm_eval.json").read_text())["primary"] == record["primary"]
    with gzip.open(out / "lm_eval_samples.jsonl.gz", "rt") as f:
        samples = [json.loads(line) for line in f]
    exact = [s for s in samples if s["task"] == "posttrain_general_exact"]
    choice = [s for s in samples if s["task"] == "posttrain_general_choice"]
    assert len(exact) == len(choice) == len(ROWS)
    # The scores are lm-eval's, from its own per-document verdicts: an untrained model's answers.
    assert metrics["general/lm_eval/posttrain_general_exact/exact_match"] == pytest.approx(
        sum(s["exact_match"] for s in exact) / len(ROWS))
    for s in choice:  # a choice is right when its log-likelihood is the highest
        scores = [r[0] for r in s["filtered_resps"]]
        assert s["acc"] == float(scores.index(max(scores)) == s["target"])
    assert metrics["general/lm_eval/posttrain_general_choice/acc"] == pytest.approx(
        sum(s["acc"] for s in choice) / len(ROWS))
    assert set(metrics) >= {"general/lm_eval/posttrain_general_choice/acc_norm",
                            "general/lm_eval/posttrain_general_choice/acc_stderr"}
    assert [s["doc"]["prompt"] for s in exact] == [r["prompt"] for r in read_jsonl(tmp_path / "general.jsonl")]


def test_logged_samples_are_the_same_bytes_whenever_written(tmp_path, monkeypatch):
    """gzip's header holds the time of writing by default: two evaluations that logged the same
    samples would differ in digest, so a rerun (or pipelines side by side) would look changed."""
    samples = {"posttrain_general_exact": [{"doc_id": 0, "resps": [["12"]], "filtered_resps": ["12"]}]}
    first, second = (tmp_path / name / "lm_eval_samples.jsonl.gz" for name in ("first", "second"))
    first.parent.mkdir()
    second.parent.mkdir()
    lm_eval_suite.write_samples(first, samples)
    monkeypatch.setattr("time.time", lambda: 2_000_000_000.0)  # what gzip stamps otherwise
    lm_eval_suite.write_samples(second, samples)
    assert first.read_bytes() == second.read_bytes()
    rows = [json.loads(line) for line in gzip.open(first, "rt")]
    assert rows == [{"task": "posttrain_general_exact", **samples["posttrain_general_exact"][0]}]
