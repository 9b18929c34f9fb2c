from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_explains_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "status", "ui", "validate"):
        assert command in result.output


def test_validate_accepts_the_demo_config():
    result = runner.invoke(app, ["validate", str(REPO / "configs" / "demo.yaml")])
    assert result.exit_code == 0 and "valid (demo world, sft loss ce)" in result.output


def test_bad_config_is_one_line_of_advice_without_traceback(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: x\nsamplng:\n  n: 2\n")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "typo.yaml:2: samplng: unknown key" in result.output and "did you mean 'sampling'" in result.output
    assert "Traceback" not in result.output


def test_unknown_stage_names_the_stages(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(f"name: x\nresults_dir: {tmp_path / 'results'}\n")
    result = runner.invoke(app, ["run", str(path), "--stage", "dpo"])
    assert result.exit_code == 2
    assert "unknown stage 'dpo'" in result.output and "demo_data, pretrain, evaluate_base, sft, evaluate_sft" in result.output
