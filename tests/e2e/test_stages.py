"""End to end through the stage processes, on a very small demo world (seconds per stage)."""

import gzip
import io
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from flows.pipeline_flow import run_pipeline
from flows.wiring import pipeline_stages, pipeline_status
from pipeline.config.schema import DemoConfig, SamplingConfig, parse_config
from pipeline.data.sources import DataError, read_jsonl, write_jsonl
from pipeline.demo.world import ASSISTANT, USER, build_model, build_tokenizer
from pipeline.evaluation import answer_entropy
from pipeline.evaluation.verifiers import verify_exact
from pipeline.results.manifest import MANIFEST, DamagedResult, Manifest, digest
from pipeline.runtime.process import StageError
from pipeline.sampling.sampler import sample
from pipeline.tracking.tracker import pipeline_run_name

TINY = {
    "demo": {"hidden_size": 64, "num_heads": 1, "num_layers": 1, "intermediate_size": 64,
             "train_examples": 64, "domain_train_examples": 32, "test_examples": 2, "val_examples": 1},
    "pretrain": {"trainer": {"max_steps": 3, "per_device_train_batch_size": 8, "logging_steps": 1}},
    "sft": {"trainer": {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1}},
    "sampling": {"max_tokens": 4},
    "dpo": {"trainer": {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1,
                        "gradient_checkpointing": False}},
}
PAIR_PROMPTS = "pair_prompts.jsonl"
# This module's pipelines score the project's two lm-eval tasks too (the other modules' do not,
# to keep their evaluations short).
LM_EVAL = {"lm_eval": {"tasks": ["posttrain_general_exact", {"task": "posttrain_general_choice", "metric": "acc_norm"}]}}


def tiny_config(tmp_path: Path, **overrides):
    data = {"name": "tiny", "results_dir": str(tmp_path / "results"), **TINY, "evaluate": LM_EVAL}
    if (tmp_path / PAIR_PROMPTS).is_file():  # written by `demo_run`, once the SFT model exists
        data["pairs"] = {"prompts": {"path": str(tmp_path / PAIR_PROMPTS)}, "temperature": 0.1}
    for section, value in overrides.items():
        data[section] = {**data.get(section, {}), **value}
    return parse_config(data)


STAGES = pipeline_stages(tiny_config(Path("results")))  # the tiny world's: CE needs no `reference` stage


def write_pair_prompts(sft: Manifest, data: Manifest, path: Path) -> None:
    """Training prompts whose answer is the SFT model's own greedy completion. A model trained
    for a few steps gets no real answer right, so no prompt would give a pair; against these
    answers its near-greedy samples are sometimes right and sometimes wrong."""
    rows = read_jsonl(data.path("sft_train"))[:16]
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=TINY["sampling"]["max_tokens"])
    completions = sample(sft.path("model"), [r["prompt"] for r in rows], greedy)
    answers = [c[0].split("<eos>")[0].split("\n")[0].strip() for c in completions]
    write_jsonl(path, [{"prompt": r["prompt"], "answer": a} for r, a in zip(rows, answers) if a])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # the tiny evaluations can take under a second
        upstream = run_pipeline(tiny_config(tmp_path), stage="sft")
        write_pair_prompts(upstream[-1].manifest, upstream[0].manifest, tmp_path / PAIR_PROMPTS)
        return tmp_path, run_pipeline(tiny_config(tmp_path))


def test_pipeline_runs_every_stage_and_writes_manifests(demo_run):
    _, results = demo_run
    assert [r.name for r in results] == list(STAGES)
    assert {r.name for r in results if r.cached} == {"demo_data", "pretrain", "sft"}  # built by `demo_run` first
    for r in results:
        manifest = Manifest.read(r.manifest.folder)
        assert manifest.key == r.manifest.folder.name
        assert all(manifest.path(name).exists() for name in manifest.outputs)
        if not r.cached:  # the stage function's own time, inside the pipeline's time for the stage
            assert 0 < manifest.seconds < r.seconds
            startup, work, bookkeeping = r.phases()  # a process to start before, MLflow to log after
            assert startup > 0 and bookkeeping > 0
            # The stage function started (by the stage process's clock) after the pipeline took the
            # stage up and ended before the pipeline was done with it.
            assert r.began < manifest.started_at < manifest.started_at + manifest.seconds < r.began + r.seconds
        else:
            assert r.phases() is None
    by_name = {r.name: r.manifest for r in results}
    # Keys follow content: SFT's input is the pretrained model's digest, DPO's the SFT model's and the pairs'.
    assert by_name["sft"].inputs == {"model": by_name["pretrain"].digests["model"],
                                     "data.train": by_name["demo_data"].digests["sft_train"]}
    assert by_name["dpo"].inputs == {"model": by_name["sft"].digests["model"], "pairs": by_name["pairs"].digests["pairs"]}
    assert by_name["sft"].settings["sft"]["loss"]["name"] == "ce"  # what the key digests, recorded to say what changed
    evaluation = by_name["evaluate_sft"].metrics
    assert 0.0 <= evaluation["target/pass_at_1"] <= 1.0 and "general/retention" in evaluation
    assert "target/pass_at_1" in by_name["evaluate_dpo"].metrics
    # The tiny world leaves sampling.backend at auto: the backend it chose here (generate without a CUDA GPU),
    # not "auto", is what the keys, the manifests and the sampled rows hold.
    chosen = SamplingConfig().chosen_backend()
    for name in ("evaluate_sft", "sample"):
        assert by_name[name].settings["sampling"]["backend"] == chosen != "auto"
    assert {row["sampling"]["backend"] for row in read_jsonl(by_name["sample"].path("samples"))} == {chosen}


