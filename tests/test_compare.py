"""`posttrain compare` end to end on a very small world, checked against what MLflow holds;
and the statistics behind its report."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ConfigError, parse_config
from pipeline.data import write_jsonl
from pipeline.manifest import Manifest
from pipeline.metrics import mean_interval, paired_bootstrap
from pipeline.report import verdict
from tests.test_stages import TINY

REPO = Path(__file__).resolve().parents[1]
ARMS, SEEDS = ("ce", "eaft"), (0, 1)


def test_mean_interval_is_the_student_t_interval():
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    # t(0.975, df=2) = 4.3027; sd = 1; half-width = 4.3027 / sqrt(3)
    assert mean == 2.0 and high - mean == pytest.approx(4.3027 / 3**0.5, rel=1e-4) and mean - low == high - mean
    with pytest.raises(ValueError, match="two values"):
        mean_interval([1.0])


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    null = rng.normal(0, 1, size=(3, 200))
    shifted = null + 0.5
    none = paired_bootstrap(null, 2000)
    some = paired_bootstrap(shifted, 2000)
    assert none["low"] < 0 < none["high"] and none["p"] > 0.05
    assert some["low"] > 0 and some["p"] < 0.01 and some["diff"] == pytest.approx(shifted.mean())
    # a shift in one seed only is seed noise: the interval over seeds is wide, not a sure effect
    one_seed = null.copy()
    one_seed[0] += 3.0
    wide = paired_bootstrap(one_seed, 2000)
    assert wide["high"] - wide["low"] > 1.0 and wide["high"] - wide["low"] > 10 * (some["high"] - some["low"])
    assert paired_bootstrap(np.zeros((3, 10)), 500) == {"diff": 0.0, "low": 0.0, "high": 0.0, "p": 1.0}


def test_verdict_reads_the_intervals_signs():
    d = lambda lo, hi: {"low": lo, "high": hi}  # noqa: E731
    assert verdict({"target/pass_at_1": d(0.01, 0.1), "target/pass_at_8": d(0.02, 0.2)}, [1, 8]) == \
        "better at target Pass@1/8"
    assert verdict({"target/pass_at_1": d(0.01, 0.1), "target/pass_at_8": d(-0.1, 0.2)}, [1, 8]) == \
        "better at target Pass@1, the rest within noise"
    assert verdict({"target/pass_at_1": d(0.01, 0.1), "target/pass_at_8": d(-0.2, -0.1)}, [1, 8]) == \
        "mixed: better at target Pass@1, worse at Pass@8"
    assert verdict({"target/pass_at_1": d(-0.1, 0.1)}, [1]) == "no difference beyond noise at any target Pass@K"


def test_compare_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"compare: Value error|compare: baseline 'ce' is not one of the arms"):
        parse_config({"name": "x", "compare": {"arms": {"eaft": {"name": "eaft"}}}})
    with pytest.raises(ConfigError, match=r"compare\.seeds: .*at least 2"):
        parse_config({"name": "x", "compare": {"arms": {"ce": {"name": "ce"}}, "seeds": [0]}})
    with pytest.raises(ConfigError, match=r"compare\.arms\.eaft: unknown parameter"):
        parse_config({"name": "x", "compare": {"arms": {"ce": {"name": "ce"}, "eaft": {"name": "eaft", "top": 3}}}})


@pytest.mark.parametrize("name", ["claim.yaml", "claim-small.yaml"])
def test_shipped_claim_configs_are_valid(name):
    result = CliRunner().invoke(app, ["validate", str(REPO / "configs" / name)])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    preference = tmp_path / "preference.jsonl"
    write_jsonl(preference, [{"prompt": "12*3=", "chosen": "63", "rejected": "36"}] * 8)
    config = {
        "name": "tiny-claim", "results_dir": str(tmp_path / "results"), **TINY,
        "data": {"preference": {"path": str(preference)}},
        "sampling": {"max_tokens": 4, "n": 4, "temperature": 1.0},
        "evaluate": {"ks": [1, 4]},
        "compare": {"arms": {arm: {"name": arm} for arm in ARMS}, "seeds": list(SEEDS), "bootstrap": 500,
                    "report_dir": str(tmp_path / "report")},
    }
    path = tmp_path / "claim.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["compare", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    return tmp_path, report, result.output


def test_compare_shares_common_stages_and_runs_each_arm_and_seed(compared):
    tmp_path, report, _ = compared
    results = tmp_path / "results"
    for shared in ("demo_data", "pretrain"):
        assert len(list((results / shared).iterdir())) == 1
    assert len(list((results / "sft").iterdir())) == len(ARMS) * len(SEEDS)
    assert len(list((results / "dpo").iterdir())) == len(ARMS) * len(SEEDS)
    # base evaluation once, then one after SFT and one after DPO per arm and seed
    assert len(list((results / "evaluate").iterdir())) == 1 + 2 * len(ARMS) * len(SEEDS)
    assert [(r["arm"], r["seed"]) for r in report["runs"]] == [(a, s) for s in SEEDS for a in ARMS]
    assert report["phases"] == ["sft", "dpo"]


def test_report_numbers_match_the_runs_in_mlflow(compared):
    tmp_path, report, _ = compared
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    compare_run = client.search_runs(client.get_experiment_by_name("posttrain").experiment_id,
                                     "tags.`posttrain.kind` = 'compare'")[0]
    assert compare_run.info.status == "FINISHED"
    values = {}  # (phase, arm) -> per-seed metrics, read from MLflow
    for run in report["runs"]:
        pipeline = client.get_run(run["run_id"])
        assert pipeline.data.tags["mlflow.parentRunId"] == compare_run.info.run_id
        assert pipeline.data.tags["posttrain.arm"] == run["arm"] and pipeline.data.tags["posttrain.seed"] == str(run["seed"])
        for phase in ("sft", "dpo"):
            evaluation = client.get_run(run[phase]["run_id"])
            assert evaluation.data.tags["mlflow.parentRunId"] == run["run_id"]
            assert evaluation.data.tags["posttrain.stage"] == f"evaluate_{phase}"
            # (the tiny base model answers nothing, so its retention is NaN)
            assert run[phase]["metrics"] == pytest.approx(
                {k: evaluation.data.metrics[k] for k in run[phase]["metrics"]}, nan_ok=True)
            values.setdefault((phase, run["arm"]), []).append(evaluation.data.metrics)
    for (phase, arm), seeds in values.items():
        summary = report["summary"][phase][arm]
        for metric in ("target/pass_at_1", "target/pass_at_4", "general/pass_at_1", "target/distinct_correct",
                       "target/answer_entropy", "general/answer_entropy"):
            assert summary[metric]["mean"] == pytest.approx(np.mean([m[metric] for m in seeds]))
            assert summary[metric]["low"] <= summary[metric]["mean"] <= summary[metric]["high"]
            assert compare_run.data.metrics[f"{phase}/{arm}/{metric}"] == pytest.approx(summary[metric]["mean"])
        if arm != "ce":  # same problems in both arms: the mean paired difference is the difference of means
            for metric in ("target/pass_at_1", "target/pass_at_4", "general/pass_at_1"):
                ours, theirs = (np.mean([m[metric] for m in values[phase, a]]) for a in (arm, "ce"))
                assert report["differences"][phase][arm][metric]["diff"] == pytest.approx(ours - theirs, abs=1e-9)
                assert compare_run.data.metrics[f"{phase}/{arm}-vs-ce/{metric}"] == pytest.approx(ours - theirs, abs=1e-9)
    artifacts = {a.path for a in client.list_artifacts(compare_run.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/pass_at_k.png", "report/loss_curves.png",
            "report/entropy_histograms.png"} <= artifacts


def test_report_files_hold_the_tables_and_the_plots(compared):
    tmp_path, report, output = compared
    folder = tmp_path / "report"
    text = (folder / "report.md").read_text()
    assert "## After SFT" in text and "## After SFT + DPO" in text and "## Paired differences from `ce`" in text
    assert text in output  # the command prints the report
    eaft = report["summary"]["dpo"]["eaft"]["target/pass_at_1"]
    assert f"| `eaft` | {eaft['mean']:.3f} ± {(eaft['high'] - eaft['low']) / 2:.3f} |" in text
    for arm in ARMS:
        curve = report["curves"]["dpo"][arm]
        assert curve["k"] == [1, 2, 3, 4] and curve["low"][0] <= curve["mean"][0] <= curve["high"][0]
        assert curve["mean"][0] == pytest.approx(report["summary"]["dpo"][arm]["target/pass_at_1"]["mean"])
    html = (folder / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 4 and "<table>" in html
    assert "entropy_histograms.png" in text and "target answer entropy" in text
    for png in ("pass_at_k.png", "gain_vs_retention.png", "loss_curves.png", "entropy_histograms.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_entropy_histograms_pool_the_evaluations_over_seeds(compared):
    tmp_path, report, _ = compared
    folders = {f.name: f for f in (tmp_path / "results" / "evaluate").iterdir()}
    histograms = lambda key: json.loads(Manifest.read(folders[key]).path("entropy").read_text())  # noqa: E731
    evaluated = {run[phase]["key"] for run in report["runs"] for phase in report["phases"]}
    (base_key,) = set(folders) - evaluated  # the base model's evaluation, shared by every arm
    base = histograms(base_key)
    entropy = report["entropy"]
    assert entropy["edges"] == base["edges"]
    assert entropy["base"] == {suite: h["counts"] for suite, h in base["suites"].items()}
    assert report["base"]["target/answer_entropy"] == base["suites"]["target"]["mean"]
    for phase in report["phases"]:
        for arm in ARMS:
            seeds = [histograms(run[phase]["key"]) for run in report["runs"] if run["arm"] == arm]
            for suite in ("target", "general"):
                pooled = entropy[phase][arm][suite]
                assert pooled == np.sum([h["suites"][suite]["counts"] for h in seeds], axis=0).tolist()
                assert sum(pooled) == len(SEEDS) * base["suites"][suite]["tokens"]  # each seed, the same answers
                assert report["summary"][phase][arm][f"{suite}/answer_entropy"]["mean"] == pytest.approx(
                    np.mean([h["suites"][suite]["mean"] for h in seeds]))


def test_compare_without_a_compare_section_is_one_line_of_advice():
    result = CliRunner().invoke(app, ["compare", str(REPO / "configs" / "demo.yaml")])
    assert result.exit_code == 2
    assert "the config has no `compare` section (arms and seeds); see configs/claim.yaml" in result.output
