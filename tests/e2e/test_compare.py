"""`posttrain compare` end to end on a very small world, checked against what MLflow holds;
and the statistics behind its report."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config.schema import ConfigError, parse_config
from pipeline.data.sources import write_jsonl
from pipeline.evaluation.metrics import mean_interval, paired_bootstrap, pass_at_k_table, sample_counts
from pipeline.reporting.report import (ArmRun, build_report, interval, matched_levels, matched_retention, pareto, render_markdown,
                                       retention_at, select_learning_rates, verdict, write_report)
from pipeline.results.manifest import Manifest
from tests.e2e.test_stages import TINY

REPO = Path(__file__).resolve().parents[2]
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


def compare_config(**compare):
    return parse_config({"name": "x", "compare": {"arms": {"ce": {"name": "ce"}, "eaft": {"name": "eaft"}}, **compare}})


@pytest.mark.parametrize("compare, error", [
    ({"seeds": [0, 1, 2], "base_seeds": [7, 8]},
     r"compare\.base_seeds: needs one base model seed per entry of compare\.seeds \(3\): got 2"),
    ({"learning_rates": [1e-4, 1e-4]}, r"compare\.learning_rates: learning rates must be positive and differ"),
    ({"learning_rates": [0.0, 1e-4]}, r"compare\.learning_rates: learning rates must be positive and differ"),
    ({"select": "test"}, r"compare\.select: Input should be 'target\+retention', 'target' or 'retention' "
                         r"\(got 'test'\)"),
    ({"matched_target": [1.5]}, r"compare\.matched_target: target Pass@1 levels lie in \[0, 1\]"),
], ids=["base_seeds-length", "learning_rates-repeated", "learning_rates-zero", "select-unknown",
        "matched_target-range"])
def test_compare_sweep_config_errors_name_the_key(compare, error):
    with pytest.raises(ConfigError, match=error):
        compare_config(**compare)


def test_base_seeds_are_refused_with_a_real_model(tmp_path):
    data = tmp_path / "rows.jsonl"
    write_jsonl(data, [{"prompt": "1+1=", "answer": "2", "completion": "2"}])
    source = {"path": str(data)}
    with pytest.raises(ConfigError, match=r"compare\.base_seeds: .*model\.path is set"):  # by `validate` already
        parse_config({"name": "x", "model": {"path": "org/model"},
                      "data": {"sft": source, "target_eval": source, "general_eval": source},
                      "compare": {"arms": {"ce": {"name": "ce"}}, "seeds": [0, 1], "base_seeds": [5, 6]}})


def test_compare_refuses_a_choice_without_validation_prompts(tmp_path):
    from flows.compare import check_validation_data

    data = tmp_path / "rows.jsonl"
    write_jsonl(data, [{"prompt": "1+1=", "answer": "2", "completion": "2"}])
    source = {"path": str(data)}
    real = {"name": "x", "model": {"path": "org/model"}, "data": {"sft": source, "target_eval": source,
                                                                 "general_eval": source, "target_val": source}}
    with pytest.raises(ConfigError, match=r"compare\.select: target\+retention is scored on validation prompts: "
                                          r"give data\.general_val$"):
        check_validation_data(parse_config({**real, "compare": {"arms": {"ce": {"name": "ce"}}}}))
    check_validation_data(parse_config({**real, "compare": {"arms": {"ce": {"name": "ce"}}, "select": "target"}}))
    no_split = parse_config({"name": "x", "demo": {"val_examples": 0}, "compare": {"arms": {"ce": {"name": "ce"}}}})
    with pytest.raises(ConfigError, match=r"give data\.general_val, data\.target_val \(or demo\.val_examples > 0\)"):
        check_validation_data(no_split)
    check_validation_data(compare_config())  # the demo world generates both


def test_arm_sets_the_learning_rate_seeds_and_name():
    cfg = compare_config(seeds=[0, 1], base_seeds=[10, 11], learning_rates=[1e-5, 5e-5])
    arm = cfg.arm("eaft", 1, 5e-5)
    assert arm.name == "x/eaft/lr5e-05/seed1" and arm.compare is None
    assert arm.sft.loss.name == "eaft" and arm.sft.trainer["learning_rate"] == 5e-5
    assert arm.sft.trainer["seed"] == 1 and arm.dpo.trainer["seed"] == 1
    assert arm.demo.model_seed == 11 and arm.model_seed == 11 and arm.seed == cfg.seed  # the data's seed stays
    plain = compare_config(seeds=[0, 1]).arm("ce", 0, 2e-4)
    assert plain.demo == cfg.demo and plain.sft.trainer["learning_rate"] == 2e-4


def test_learning_rates_default_to_the_configs_own():
    from flows.compare import learning_rates

    cfg = parse_config({"name": "x", "sft": {"trainer": {"learning_rate": 3e-4}},
                        "compare": {"arms": {"ce": {"name": "ce"}}}})
    assert learning_rates(cfg) == [3e-4]
    swept = cfg.model_copy(update={"compare": cfg.compare.model_copy(update={"learning_rates": [1e-3, 1e-5]})})
    assert learning_rates(swept) == [1e-5, 1e-3]


def test_pareto_keeps_the_points_no_other_beats_on_both():
    points = [(0.2, 0.9), (0.5, 0.6), (0.4, 0.5), (0.8, 0.1), (0.5, 0.6), (0.8, 0.05)]
    # (0.4, 0.5) loses to (0.5, 0.6) on both; (0.8, 0.05) ties on target, loses on retention;
    # equal points do not beat each other
    assert pareto(points) == [True, True, False, True, True, False]
    nan = float("nan")  # no retention to take (a base model that solves nothing): never on the frontier
    assert pareto([(0.9, nan), (0.2, 0.5)]) == [False, True]


def test_retention_at_a_target_level_is_interpolated_along_the_rates():
    curve = [(0.1, 0.9), (0.5, 0.5), (0.7, 0.1)]  # rising target, falling retention, in learning-rate order
    assert retention_at(curve, 0.3) == pytest.approx(0.7)
    assert retention_at(curve, 0.6) == pytest.approx(0.3)
    assert retention_at(curve, 0.5) == 0.5 and retention_at(curve, 0.1) == 0.9
    assert retention_at(curve, 0.8) is None and retention_at(curve, 0.05) is None
    # a curve that turns back reaches 0.5 twice: the first crossing, at the lower rates, counts
    assert retention_at([(0.2, 0.8), (0.6, 0.4), (0.4, 0.2)], 0.5) == pytest.approx(0.5)
    assert retention_at([(0.4, 0.3)], 0.4) == 0.3 and retention_at([(0.4, 0.3)], 0.5) is None
    assert retention_at([(0.2, 0.8), (0.6, float("nan"))], 0.4) is None  # a NaN retention is not a reading


def test_matched_levels_lie_where_the_arms_target_spans_meet():
    point = lambda t: {"target": {"mean": t}}  # noqa: E731
    points = {"ce": [point(0.3), point(0.9)], "eaft": [point(0.2), point(0.7)], "eksft": [point(0.05), point(0.1)]}
    levels = matched_levels(points, [0.5], "ce")
    # all three share no span (eksft tops out at 0.1); eaft and ce share 0.3-0.7, eksft and ce nothing
    assert levels == {"0.500": {"level": pytest.approx(0.5), "source": "the middle of the span `eaft` and `ce` both "
                                "reach; compare.matched_target", "arms": ["ce", "eaft", "eksft"]}}
    two = matched_levels({"ce": points["ce"], "eaft": points["eaft"]}, None, "ce")
    assert list(two) == ["0.500"] and two["0.500"]["source"] == "the middle of the span every arm reaches"
    # Two arms whose spans with ce have the same middle: one level, named for both.
    same = matched_levels(points | {"gem": [point(0.1), point(0.7005)]}, None, "ce")  # 0.50025: the same 0.500
    assert same["0.500"]["source"] == ("the middle of the span `eaft` and `ce` both reach; the middle of the span "
                                       "`gem` and `ce` both reach") and same["0.500"]["arms"] == ["ce", "eaft", "gem"]


def test_matched_retention_counts_only_the_seeds_that_reach_the_level():
    curves = {"ce": {0: [(0.2, 0.6), (0.6, 0.2)], 1: [(0.2, 0.5), (0.6, 0.1)], 2: [(0.3, 0.4), (0.7, 0.2)]},
              "eaft": {0: [(0.2, 0.8), (0.6, 0.4)], 1: [(0.2, 0.9), (0.6, 0.3)], 2: [(0.1, 0.9), (0.3, 0.8)]}}
    matched = matched_retention(curves, 0.4, "ce")
    assert matched["ce"]["seeds_reached"] == 3 and matched["ce"]["mean"] == pytest.approx(np.mean([0.4, 0.3, 0.35]))
    eaft = matched["eaft"]  # seed 2 tops out at 0.3: not reached
    assert (eaft["seeds_reached"], eaft["seeds"]) == (2, 3)
    assert (eaft["mean"], eaft["low"], eaft["high"]) == pytest.approx(mean_interval([0.6, 0.6]), nan_ok=True)
    assert eaft["difference"]["seeds"] == 2
    assert eaft["difference"]["mean"] == pytest.approx(np.mean([0.6 - 0.4, 0.6 - 0.3]))
    assert "difference" not in matched["ce"]
    alone = matched_retention({"ce": curves["ce"], "eaft": {0: curves["eaft"][0], 2: curves["eaft"][2]}}, 0.4, "ce")
    assert alone["eaft"]["seeds_reached"] == 1 and alone["eaft"]["low"] is None  # one seed: no interval
    nowhere = matched_retention(curves, 0.95, "ce")
    assert nowhere["eaft"]["seeds_reached"] == 0 and nowhere["eaft"]["mean"] is None


# The synthetic comparison: two arms, three learning rates, three seeds, each seed its own base
# model. Per (arm, rate): target and general success rates on the test prompts, and the
# validation scores, which (for `eaft`) favour a rate the test metrics do not.
RATES, SYN_SEEDS, BASE_SEEDS, N = (1e-5, 1e-4, 1e-3), (0, 1, 2), (10, 11, 12), 32
TEST_RATES = {("ce", 1e-5): (0.3, 0.8), ("ce", 1e-4): (0.5, 0.5), ("ce", 1e-3): (0.7, 0.2),
              ("eaft", 1e-5): (0.3, 0.9), ("eaft", 1e-4): (0.5, 0.7), ("eaft", 1e-3): (0.8, 0.3)}
VALIDATION = {("ce", 1e-5): (0.2, 0.6), ("ce", 1e-4): (0.5, 0.4), ("ce", 1e-3): (0.7, 0.3),  # ce: 1e-3 (1.0)
              ("eaft", 1e-5): (0.3, 0.8), ("eaft", 1e-4): (0.6, 0.7), ("eaft", 1e-3): (0.7, 0.2)}  # eaft: 1e-4 (1.3)
EDGES = [0.0, 1.0, 2.0, 3.0]


def fake_stage(folder: Path, stage: str, metrics: dict | None = None, files: dict | None = None) -> Manifest:
    folder.mkdir(parents=True)
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return Manifest(stage, folder.name, {Path(n).stem: n for n in files or {}}, metrics=metrics or {}, folder=folder)


def fake_evaluation(folder: Path, rng, target: float, general: float, base: Manifest | None = None,
                    validation: tuple[float, float] | None = None) -> Manifest:
    """An evaluation with sample files drawn at these success rates, and metrics computed from them."""
    files, metrics = {}, {}
    for suite, rate in (("target", target), ("general", general)):
        rows = [{"id": f"{suite}-{i}", "correct": (rng.random(N) < rate).tolist()} for i in range(20)]
        files[f"samples_{suite}.jsonl"] = "\n".join(json.dumps(r) for r in rows)
        table = pass_at_k_table(sample_counts(rows), [1, 8, 32])
        metrics |= {f"{suite}/pass_at_{k}": v for k, v in table.items()}
        metrics |= {f"{suite}/distinct_correct": table[32], f"{suite}/answer_entropy": 1.0 - rate}
    histogram = {"edges": EDGES, "suites": {s: {"counts": [5, 3, 2], "mean": 1.0, "tokens": 10}
                                            for s in ("target", "general")}}
    files["entropy.json"] = json.dumps(histogram)
    if base is not None:
        metrics["general/retention"] = metrics["general/pass_at_1"] / base.metrics["general/pass_at_1"]
    if validation is not None:
        metrics |= {"val_target/pass_at_1": validation[0], "val_general/pass_at_1": validation[1] * 0.9,
                    "val_general/retention": validation[1]}
    return fake_stage(folder, "evaluate", metrics, files)


def fake_runs(tmp_path: Path) -> list[ArmRun]:
    rng = np.random.default_rng(0)
    history = json.dumps([{"step": s, "loss": 2.0 / s} for s in (1, 2, 3)])
    runs = []
    for seed, base_seed in zip(SYN_SEEDS, BASE_SEEDS):
        base = fake_evaluation(tmp_path / f"base{base_seed}", rng, 0.05, 0.9)
        for lr in RATES:
            for arm in ("ce", "eaft"):
                name = f"{arm}-{lr:g}-{seed}"
                (target, general), validation = TEST_RATES[arm, lr], VALIDATION[arm, lr]
                manifests = {
                    "evaluate_base": base,
                    **{stage: fake_stage(tmp_path / f"{stage}-{name}", stage, files={"log_history.json": history})
                       for stage in ("sft", "dpo")},
                    "evaluate_sft": fake_evaluation(tmp_path / f"sft-eval-{name}", rng, target, general, base,
                                                    validation),
                    # DPO: a little more target skill, and validation scores that must not count
                    "evaluate_dpo": fake_evaluation(tmp_path / f"dpo-eval-{name}", rng, target + 0.05, general, base,
                                                    (1.0, 1.0) if lr == 1e-5 else validation)}
                runs.append(ArmRun(arm, seed, lr, f"run-{name}", manifests,
                                   {s: f"mlflow-{s}-{name}" for s in ("evaluate_sft", "evaluate_dpo")}))
    return runs


def synthetic_config(**compare):
    return parse_config({"name": "synthetic", "sampling": {"n": N}, "evaluate": {"ks": [1, 8, 32]},
                         "compare": {"arms": {"ce": {"name": "ce"}, "eaft": {"name": "eaft"}}, "seeds": list(SYN_SEEDS),
                                     "base_seeds": list(BASE_SEEDS), "learning_rates": list(RATES), "bootstrap": 200,
                                     **compare}})


def test_selection_uses_validation_scores_after_sft_only(tmp_path):
    runs = fake_runs(tmp_path)
    selected = select_learning_rates(runs, "target+retention")
    # eaft's test metrics would favour 1e-3 (target 0.8); validation favours 1e-4
    assert selected["eaft"]["learning_rate"] == 1e-4 and selected["eaft"]["score"] == pytest.approx(1.3)
    assert selected["ce"]["learning_rate"] == 1e-3 and selected["ce"]["score"] == pytest.approx(1.0)
    assert [s["learning_rate"] for s in selected["ce"]["scores"]] == list(RATES)
    assert select_learning_rates(runs, "target")["eaft"]["learning_rate"] == 1e-3
    assert select_learning_rates(runs, "retention")["eaft"]["learning_rate"] == 1e-5
    for r in runs:  # a NaN score (retention against a base model that solves nothing) never wins, even first
        if (r.arm, r.learning_rate) == ("eaft", 1e-5):
            r.manifests["evaluate_sft"].metrics["val_general/retention"] = float("nan")
    assert select_learning_rates(runs, "target+retention")["eaft"]["learning_rate"] == 1e-4
    del runs[4].manifests["evaluate_sft"].metrics["val_general/retention"]  # ce at 1e-3, seed 0
    with pytest.raises(ValueError, match=r"`ce` at learning rate 1e-3, seed 0: its evaluation after SFT \(.*\) has "
                                         r"no val_general/retention .*run its evaluate stage again"):
        select_learning_rates(runs, "target+retention")
    one_rate = [r for r in runs if r.learning_rate == 1e-4]
    for r in one_rate:  # one rate: nothing to choose, so no validation metrics needed
        r.manifests["evaluate_sft"].metrics.pop("val_general/retention", None)
    assert select_learning_rates(one_rate, "target+retention")["ce"] == {"learning_rate": 1e-4, "score": None,
                                                                          "scores": []}


def test_report_on_synthetic_runs_has_the_sweep_sections(tmp_path):
    runs = fake_runs(tmp_path)
    cfg = synthetic_config(matched_target=[0.4])
    files = write_report(cfg, runs, tmp_path / "report")
    report = json.loads(files["report.json"].read_text())
    assert report["learning_rates"] == list(RATES) and report["base_seeds"] == list(BASE_SEEDS)
    assert report["ks"] == [1, 8, 32] and report["select"] == "target+retention"
    assert {a: s["learning_rate"] for a, s in report["selected"].items()} == {"ce": 1e-3, "eaft": 1e-4}
    chosen = {a: [r for r in runs if r.arm == a and r.learning_rate == lr] for a, lr in (("ce", 1e-3), ("eaft", 1e-4))}
    for phase, stage in (("sft", "evaluate_sft"), ("dpo", "evaluate_dpo")):
        for arm, arm_runs in chosen.items():  # the summary is at the chosen rate, each metric up to Pass@32
            for metric in ("target/pass_at_1", "target/pass_at_32", "general/retention"):
                assert report["summary"][phase][arm][metric]["mean"] == pytest.approx(
                    np.mean([r.manifests[stage].metrics[metric] for r in arm_runs]))
        diff = report["differences"][phase]["eaft"]["target/pass_at_32"]
        assert diff["diff"] == pytest.approx(report["summary"][phase]["eaft"]["target/pass_at_32"]["mean"]
                                             - report["summary"][phase]["ce"]["target/pass_at_32"]["mean"])
        assert "Pass@" in report["verdicts"][phase]["eaft"]
        for arm in ("ce", "eaft"):
            points = report["frontier"][phase][arm]
            assert [p["learning_rate"] for p in points] == list(RATES)
            for p in points:
                group = [r for r in runs if r.arm == arm and r.learning_rate == p["learning_rate"]]
                gains = [r.manifests[stage].metrics["target/pass_at_1"] - r.manifests["evaluate_base"].metrics[
                    "target/pass_at_1"] for r in group]  # each seed against its own base model
                assert p["gain"]["mean"] == pytest.approx(np.mean(gains))
                assert p["retention"]["low"] <= p["retention"]["mean"] <= p["retention"]["high"]
            means = [(p["target"]["mean"], p["retention"]["mean"]) for p in points]
            assert [p["pareto"] for p in points] == pareto(means)
        levels = report["matched_levels"][phase]
        spans = [[p["target"]["mean"] for p in report["frontier"][phase][a]] for a in ("ce", "eaft")]
        low, high = max(min(t) for t in spans), min(max(t) for t in spans)
        common = (low + high) / 2  # the middle of the span both arms reach
        assert low < high and list(levels) == [f"{common:.3f}", "0.400"] and levels["0.400"]["level"] == 0.4
        assert levels[f"{common:.3f}"]["arms"] == ["ce", "eaft"]
        at = report["matched"][phase]["0.400"]
        assert at["eaft"]["seeds_reached"] == 3 and at["eaft"]["difference"]["seeds"] == 3
        assert at["eaft"]["difference"]["mean"] == pytest.approx(at["eaft"]["mean"] - at["ce"]["mean"])
    assert [(r["arm"], r["learning_rate"], r["selected"]) for r in report["runs"][:2]] == [("ce", 1e-5, False),
                                                                                           ("eaft", 1e-5, False)]
    assert report["base"]["general/pass_at_1"] == pytest.approx(
        np.mean([r.manifests["evaluate_base"].metrics["general/pass_at_1"] for r in runs[::6]]))
    text = files["report.md"].read_text()
    for heading in ("## Learning rate per arm, chosen on validation", "## Frontier: target skill against retention",
                    "## Retention at matched target skill", "target Pass@32"):
        assert heading in text
    assert "`val_target/pass_at_1` + `val_general/retention`" in text
    assert "| `eaft` | 1.100 | 1.300 | 0.900 | 1e-4 |" in text  # the per-rate scores and the chosen rate
    assert "frontier.png" in text and files["report.html"].read_text().count('src="data:image/png;base64,') == 5
    for png in ("frontier.png", "pass_at_k.png", "gain_vs_retention.png", "loss_curves.png", "entropy_histograms.png"):
        assert files[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_has_a_per_task_retention_table_where_the_suite_has_lm_eval_tasks(tmp_path):
    runs = fake_runs(tmp_path)
    cfg = synthetic_config()
    assert "lm-eval" not in render_markdown(build_report(cfg, runs))  # no lm-eval tasks: no table
    rng = np.random.default_rng(1)
    for r in runs:
        for stage in ("evaluate_sft", "evaluate_dpo"):
            tasks = {"mmlu": rng.uniform(0.6, 1.0), "ifeval": rng.uniform(0.6, 1.0)}
            r.manifests[stage].metrics |= {f"general/lm_eval/{t}/retention": v for t, v in tasks.items()}
            r.manifests[stage].metrics["general/lm_eval/retention"] = sum(tasks.values()) / 2
    report = build_report(cfg, runs)
    chosen = [r for r in runs if r.learning_rate == report["selected"][r.arm]["learning_rate"]]
    for phase, stage in (("sft", "evaluate_sft"), ("dpo", "evaluate_dpo")):
        table = report["lm_eval"][phase]
        assert list(table["eaft"]) == ["general/lm_eval/ifeval/retention", "general/lm_eval/mmlu/retention",
                                       "general/lm_eval/retention"]  # the mean last
        for arm in ("ce", "eaft"):
            for metric, value in table[arm].items():
                assert value["mean"] == pytest.approx(np.mean([r.manifests[stage].metrics[metric] for r in chosen
                                                               if r.arm == arm]))
    text = render_markdown(report)
    assert "## General retention per lm-eval task" in text
    assert "| phase | arm | ifeval | mmlu | mean over tasks |" in text
    mmlu = report["lm_eval"]["dpo"]["eaft"]["general/lm_eval/mmlu/retention"]
    assert "| after SFT + DPO | `eaft` | " in text and interval(mmlu) in text


def test_report_with_one_learning_rate_and_one_base_model(tmp_path):
    """The defaults (no sweep, no base seeds): the one rate is every arm's, the matched level is
    each seed's own point or not reached."""
    runs = [r for r in fake_runs(tmp_path) if r.learning_rate == 1e-4]
    for r in runs:  # one base model for every seed
        r.manifests["evaluate_base"] = runs[0].manifests["evaluate_base"]
    report = build_report(synthetic_config(learning_rates=None, base_seeds=None), runs)
    assert report["learning_rates"] == [1e-4] and report["base_seeds"] is None
    assert all(s["learning_rate"] == 1e-4 for s in report["selected"].values())
    assert report["base"] == pytest.approx({m: v for m, v in runs[0].manifests["evaluate_base"].metrics.items()
                                            if m in report["summary"]["sft"]["ce"]})
    assert all(len(points) == 1 and points[0]["pareto"] for points in report["frontier"]["sft"].values())