def test_evaluation_scores_the_validation_splits_apart_from_the_test_suites(demo_run):
    """The demo world's validation prompts are scored in their own suites (what `compare` chooses
    settings on), never mixed into the test suites' metrics, with retention against the base."""
    _, results = demo_run
    by_name = {r.name: r.manifest for r in results}
    world = by_name["demo_data"]
    evaluation = by_name["evaluate_sft"]
    for suite, split in (("target", "domain"), ("general", "general")):
        test = {r["prompt"] for r in read_jsonl(evaluation.path(f"samples_{suite}"))}
        val = {r["prompt"] for r in read_jsonl(evaluation.path(f"samples_val_{suite}"))}
        assert test == {r["prompt"] for r in read_jsonl(world.path(f"{split}_test"))}
        assert val == {r["prompt"] for r in read_jsonl(world.path(f"{split}_val"))} and val and not val & test
    base, after = by_name["evaluate_base"].metrics, evaluation.metrics
    assert "val_general/retention" not in base
    if base["val_general/pass_at_1"] > 0:
        assert after["val_general/retention"] == pytest.approx(after["val_general/pass_at_1"] / base["val_general/pass_at_1"])
    else:  # a tiny base model may solve none: no ratio to take
        assert math.isnan(after["val_general/retention"])
    assert {"val_target/pass_at_1", "val_target/distinct_correct"} <= set(after)


def test_evaluation_writes_the_answer_token_entropy_histogram(demo_run):
    _, results = demo_run
    by_name = {r.name: r.manifest for r in results}
    log_vocab = math.log(AutoConfig.from_pretrained(by_name["pretrain"].path("model")).vocab_size)
    means = {}
    for name in ("evaluate_base", "evaluate_sft", "evaluate_dpo"):
        evaluation = by_name[name]
        histograms = json.loads(evaluation.path("entropy").read_text())
        assert histograms["edges"][0] == 0 and histograms["edges"][-1] == pytest.approx(log_vocab)
        assert set(histograms["suites"]) == {"target", "general"}
        for suite, h in histograms["suites"].items():
            # The demo tokenizer has one token per character: the answers' tokens are their characters.
            tokens = sum(len(row["answer"]) for row in read_jsonl(evaluation.path(f"samples_{suite}")))
            assert sum(h["counts"]) == h["tokens"] == tokens > 0
            assert h["mean"] == evaluation.metrics[f"{suite}/answer_entropy"]
            assert h["confident_wrong"] == evaluation.metrics[f"{suite}/confident_wrong"] and 0 <= h["confident_wrong"] <= 1
            assert 0 < h["mean"] < log_vocab
            means[name, suite] = h["mean"]
        assert evaluation.path("entropy_plot").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert means["evaluate_base", "target"] != means["evaluate_sft", "target"]  # each evaluation measures its own model


