"""The MLflow UI, where users compare lineage: a real `mlflow server` on the store of a small
pipeline run, opened in headless Chromium (Debian's chromium and chromium-driver; `make test`
installs them, `make test BROWSER_TESTS=0` leaves these tests out). Every value looked for on
the page is read from the store with MlflowClient, so a broken page or broken tracking fails."""

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from flows.pipeline import run_pipeline
from pipeline.process import free_port
from pipeline.tracking import pipeline_run_name
from tests.e2e.test_mlflow_store import start_server, stop_server
from tests.e2e.test_stages import tiny_config

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOTS = REPO / "test-artifacts" / "mlflow_ui"  # the screenshots, for a person (or a CI that keeps artifacts) to look at
WAIT = 120  # seconds; a fresh Chromium profile's first page load is slow on a small machine


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path below, Selenium Manager downloads nothing
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", "--window-size=1600,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    # MLflow's assistant panel opens on a fresh profile and squeezes the page into one column.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
        "source": "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                  "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"})
    return driver


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A tiny pipeline up to evaluate_base, its store served by `mlflow server`, and a browser."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:  # fail, never skip: CI must not pass without looking at the page
        pytest.fail(f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver (`make test` "
                    "does; or apt-get install chromium chromium-driver), or leave the browser tests out with "
                    "`make test BROWSER_TESTS=0` / `pytest -m 'not browser'`", pytrace=False)
    tmp_path = tmp_path_factory.mktemp("ui")
    cfg = tiny_config(tmp_path)
    # MLflow puts a new experiment's artifacts under ./mlruns: keep them in tmp, not in the checkout.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        stages = [r.name for r in run_pipeline(cfg, stage="evaluate_base")]
    client = MlflowClient(f"sqlite:///{cfg.results_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    name = pipeline_run_name(cfg, None)
    assert name == "tiny/ce/seed0" and sorted(runs) == sorted([name, *stages])  # the pipeline's run, one per stage
    port = free_port()
    server = start_server(cfg.results_dir, port, ui=True)  # the server `posttrain ui` runs
    driver = None
    try:
        driver = chromium()
        yield SimpleNamespace(page=f"http://127.0.0.1:{port}/#/experiments/{experiment}",
                              href=f"#/experiments/{experiment}/runs/", parent=runs.pop(name), runs=runs,
                              driver=driver)
    finally:
        if driver is not None:
            driver.quit()
        stop_server(server)


def shown(driver, xpath: str):
    return WebDriverWait(driver, WAIT).until(EC.visibility_of_element_located((By.XPATH, xpath)))


def screenshot(driver, name: str, capsys) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / name))
    with capsys.disabled():  # printed even while pytest captures the output
        print(f"\nscreenshot: {SHOTS / name}")


def test_experiment_page_shows_the_pipeline_run_with_its_stage_runs_under_it(ui, capsys):
    """The runs table lists the pipeline's run; expanding it shows every stage's run."""
    ui.driver.get(f"{ui.page}/runs")  # `#/experiments/<id>` alone opens MLflow 3's GenAI overview, not the runs
    try:
        parent = f"//a[@href='{ui.href}{ui.parent.info.run_id}']"
        assert shown(ui.driver, parent).text == ui.parent.info.run_name
        # Nested runs start collapsed under their parent: the one button in its row expands them.
        expand = (By.XPATH, f"//*[@role='row'][.{parent}]//button")
        WebDriverWait(ui.driver, WAIT).until(EC.element_to_be_clickable(expand)).click()
        for name, run in ui.runs.items():
            assert shown(ui.driver, f"//a[@href='{ui.href}{run.info.run_id}']").text == name
    finally:
        screenshot(ui.driver, "experiment.png", capsys)


@pytest.mark.parametrize("stage, input_name, upstream", [("pretrain", "train", "demo_data"),
                                                         ("evaluate_base", "model", "pretrain")])
def test_stage_run_page_shows_its_metrics_and_lineage_tags(ui, stage, input_name, upstream, capsys):
    """A stage run's page shows its parent run, every metric with its value, and every posttrain
    tag, among them the run that made its input."""
    run, lineage = ui.runs[stage], f"posttrain.input_run.{input_name}"
    assert run.data.tags[lineage] == ui.runs[upstream].info.run_id  # the store links the stage to its input
    assert run.data.metrics  # nothing to look for would prove nothing
    ui.driver.get(f"{ui.page}/runs/{run.info.run_id}")
    try:
        shown(ui.driver, f"//a[@href='{ui.href}{ui.parent.info.run_id}'][.='{ui.parent.info.run_name}']")
        for name, value in run.data.metrics.items():
            cells = shown(ui.driver, f"//*[@role='row'][.//a[.='{name}']]").find_elements(By.XPATH, "./*[@role='cell']")
            # The page writes numbers its own way (6.666666666666667e-06 as 0.000006666666666666667).
            assert float(cells[1].text) == pytest.approx(value, rel=1e-3), name
        for key, value in run.data.tags.items():
            if key.startswith("posttrain."):  # long keys and values are cut with an ellipsis; the title has all
                shown(ui.driver, f"//span[@title='{key}']/following-sibling::span[@title='{value}']")
        ui.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})",
                                 shown(ui.driver, f"//span[@title='{lineage}']"))
    finally:
        screenshot(ui.driver, f"{stage}_run.png", capsys)
    try:  # a cut tag opens in full when clicked, as a user reads the run id of the input
        shown(ui.driver, f"//span[@title='{lineage}']/..").click()
        shown(ui.driver, f"//*[@role='dialog'][contains(., 'Tag: {lineage}')][contains(., '{run.data.tags[lineage]}')]")
    finally:
        screenshot(ui.driver, f"{stage}_lineage.png", capsys)