@pytest.mark.parametrize("name", ["claim.yaml", "claim-2seeds.yaml"])
def test_shipped_claim_configs_are_valid(name):
    result = CliRunner().invoke(app, ["validate", str(REPO / "configs" / name)])
    assert result.exit_code == 0, result.output


def run_compare_command(tmp_path: Path, parallel) -> tuple[dict, str]:
    preference = tmp_path / "preference.jsonl"
    write_jsonl(preference, [{"prompt": "12*3=", "chosen": "63", "rejected": "36"}] * 8)
    config = {
        "name": "tiny-claim", "results_dir": str(tmp_path / "results"), **TINY,
        # SFT long enough (a few seconds) that the pipelines side by side overlap in it although the
        # start of one's stage process lags the other's by a second or more on a loaded machine.
        "sft": {"trainer": {**TINY["sft"]["trainer"], "max_steps": 40}},
        "data": {"preference": {"path": str(preference)}},
        "sampling": {"max_tokens": 4, "n": 4, "temperature": 1.0},
        "evaluate": {"ks": [1, 4]},
        # One thread per stage: auto runs as many pipelines side by side as there are cores.
        "launch": {"cpu_threads": 1},
        "compare": {"arms": {arm: {"name": arm} for arm in ARMS}, "seeds": list(SEEDS), "bootstrap": 500,
                    "report_dir": str(tmp_path / "report"), "parallel": parallel},
    }
    path = tmp_path / "claim.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["compare", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "report" / "report.json").read_text()), result.output


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    report, output = run_compare_command(tmp_path, "auto")
    return tmp_path, report, output