def test_evaluation_scores_the_lm_eval_tasks_with_their_retention(demo_run):
    """The project's two lm-eval tasks run in every evaluate stage on that stage's model, over the
    demo world's general suite; their metrics and retention are in the manifest, MLflow and the summary."""
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from pipeline.reporting.summary import evaluation_table

    tmp_path, results = demo_run
    by_name = {r.name: r for r in results}
    general = read_jsonl(by_name["demo_data"].manifest.path("general_test"))
    exact, choice = "general/lm_eval/posttrain_general_exact", "general/lm_eval/posttrain_general_choice"
    likelihoods = {}
    for name in ("evaluate_base", "evaluate_sft", "evaluate_dpo"):
        evaluation = by_name[name].manifest
        record = json.loads(evaluation.path("lm_eval").read_text())
        assert record["primary"] == {"posttrain_general_exact": {"posttrain_general_exact": f"{exact}/exact_match"},
                                     "posttrain_general_choice": {"posttrain_general_choice": f"{choice}/acc_norm"}}
        with gzip.open(evaluation.path("lm_eval_samples"), "rt") as f:
            samples = [json.loads(line) for line in f]
        assert sorted(s["doc"]["prompt"] for s in samples if s["task"] == "posttrain_general_exact") == \
            sorted(r["prompt"] for r in general)
        assert evaluation.metrics[f"{exact}/exact_match"] == pytest.approx(
            sum(s["exact_match"] for s in samples if s["task"] == "posttrain_general_exact") / len(general))
        likelihoods[name] = tuple(r[0] for s in samples if s["task"] == "posttrain_general_choice"
                                  for r in s["filtered_resps"])
    base = by_name["evaluate_base"].manifest.metrics
    assert not any(m.endswith("retention") and "lm_eval" in m for m in base)
    for name in ("evaluate_sft", "evaluate_dpo"):
        after = by_name[name].manifest.metrics
        ratios = [after[m] / base[m] if base[m] > 0 else math.nan for m in (f"{exact}/exact_match", f"{choice}/acc_norm")]
        for metric, ratio in zip(("posttrain_general_exact", "posttrain_general_choice"), ratios):
            assert after[f"general/lm_eval/{metric}/retention"] == pytest.approx(ratio, nan_ok=True)
        assert after["general/lm_eval/retention"] == pytest.approx(sum(ratios) / 2, nan_ok=True)
    assert len(set(likelihoods.values())) == 3  # each evaluation scored its own model
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    run = client.get_run(by_name["evaluate_sft"].run_id)
    assert run.data.metrics["general/lm_eval/retention"] == pytest.approx(
        by_name["evaluate_sft"].manifest.metrics["general/lm_eval/retention"], nan_ok=True)
    assert run.data.metrics[f"{choice}/acc_stderr"] >= 0
    assert {"lm_eval.json", "lm_eval_samples.jsonl.gz"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    out = io.StringIO()
    Console(file=out, width=300).print(evaluation_table([by_name[n] for n in ("evaluate_base", "evaluate_sft")]))
    table = out.getvalue()
    assert f"{exact}/exact_match" in table and "general/lm_eval/retention" in table
    assert f"{choice}/acc_stderr" not in table  # the summary shows each task's score, MLflow everything
    # A change of the lm-eval settings re-runs the evaluations only.
    limited = pipeline_status(tiny_config(tmp_path, evaluate={"lm_eval": {**LM_EVAL["lm_eval"], "limit": 1}}))
    assert {s.name for s in limited if s.status != "done"} == {"evaluate_base", "evaluate_sft", "evaluate_dpo"}


def test_the_base_model_seed_changes_the_model_not_the_data(demo_run):
    tmp_path, _ = demo_run
    keys = lambda **demo: {s.name: s.key for s in pipeline_status(tiny_config(tmp_path, demo=demo))}  # noqa: E731
    plain, reseeded, same = keys(), keys(model_seed=5), keys(model_seed=0)  # the config's seed is 0
    assert reseeded["demo_data"] == plain["demo_data"] and reseeded["pretrain"] != plain["pretrain"]
    assert same["pretrain"] == plain["pretrain"]  # the config's own seed, named: the same base model
    assert keys(general_replay=0.25)["demo_data"] != plain["demo_data"]


def test_a_world_without_validation_splits_evaluates_the_test_suites_only(tmp_path):
    results = run_pipeline(tiny_config(tmp_path, demo={"val_examples": 0}), stage="evaluate_base")
    world, evaluation = results[0].manifest, results[-1].manifest
    assert not any(name.endswith("_val") for name in world.outputs)
    assert set(evaluation.outputs) >= {"samples_target", "samples_general"}
    assert not any(re.search(r"(^|_)val_", name) for name in [*evaluation.outputs, *evaluation.metrics])


def test_answer_entropy_is_each_answer_tokens_predictive_entropy(monkeypatch):
    """Batched (string and chat prompts, padded, over several batches and chunks) as for each row
    alone, by torch.distributions, at the positions that predict the answer's tokens."""
    tokenizer = build_tokenizer()
    model = build_model(DemoConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64), tokenizer, 0)
    with torch.no_grad():  # peakier than at initialisation, so that the entropy differs from token to token
        model.get_output_embeddings().weight.mul_(4)
    rows = [{"prompt": "12+34=", "answer": "46"}, {"prompt": [{"role": "user", "content": "count a in aba="}],
                                                    "answer": "2"},
            {"prompt": "131*4=", "answer": "4251"}, {"prompt": "7+1=", "answer": ""}, {"prompt": "x", "answer": "a b c"}]
    monkeypatch.setattr(answer_entropy, "BATCH_TOKENS", 40)  # rows of 4-18 tokens: batches of 2 and 3
    monkeypatch.setattr(answer_entropy, "CHUNK_LOGITS", 3 * model.config.vocab_size)  # 3 tokens per chunk
    expected, expected_wrong = [], []
    for row in rows:
        text = row["prompt"] if isinstance(row["prompt"], str) else USER + row["prompt"][0]["content"] + ASSISTANT
        ids = tokenizer(text + row["answer"], add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            dist = torch.distributions.Categorical(logits=model(ids).logits[0])
        # one token per character: the answer is the last len(answer) tokens, each predicted at the position before it
        end = ids.shape[1] - 1
        start = end - len(row["answer"])
        expected += dist.entropy()[start:end].tolist()
        top_p, top = dist.probs[start:end].max(-1)
        expected_wrong += ((top != ids[0, start + 1:end + 1]) & (top_p >= 0.5)).tolist()
    entropies, wrong = answer_entropy.answer_token_stats(model.eval(), tokenizer, rows)
    assert entropies.tolist() == pytest.approx(expected, abs=1e-5)
    assert wrong.tolist() == expected_wrong and 0 < sum(expected_wrong) < len(expected_wrong)
    assert len(entropies) == sum(len(row["answer"]) for row in rows)
    assert ((entropies >= 0) & (entropies <= math.log(len(tokenizer)))).all() and entropies.std() > 0.1


def test_pairs_pair_a_correct_with_an_incorrect_sample_of_the_sft_model(demo_run):
    _, results = demo_run
    by_name = {r.name: r.manifest for r in results}
    samples = read_jsonl(by_name["sample"].path("samples"))
    assert all(len(row["completions"]) == 8 and row["sampling"]["temperature"] == 0.1 for row in samples)
    pairs = read_jsonl(by_name["pairs"].path("pairs"))
    stats = by_name["pairs"].metrics
    assert stats["pairs/pairs"] == len(pairs) > 0 and stats["pairs/prompts"] == len(samples)
    answers = {row["prompt"]: row["answer"] for row in samples}
    for pair in pairs:
        assert verify_exact(pair["chosen"], answers[pair["prompt"]])
        assert not verify_exact(pair["rejected"], answers[pair["prompt"]])
    history = json.loads(by_name["dpo"].path("log_history").read_text())
    assert any("rewards/margins" in h for h in history)  # TRL's DPO curves, kept with the stage


def test_pretrained_model_saves_and_loads_with_from_pretrained(demo_run):
    _, results = demo_run
    folder = results[1].manifest.path("model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    ids = tokenizer("12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    history = json.loads(results[1].manifest.path("log_history").read_text())
    assert history[-1]["step"] == 3 and any("loss" in h for h in history)


def test_second_run_is_cached_and_a_changed_stage_reruns_downstream(demo_run):
    tmp_path, first = demo_run
    again = run_pipeline(tiny_config(tmp_path))
    assert all(r.cached for r in again)
    assert [r.manifest.key for r in again] == [r.manifest.key for r in first]
    changed = run_pipeline(tiny_config(tmp_path, sft={"loss": {"name": "dft"}}), stage="evaluate_sft")
    assert [(r.name, r.cached) for r in changed] == [
        ("demo_data", True), ("pretrain", True), ("sft", False), ("evaluate_base", True), ("evaluate_sft", False)]
    only = run_pipeline(tiny_config(tmp_path, sft={"loss": {"name": "dft"}}), stage="sft")
    assert [(r.name, r.cached) for r in only] == [("demo_data", True), ("pretrain", True), ("sft", True)]


def test_eksft_with_a_cached_reference_runs_the_reference_stage_before_sft(demo_run):
    tmp_path, first = demo_run
    cfg = tiny_config(tmp_path, sft={"loss": {"name": "eksft"}, "reference": "cached", "reference_topk": 8})
    assert "reference" in pipeline_stages(cfg) and "reference" not in STAGES
    results = run_pipeline(cfg, stage="sft")
    assert [(r.name, r.cached) for r in results] == [
        ("demo_data", True), ("pretrain", True), ("reference", False), ("sft", False)]
    reference, sft = results[2].manifest, results[3].manifest
    model, data = first[1].manifest.digests["model"], first[0].manifest.digests["sft_train"]
    assert reference.inputs == {"model": model, "data.train": data}
    assert sft.inputs == {"model": model, "reference": reference.digests["topk"], "data.train": data}
    assert reference.metrics["topk"] == 8 and reference.metrics["tokens"] > reference.metrics["rows"] > 0
    history = json.loads(sft.path("log_history").read_text())
    assert any("kl" in h and "masked_kl_frac" in h for h in history)
    # Another seed or learning rate trains again on the same cache; another max_length rebuilds it.
    reseeded = tiny_config(tmp_path, sft={**cfg.sft.model_dump(), "trainer": TINY["sft"]["trainer"] | {"seed": 7}})
    assert [(r.name, r.cached) for r in run_pipeline(reseeded, stage="sft")][2:] == [("reference", True), ("sft", False)]
    longer = tiny_config(tmp_path, sft={**cfg.sft.model_dump(), "trainer": TINY["sft"]["trainer"] | {"max_length": 99}})
    assert [(r.name, r.cached) for r in run_pipeline(longer, stage="sft")][2:] == [("reference", False), ("sft", False)]


def test_changing_only_the_dpo_beta_reruns_only_dpo_and_its_evaluation(demo_run):
    tmp_path, first = demo_run
    beta = {"trainer": TINY["dpo"]["trainer"] | {"beta": 0.3}}
    changed = run_pipeline(tiny_config(tmp_path, dpo=beta))
    assert [(r.name, r.cached) for r in changed] == [(name, name not in ("dpo", "evaluate_dpo")) for name in STAGES]
    assert changed[-2].manifest.key != first[-2].manifest.key


def test_dpo_on_given_preference_data_skips_the_on_policy_stages(demo_run, tmp_path):
    demo_tmp, first = demo_run
    given = tmp_path / "preference.jsonl"
    write_jsonl(given, [{"prompt": "12*3=", "chosen": "63", "rejected": "36"}] * 8)
    cfg = tiny_config(demo_tmp, data={"preference": {"path": str(given)}})
    assert "pairs" not in pipeline_stages(cfg) and "sample" not in pipeline_stages(cfg)
    results = run_pipeline(cfg, stage="dpo")
    assert [(r.name, r.cached) for r in results] == [
        ("demo_data", True), ("pretrain", True), ("sft", True), ("dpo", False)]
    assert results[-1].manifest.inputs == {"model": first[3].manifest.digests["model"], "data.train": digest(given)}
    given.write_text('{"prompt": "12*3=", "chosen": "63"}\n')
    with pytest.raises(DataError, match=r"preference\.jsonl:1: missing fields: expected chosen/prompt/rejected"):
        run_pipeline(tiny_config(demo_tmp, data={"preference": {"path": str(given)}}), stage="dpo")


def test_an_own_model_and_data_sets_with_other_column_names_run_end_to_end(demo_run, tmp_path):
    """The path of a user's own model (a local folder) and data: a hub data set's layout with a
    subset, Parquet, CSV and JSON files, each with its own column names, GSM8K-style final answers;
    nothing converted by hand. SFT reads the same rows as the demo world's SFT did, so it trains
    the same weights."""
    from datasets import Dataset

    from tests.unit.test_data import hub_layout

    demo_tmp, first = demo_run
    data, base = first[0].manifest, first[1].manifest
    hub = hub_layout(tmp_path / "hub-layout", {"train": [{"question": r["prompt"], "solution": r["completion"]}
                                                         for r in read_jsonl(data.path("sft_train"))]})
    Dataset.from_list([{"problem": r["prompt"], "final": f"so it is {r['answer']}\n#### {r['answer']}"}
                       for r in read_jsonl(data.path("domain_test"))]).to_parquet(str(tmp_path / "target.parquet"))
    Dataset.from_list([{"q": r["prompt"], "a": r["answer"]} for r in read_jsonl(data.path("general_test"))]
                      ).to_csv(str(tmp_path / "general.csv"))
    Dataset.from_list([{"input": r["prompt"], "output": r["answer"]} for r in read_jsonl(demo_tmp / PAIR_PROMPTS)]
                      ).to_json(str(tmp_path / "pair_prompts.json"))
    cfg = parse_config({
        "name": "own", "results_dir": str(demo_tmp / "results"), "model": {"path": str(base.path("model"))},
        "data": {"sft": {"hub": str(hub), "subset": "main", "columns": {"prompt": "question", "completion": "solution"}},
                 "target_eval": {"path": str(tmp_path / "target.parquet"), "columns": {"prompt": "problem", "answer": "final"},
                                 "answer_pattern": r"####\s*(.+)"},
                 "general_eval": {"path": str(tmp_path / "general.csv"), "columns": {"prompt": "q", "answer": "a"}}},
        "pairs": {"prompts": {"path": str(tmp_path / "pair_prompts.json"), "columns": {"prompt": "input", "answer": "output"}},
                  "temperature": 0.1},
        **{k: TINY[k] for k in ("sft", "sampling", "dpo")}})
    results = run_pipeline(cfg)
    assert [r.name for r in results] == ["evaluate_base", "sft", "evaluate_sft", "sample", "pairs", "dpo", "evaluate_dpo"]
    by_name = {r.name: r.manifest for r in results}
    demo_sft = next(r.manifest for r in first if r.name == "sft")
    assert by_name["sft"].digests["model"] == demo_sft.digests["model"]  # the same rows, renamed back
    scored = read_jsonl(by_name["evaluate_dpo"].path("samples_target"))
    assert [r["answer"] for r in scored] == [r["answer"] for r in read_jsonl(data.path("domain_test"))]  # cut out
    assert "target/pass_at_1" in by_name["evaluate_dpo"].metrics and by_name["dpo"].metrics["train_loss"] > 0


@pytest.mark.parametrize("loss, diagnostics", [
    ({"name": "ce"}, ["entropy", "confident_conflict_frac"]),
    ({"name": "dft"}, ["entropy"]),
    ({"name": "eaft", "topk": 5}, ["weight"]),
    ({"name": "masked"}, ["masked_frac"]),
    ({"name": "eksft", "ratio": 0.3}, ["kl", "masked_entropy_frac", "masked_kl_frac", "masked_both_frac"]),
    ({"name": "gem", "beta": 0.5}, ["entropy"]),
])
def test_sft_trains_with_each_loss_and_logs_its_diagnostics(demo_run, loss, diagnostics):
    tmp_path, _ = demo_run
    results = run_pipeline(tiny_config(tmp_path, sft={"loss": loss}), stage="sft")
    sft = results[-1].manifest
    history = json.loads(sft.path("log_history").read_text())
    logged = {key for entry in history for key in entry}
    assert set(diagnostics) <= logged
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)
    base = AutoModelForCausalLM.from_pretrained(results[1].manifest.path("model"))
    tuned = AutoModelForCausalLM.from_pretrained(sft.path("model"))
    assert not torch.equal(base.lm_head.weight, tuned.lm_head.weight)  # it trained


def test_a_code_suite_is_scored_in_the_sandbox_end_to_end(demo_run, tmp_path):
    """Code problems (HumanEval's rows) through `run`: each completion runs against its problem's
    tests in the sandbox. One token after a prompt that ends in a comment cannot change the program,
    so the function the prompt wrote decides: the right one passes, the wrong one fails."""
    demo_tmp, _ = demo_run
    test = "def check(candidate):\n    assert candidate() == 1\n"
    write_jsonl(tmp_path / "code.jsonl", [
        {"prompt": "def f():\n    return 1\n#", "test": test, "entry_point": "f", "task": "right"},
        {"prompt": "def f():\n    return 2\n#", "test": test, "entry_point": "f", "task": "wrong"}])
    cfg = tiny_config(demo_tmp, data={"target_eval": {"path": str(tmp_path / "code.jsonl"), "verifier": "code"}},
                      evaluate={"allow_untrusted_code": True}, sampling={"max_tokens": 1, "n": 2, "temperature": 1.0})
    evaluation = run_pipeline(cfg, stage="evaluate_base")[-1].manifest
    assert evaluation.metrics["target/right/pass_at_1"] == 1.0 and evaluation.metrics["target/wrong/pass_at_1"] == 0.0
    scored = read_jsonl(evaluation.path("samples_target"))
    assert scored[0]["answer"] == {"prompt": "def f():\n    return 1\n#", "test": test, "entry_point": "f"}
    assert [len(r["completions"]) for r in scored] == [2, 2]


def test_sft_with_lora_saves_a_merged_model(demo_run):
    tmp_path, _ = demo_run
    results = run_pipeline(tiny_config(tmp_path, sft={"lora": {"r": 4, "lora_alpha": 8}}), stage="sft")
    sft = results[-1].manifest
    model = AutoModelForCausalLM.from_pretrained(sft.path("model"))
    assert not any("lora" in name for name, _ in model.named_parameters())


def failing_sft(demo_tmp: Path, tmp_path: Path):
    """A config whose SFT stage fails inside its process: rows well formed (the check before any
    stage passes them), but whose prompts fill max_length, which only the trainer finds."""
    long = tmp_path / "long.jsonl"
    write_jsonl(long, [{"prompt": "12345678*2=", "completion": "2"}] * 4)
    return tiny_config(demo_tmp, data={"sft": {"path": str(long)}}, sft={"trainer": {**TINY["sft"]["trainer"],
                                                                                      "max_length": 8}})


def test_failing_stage_reports_why_and_leaves_no_manifest(demo_run, tmp_path):
    demo_tmp, _ = demo_run
    with pytest.raises(StageError, match=r"stage 'sft' failed.*DataError: 4 of 4 SFT rows have a prompt that fills"):
        run_pipeline(failing_sft(demo_tmp, tmp_path), stage="sft")
    failed = [p.parent for p in (demo_tmp / "results" / "sft").glob("*/error.txt")]
    assert failed and not any((f / MANIFEST).exists() for f in failed)


def test_mlflow_has_parent_and_child_runs_with_lineage(demo_run):
    from mlflow.tracking import MlflowClient

    tmp_path, results = demo_run
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("posttrain.kind") == "pipeline"]

    def children_of(parent):
        return {r.data.tags["posttrain.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}

    first, full = parents[0], parents[1]  # `demo_run`: up to SFT, then the whole pipeline
    assert first.info.status == "FINISHED" and first.data.params["sft.loss.name"] == '"ce"'
    children = children_of(first) | {k: v for k, v in children_of(full).items() if k not in ("sft", "pretrain")}
    assert set(children) == set(STAGES)
    sft, pretrain = children["sft"], children["pretrain"]
    assert sft.data.tags["posttrain.key"] == results[3].manifest.key
    assert sft.data.tags["posttrain.input.model"] == pretrain.data.tags["posttrain.output_digest.model"]
    assert sft.data.tags["posttrain.input_run.model"] == pretrain.info.run_id
    assert sft.data.tags["posttrain.output_digest.model"] == results[3].manifest.digests["model"]
    assert "train_loss" in sft.data.metrics  # the trainer's MLflow callback logged into the stage's run
    assert [m.step for m in client.get_metric_history(sft.info.run_id, "loss")] == [1, 2]  # every logged step
    assert children["evaluate_sft"].data.metrics["target/pass_at_1"] == results[4].manifest.metrics["target/pass_at_1"]
    assert [d.dataset.name for d in sft.inputs.dataset_inputs] == ["sft_train.jsonl"]
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert {"manifest.json", "log_history.json", "loss_curve.png"} <= {a.path for a in client.list_artifacts(sft.info.run_id)}
    evaluation_files = {a.path for a in client.list_artifacts(children["evaluate_sft"].info.run_id)}
    assert {"samples_target.jsonl", "samples_general.jsonl", "entropy.json", "entropy.png"} <= evaluation_files
    assert "config.yaml" in {a.path for a in client.list_artifacts(first.info.run_id)}
    dpo, pairs = children["dpo"], children["pairs"]
    assert dpo.data.tags["posttrain.input_run.pairs"] == pairs.info.run_id
    assert dpo.data.tags["posttrain.input_run.model"] == sft.info.run_id  # DPO links back to its SFT model
    assert [d.dataset.name for d in dpo.inputs.dataset_inputs] == ["pairs.jsonl"]
    assert "rewards/margins" in dpo.data.metrics and pairs.data.metrics["pairs/pairs"] > 0
    # A later pipeline run reused every stage: it adds no stage run without history, and links
    # the runs that made the results.
    second = parents[2]
    assert not [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second.info.run_id]
    reused = {k.removeprefix("posttrain.reused."): v for k, v in second.data.tags.items()
              if k.startswith("posttrain.reused.")}
    assert reused == {name: run.info.run_id for name, run in children.items()}
    assert second.data.metrics["evaluate_sft/target/pass_at_1"] == children["evaluate_sft"].data.metrics[
        "target/pass_at_1"]


def test_models_are_logged_models_with_their_inputs_outputs_and_evaluations(demo_run):
    """MLflow 3's model entities: each model a stage made is a LoggedModel (one per result, however
    many runs reuse it), the output of the run that made it and an input of each run that read it;
    an evaluation's metrics are the measured model's; the pipeline run carries the headline metrics."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    tmp_path, results = demo_run
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain").experiment_id
    by_name = {r.name: r for r in results}
    models = client.search_logged_models([experiment])
    model = {}
    for stage, name in (("pretrain", "base"), ("sft", "sft"), ("dpo", "dpo")):
        manifest = by_name[stage].manifest
        mine = [m for m in models if m.tags["posttrain.key"] == manifest.key and m.tags["posttrain.weights"] == "reference"]
        assert len(mine) == 1 and mine[0].name == name and mine[0].status == LoggedModelStatus.READY
        assert mine[0].source_run_id == manifest.run_id  # the run that made it, also where a later run reused it
        assert mine[0].tags["posttrain.path"] == str(manifest.path("model").resolve())
        model[stage] = mine[0]
    assert model["sft"].params["sft.loss.name"] == '"ce"'  # the settings of the stage that made it
    assert not client.list_logged_model_artifacts(model["sft"].model_id)  # by reference: the weights stay put

    def run(stage):
        return client.get_run(by_name[stage].run_id)

    for stage, reads, makes in (("sft", "pretrain", "sft"), ("dpo", "sft", "dpo"), ("sample", "sft", None),
                                ("evaluate_base", "pretrain", None), ("evaluate_sft", "sft", None),
                                ("evaluate_dpo", "dpo", None), ("pairs", None, None)):
        assert [i.model_id for i in run(stage).inputs.model_inputs] == ([model[reads].model_id] if reads else [])
        assert [o.model_id for o in run(stage).outputs.model_outputs] == ([model[makes].model_id] if makes else [])
    for stage, evaluated in (("evaluate_base", "pretrain"), ("evaluate_sft", "sft"), ("evaluate_dpo", "dpo")):
        linked = {m.key: m.value for m in client.get_logged_model(model[evaluated].model_id).metrics
                  if m.run_id == by_name[stage].run_id}
        assert linked["target/pass_at_1"] == by_name[stage].manifest.metrics["target/pass_at_1"]
        assert linked["general/lm_eval/posttrain_general_exact/exact_match"] == \
            by_name[stage].manifest.metrics["general/lm_eval/posttrain_general_exact/exact_match"]
    parent = client.get_run(run("dpo").data.tags["mlflow.parentRunId"])
    name = pipeline_run_name(tiny_config(tmp_path), None)
    # its config's name, loss, seed and digest: another config's run is named apart
    assert name.startswith("tiny/ce/seed0 ") and parent.info.run_name == name
    assert pipeline_run_name(tiny_config(tmp_path, sampling={"temperature": 0.5}), None) != name
    for stage in ("evaluate_base", "evaluate_sft", "evaluate_dpo"):
        metrics = by_name[stage].manifest.metrics
        assert parent.data.metrics[f"{stage}/target/pass_at_1"] == metrics["target/pass_at_1"]
        assert parent.data.metrics[f"{stage}/general/pass_at_1"] == metrics["general/pass_at_1"]
        assert f"{stage}/target/dsort/pass_at_1" not in parent.data.metrics  # per-task rows stay in the stage's run
    assert parent.data.metrics["evaluate_sft/general/retention"] == pytest.approx(
        by_name["evaluate_sft"].manifest.metrics["general/retention"], nan_ok=True)
    assert parent.data.params["sft.loss.name"] == '"ce"'
    assert run("sft").data.params["settings.sft.loss.name"] == '"ce"'  # the stage's own settings, not TRL's nll
    # MLflow's system metrics where a model runs (a stage shorter than the sampling interval logs none)
    for stage in ("evaluate_base", "evaluate_sft", "evaluate_dpo"):
        assert "system/cpu_utilization_percentage" in run(stage).data.metrics, stage
    assert not any(m.startswith("system/") for m in run("pairs").data.metrics)
    assert run("evaluate_sft").data.params["settings.sampling.max_tokens"] == str(TINY["sampling"]["max_tokens"])


def test_lineage_follows_the_dpo_model_back_to_the_data(demo_run):
    import yaml
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app

    tmp_path, results = demo_run
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    by_name = {r.name: r for r in results}
    (dpo_model,) = client.get_run(by_name["dpo"].run_id).outputs.model_outputs
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "results_dir": str(tmp_path / "results"), **TINY}))
    shown = CliRunner().invoke(app, ["lineage", dpo_model.model_id, str(config)], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    lines = [line.strip(" │├└─") for line in shown.output.splitlines()]
    order = [next(i for i, line in enumerate(lines) if line.startswith(f"{stage}  key {by_name[stage].manifest.key}"))
             for stage in ("dpo", "sft", "pretrain", "demo_data", "pairs", "sample")]
    assert order[:4] == sorted(order[:4])  # dpo <- its SFT model <- the base model <- the generated world
    assert lines[0] == f"model dpo {dpo_model.model_id}"
    assert f"dpo  key {by_name['dpo'].manifest.key}  http://127.0.0.1:5000/#/experiments/" in shown.output
    for data in ("pairs.jsonl", "sft_train.jsonl", "general_train.jsonl"):
        assert any(line.startswith(f"read data {data}  digest ") for line in lines)
    assert any(line.startswith("read model sft m-") for line in lines)
    assert any(line.startswith("read model base m-") for line in lines)
    assert "(shown above)" in shown.output  # `sample` read the SFT model that DPO's branch shows
    unknown = CliRunner().invoke(app, ["lineage", "m-0000", str(config)])
    assert unknown.exit_code == 2 and "m-0000 is not a run or a model in sqlite:///" in unknown.output


def test_the_final_model_is_registered_and_models_can_be_copied(demo_run):
    from mlflow.tracking import MlflowClient

    tmp_path, results = demo_run
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    dpo = next(r.manifest for r in results if r.name == "dpo")
    cfg = tiny_config(tmp_path, tracking={"log_models": "copy", "registered_model": "tiny-final"})
    for version in ("1", "2"):  # every run of the whole pipeline: a new version, here of the same model
        again = run_pipeline(cfg)
        assert all(r.cached for r in again)
        registered = client.get_model_version("tiny-final", version)
        model = next(m for m in client.search_logged_models([client.get_experiment_by_name("posttrain").experiment_id])
                     if m.artifact_location == registered.source)
        assert model.tags["posttrain.key"] == dpo.key and model.name == "dpo"
        assert registered.run_id == dpo.run_id  # the run that made it
    assert model.tags["posttrain.weights"] == "copy"
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert {"model.safetensors", "config.json"} <= files
    experiment = client.get_experiment_by_name("posttrain").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`posttrain.registered_model` = 'tiny-final/2'")
    assert parent.data.tags["posttrain.reused.dpo"] == dpo.run_id


def test_failed_stage_run_ends_failed_in_mlflow(demo_run):
    from mlflow.tracking import MlflowClient

    tmp_path, _ = demo_run
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain")
    failed = client.search_runs([experiment.experiment_id], "attributes.status = 'FAILED'")
    stages = {r.data.tags.get("posttrain.stage") for r in failed}
    assert "sft" in stages  # from test_failing_stage_reports_why_and_leaves_no_manifest
    error = next(r for r in failed if r.data.tags.get("posttrain.stage") == "sft").data.tags["posttrain.error"]
    assert "fills max_length" in error


def test_status_lists_done_stale_and_missing(demo_run, tmp_path):
    from flows.wiring import pipeline_status

    demo_tmp, results = demo_run
    statuses = pipeline_status(tiny_config(demo_tmp))
    assert [(s.name, s.status) for s in statuses] == [(name, "done") for name in STAGES]
    assert statuses[3].key == results[3].manifest.key and statuses[3].manifest == results[3].manifest
    changed = pipeline_status(tiny_config(demo_tmp, sft={"trainer": TINY["sft"]["trainer"] | {"learning_rate": 0.0123}}))
    # A key follows its inputs' content: the stages after SFT wait on it, and say so.
    assert [(s.name, s.status, s.reason) for s in changed] == [
        ("demo_data", "done", ""), ("pretrain", "done", ""), ("evaluate_base", "done", ""),
        ("sft", "stale", "sft.trainer.learning_rate: (unset) -> 0.0123"),
        *[(name, "waiting", "on sft") for name in STAGES[4:]]]
    assert changed[3].key != results[3].manifest.key
    fresh = pipeline_status(tiny_config(tmp_path))
    assert [(s.status, s.reason) for s in fresh] == [("missing", "")] + [("waiting", "on demo_data")] * (len(STAGES) - 1)


def test_force_reruns_a_cached_stage_under_the_same_key(demo_run):
    tmp_path, results = demo_run
    forced = run_pipeline(tiny_config(tmp_path), {"evaluate_base"}, "evaluate_base")
    assert [(r.name, r.cached) for r in forced] == [("demo_data", True), ("pretrain", True), ("evaluate_base", False)]
    assert forced[-1].manifest.key == results[2].manifest.key
    assert forced[-1].manifest.run_id != results[2].manifest.run_id
    with pytest.raises(Exception, match="unknown stage 'reward'"):
        run_pipeline(tiny_config(tmp_path), {"reward"})


def test_force_reruns_downstream_only_where_the_forced_stage_made_other_bytes(demo_run, world_copy, tmp_path,
                                                                             monkeypatch):
    """A key digests its inputs' content: a forced SFT that makes the same weights again (a CPU's
    training is bit-reproducible) leaves every later result valid; one that makes other weights
    (as a GPU's may) makes exactly the stages that read them run again."""
    from pipeline.orchestration import runner

    shutil.copy(demo_run[0] / PAIR_PROMPTS, tmp_path / PAIR_PROMPTS)
    world_copy = tiny_config(tmp_path)  # with the pairs' prompts, as `demo_run` has them
    first = run_pipeline(world_copy)
    assert all(r.cached for r in first)
    before = {r.name: r.manifest for r in first}
    same = run_pipeline(world_copy, {"sft"})
    assert [(r.name, r.cached) for r in same] == [(name, name != "sft") for name in STAGES]
    real = runner.run_in_process

    def other_weights(stage, cfg, out, *args, **kwargs):
        manifest = real(stage, cfg, out, *args, **kwargs)
        if stage.name == "sft":  # one weight's sign flipped, and the manifest written again
            weights = manifest.path("model") / "model.safetensors"
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0x80
            weights.write_bytes(data)
            manifest.write(out)
        return manifest

    monkeypatch.setattr(runner, "run_in_process", other_weights)
    after = {r.name: r for r in run_pipeline(world_copy, {"sft"})}
    assert after["sft"].manifest.digests["model"] != before["sft"].digests["model"]
    ran = {name for name, r in after.items() if not r.cached}
    samples_same = after["sample"].manifest.digests == before["sample"].digests
    # The pairs are made from the samples only: made again only if the new model sampled otherwise.
    assert ran == {"sft", "evaluate_sft", "sample", "dpo", "evaluate_dpo"} | (set() if samples_same else {"pairs"})


def test_every_stage_is_a_prefect_task_run_a_reused_one_cached(demo_run):
    from multiprocessing import forkserver

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    tmp_path, results = demo_run
    forkserver._forkserver._stop()  # one the stages of an earlier run started
    state = run_pipeline(tiny_config(tmp_path), return_state=True)
    # Nothing ran, so nothing started the fork server and its imports of torch and TRL.
    assert forkserver._forkserver._forkserver_pid is None
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert flow_run.name == pipeline_run_name(tiny_config(tmp_path), None) and {"config:tiny", "loss:ce", "seed:0"} <= set(flow_run.tags)
    assert sorted((r.name, r.state.name) for r in task_runs) == sorted((name, "Cached") for name in STAGES)
    assert {r.name: r.state.message for r in task_runs} == \
        {r.name: f"key {r.manifest.key}: reused {r.manifest.folder}" for r in results}
    [table] = [a for a in artifacts if a.key == "posttrain-stages"]
    assert [row["stage"] for row in json.loads(table.data)] == list(STAGES)


def test_a_stage_process_output_is_on_the_console_and_in_its_prefect_task_run_log(world_copy, capfd):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    state = run_pipeline(world_copy, {"evaluate_base"}, "evaluate_base", return_state=True)
    flow_run_id = state.state_details.flow_run_id
    console = capfd.readouterr().err
    bars = [line.rsplit("\r", 1)[-1].strip() for line in console.splitlines() if "evaluate_base: " in line]
    assert bars, console  # the sampling's progress bar, written by the stage's process
    with get_client(sync_client=True) as client:
        [task_run] = [r for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[flow_run_id]))) if r.name == "evaluate_base"]
        for _ in range(50):  # Prefect sends logs in batches
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            lines = [log.message for log in logs if log.name == "posttrain.stage"]
            if bars[-1] in lines:
                break
            time.sleep(0.2)
    assert bars[-1] in lines  # the bar's last state, once
    assert {log.task_run_id for log in logs if log.name == "posttrain.stage"} == {task_run.id}


def test_a_change_of_scoring_only_rescores_the_saved_samples(world_copy, tmp_path, capsys):
    sampled = {"n": 2, "temperature": 1.0}
    first = run_pipeline(tiny_config(tmp_path, sampling=sampled), stage="evaluate_base")[-1]
    assert not first.cached and "target/pass_at_2" not in first.manifest.metrics
    capsys.readouterr()
    rescored = run_pipeline(tiny_config(tmp_path, sampling=sampled, evaluate={"ks": [1, 2]}), stage="evaluate_base")[-1]
    assert f"re-scoring the samples of {first.manifest.folder}" in capsys.readouterr().out
    assert not rescored.cached and rescored.manifest.key != first.manifest.key
    assert rescored.manifest.samples_key == first.manifest.samples_key
    for suite in ("target", "general"):
        old, new = (read_jsonl(m.path(f"samples_{suite}")) for m in (first.manifest, rescored.manifest))
        assert [r["completions"] for r in new] == [r["completions"] for r in old]
    assert {k: rescored.manifest.digests[k] for k in ("entropy", "lm_eval")} == \
        {k: first.manifest.digests[k] for k in ("entropy", "lm_eval")}
    metrics = rescored.manifest.metrics
    assert metrics["target/pass_at_1"] == first.manifest.metrics["target/pass_at_1"] <= metrics["target/pass_at_2"]
    assert {k for k in metrics if "lm_eval" in k} == {k for k in first.manifest.metrics if "lm_eval" in k}