def stage_manifests(results: Path) -> dict[tuple[str, str], Manifest]:
    return {(m.parent.parent.name, m.parent.name): Manifest.read(m.parent) for m in results.glob("*/*/manifest.json")}


def test_pipelines_side_by_side_make_what_one_at_a_time_makes(compared, tmp_path):
    side_by_side, report, output = compared
    assert re.search(r"\[compare\] [2-4] pipelines side by side", output)  # one per core, 4 to run
    made = stage_manifests(side_by_side / "results")
    # Two pipelines trained at once: they waited together for the stages they share.
    trained = sorted((m.started_at, m.started_at + m.seconds) for (stage, _), m in made.items() if stage == "sft")
    assert any(later[0] < earlier[1] for earlier, later in zip(trained, trained[1:]))
    one_at_a_time = run_compare_command(tmp_path, 1)[0]
    alone = stage_manifests(tmp_path / "results")
    assert alone.keys() == made.keys() and len(made) == 3 + 4 * len(ARMS) * len(SEEDS)
    timed = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    for where, manifest in made.items():
        # The same bytes (weights, samples, scores), but for the trainer's log, which times the run.
        assert {k: v for k, v in manifest.digests.items() if k != "log_history"} == \
            {k: v for k, v in alone[where].digests.items() if k != "log_history"}, where
        if "log_history" in manifest.digests:
            logs = [[{k: v for k, v in entry.items() if k not in timed} for entry in json.loads(m.path("log_history")
                                                                                           .read_text())]
                    for m in (manifest, alone[where])]
            assert logs[0] == logs[1], where
        assert {k: v for k, v in manifest.metrics.items() if k not in timed} == pytest.approx(
            {k: v for k, v in alone[where].metrics.items() if k not in timed}, nan_ok=True), where
    assert report["summary"] == one_at_a_time["summary"] and report["differences"] == one_at_a_time["differences"]


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
        assert pipeline.data.tags["posttrain.learning_rate"] == f"{run['learning_rate']:g}" and run["selected"]
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
            "report/entropy_histograms.png", "report/frontier.png"} <= artifacts


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
    assert html.count('src="data:image/png;base64,') == 5 and "<table>" in html
    assert "entropy_histograms.png" in text and "target answer entropy" in text
    assert "Every arm runs at one SFT learning rate" in text and "## Retention at matched target skill" in text
    assert len(report["learning_rates"]) == 1 and report["base_seeds"] is None  # the defaults: no sweep
    for png in ("pass_at_k.png", "gain_vs_retention.png", "loss_curves.png", "entropy_histograms.png", "frontier.png"):
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
    # pooled over the seeds like each arm's: here every seed starts from the one base model
    assert entropy["base"] == {suite: [len(SEEDS) * c for c in h["counts"]] for suite, h in base["suites"].items()}
    assert report["base"]["target/answer_entropy"] == pytest.approx(base["suites"]["target"]["mean"])
    for phase in report["phases"]:
        for arm in ARMS:
            seeds = [histograms(run[phase]["key"]) for run in report["runs"] if run["arm"] == arm and run["selected"]]
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