def test_transient_stage_failure_is_retried_by_the_flow(demo_run, monkeypatch):
    import flows.pipeline_flow as pipeline_flow
    from pipeline.orchestration import runner
    from pipeline.runtime.process import StageError

    tmp_path, results = demo_run
    real = runner.run_in_process
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 1:
            raise StageError("stage 'evaluate' failed: the vLLM engine did not start", "TransientError")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_in_process", flaky)
    monkeypatch.setattr(pipeline_flow, "stage_task", pipeline_flow.stage_task.with_options(retry_delay_seconds=0))
    rerun = run_pipeline(tiny_config(tmp_path), {"evaluate_base"}, "evaluate_base")
    assert calls == ["evaluate", "evaluate"] and not rerun[-1].cached

    calls.clear()

    def bad_input(*args, **kwargs):
        calls.append(args[0].name)
        raise StageError("stage 'evaluate' failed: DataError: bad row", "DataError")

    monkeypatch.setattr(runner, "run_in_process", bad_input)
    with pytest.raises(StageError, match="bad row"):
        run_pipeline(tiny_config(tmp_path), {"evaluate_base"}, "evaluate_base")
    assert calls == ["evaluate"]  # bad input is not retried


def flip_signs(weights: Path, keep_mtime: bool = False) -> None:
    """Negate every float32 of a safetensors file in place: same size, other weights."""
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after the JSON header
    for i in range(start + 3, len(data), 4):
        data[i] ^= 0x80
    weights.write_bytes(data)
    if keep_mtime:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.fixture
def world_copy(demo_run, tmp_path):
    """The tiny world's results, copied: these tests damage them."""
    shutil.copytree(demo_run[0] / "results", tmp_path / "results")
    return tiny_config(tmp_path)


def test_a_result_whose_files_changed_is_made_again(world_copy, capsys):
    sft = run_pipeline(world_copy, stage="sft")[-1]
    weights = sft.manifest.path("model") / "model.safetensors"
    original = weights.read_bytes()
    flip_signs(weights)
    again = run_pipeline(world_copy, stage="sft")
    assert [(r.name, r.cached) for r in again] == [("demo_data", True), ("pretrain", True), ("sft", False)]
    assert f"{sft.manifest.path('model')} changed since the stage made it" in capsys.readouterr().out
    assert weights.read_bytes() == original  # made again, as it was
    weights.write_bytes(original[: len(original) // 2])  # cut off
    assert not run_pipeline(world_copy, stage="sft")[-1].cached


def test_full_verification_catches_a_change_that_kept_size_and_mtime(world_copy):
    weights = run_pipeline(world_copy, stage="sft")[-1].manifest.path("model") / "model.safetensors"
    flip_signs(weights, keep_mtime=True)
    assert run_pipeline(world_copy, stage="sft")[-1].cached  # quick: names, sizes and mtimes only
    full = world_copy.model_copy(update={"verify_reuse": "full"})
    assert not run_pipeline(full, stage="sft")[-1].cached


@pytest.mark.parametrize("damage", ["cut", "{}"])
def test_a_damaged_manifest_is_a_clear_error_and_force_makes_the_stage_anew(world_copy, damage):
    from flows.wiring import pipeline_status

    manifest = run_pipeline(world_copy, stage="sft")[-1].manifest.folder / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2] if damage == "cut" else "{}")
    with pytest.raises(DamagedResult, match=rf"^\[sft\] {re.escape(str(manifest))} is damaged \(.*\): run again with "
                                            r"--force sft"):
        run_pipeline(world_copy, stage="sft")
    assert {s.name: s.status for s in pipeline_status(world_copy)}["sft"] == "damaged"
    forced = run_pipeline(world_copy, {"sft"}, "sft")[-1]
    assert not forced.cached and Manifest.read(manifest.parent).digests == forced.manifest.digests
