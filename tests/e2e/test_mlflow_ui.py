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

from flows.pipeline_flow import run_pipeline
from pipeline.runtime.process import free_port
from pipeline.tracking.tracker import pipeline_run_name
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
    """Two tiny pipelines that differ in DPO's beta (the second reuses all but DPO and its
    evaluation), their store served by `mlflow server`, and a browser."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:  # fail, never skip: CI must not pass without looking at the page
        pytest.fail(f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver (`make test` "
                    "does; or apt-get install chromium chromium-driver), or leave the browser tests out with "
                    "`make test BROWSER_TESTS=0` / `pytest -m 'not browser'`", pytrace=False)
    tmp_path = tmp_path_factory.mktemp("ui")
    # The reference answer as the chosen side: the tiny SFT model gets pairs without a sampling trick.
    cfg = tiny_config(tmp_path, pairs={"reference_chosen": True})
    other = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"trainer": cfg.dpo.trainer | {"beta": 0.3}})})
    # MLflow puts a new experiment's artifacts under ./mlruns: keep them in tmp, not in the checkout.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        stages = [r.name for r in run_pipeline(cfg)]
        run_pipeline(other)
    client = MlflowClient(f"sqlite:///{cfg.results_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    first, second = client.search_runs([experiment], "tags.`posttrain.kind` = 'pipeline'", order_by=["start_time ASC"])
    assert first.info.run_name == pipeline_run_name(cfg, None) != second.info.run_name == pipeline_run_name(other, None)
    runs = {r.info.run_name: r for r in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{first.info.run_id}'")}
    assert sorted(runs) == sorted(stages)  # one run per stage under the pipeline's run
    port = free_port()
    server = start_server(cfg.results_dir, port, ui=True)  # the server `posttrain ui` runs
    driver = None
    try:
        driver = chromium()
        yield SimpleNamespace(page=f"http://127.0.0.1:{port}/#/experiments/{experiment}",
                              href=f"#/experiments/{experiment}/", parent=first, other=second, runs=runs,
                              client=client, driver=driver)
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
    """The page `posttrain ui` prints, the runs in the "Model training" view: the runs table lists
    the pipeline's run; expanding it shows every stage's run."""
    # `#/experiments/<id>` alone opens MLflow 3's GenAI overview, not the runs
    ui.driver.get(f"{ui.page}/runs?workflowType=machine_learning")
    try:
        shown(ui.driver, f"//a[starts-with(@href, '{ui.href}models')][.='Models']")  # the view's menu: Runs, Models
        parent = f"//a[@href='{ui.href}runs/{ui.parent.info.run_id}']"
        assert shown(ui.driver, parent).text == ui.parent.info.run_name
        # Nested runs start collapsed under their parent: the one button in its row expands them.
        expand = (By.XPATH, f"//*[@role='row'][.{parent}]//button")
        WebDriverWait(ui.driver, WAIT).until(EC.element_to_be_clickable(expand)).click()
        for name, run in ui.runs.items():
            assert shown(ui.driver, f"//a[@href='{ui.href}runs/{run.info.run_id}']").text == name
    finally:
        screenshot(ui.driver, "experiment.png", capsys)
    # Folded again: the UI keeps the state, and selecting an unfolded run selects its stage runs too.
    ui.driver.find_element(*expand).click()
    stage = f"//a[@href='{ui.href}runs/{ui.runs['dpo'].info.run_id}']"
    WebDriverWait(ui.driver, WAIT).until(lambda d: not d.find_elements(By.XPATH, stage))


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
        shown(ui.driver, f"//a[@href='{ui.href}runs/{ui.parent.info.run_id}'][.='{ui.parent.info.run_name}']")
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


def test_the_dpo_models_page_leads_back_to_the_sft_model_the_base_model_and_the_data(ui, capsys):
    """Lineage as a user follows it: the DPO model's page links the run that made it; that run's
    page lists the SFT model as its input; the SFT model's page links its run, whose page lists
    the base model as its input and the SFT data (name and digest) it trained on."""
    made = {name: next(m for m in ui.client.search_logged_models([ui.parent.info.experiment_id])
                       if m.source_run_id == ui.runs[stage].info.run_id)
            for name, stage in (("dpo", "dpo"), ("sft", "sft"), ("base", "pretrain"))}
    (data,) = ui.client.get_run(ui.runs["sft"].info.run_id).inputs.dataset_inputs
    models = lambda run: {"Input": [m.model_id for m in run.inputs.model_inputs],  # noqa: E731
                          "Output": [m.model_id for m in run.outputs.model_outputs]}
    # What the pages must show, as the store has it.
    assert models(ui.client.get_run(ui.runs["dpo"].info.run_id)) == {"Input": [made["sft"].model_id],
                                                                      "Output": [made["dpo"].model_id]}
    assert models(ui.client.get_run(ui.runs["sft"].info.run_id)) == {"Input": [made["base"].model_id],
                                                                      "Output": [made["sft"].model_id]}
    driver = ui.driver
    driver.get(f"{ui.page}/models/{made['dpo'].model_id}")
    try:
        for model, read in (("dpo", "sft"), ("sft", "base")):
            run = ui.runs["dpo" if model == "dpo" else "sft"]
            # the model's page: "Source run", the run that made it
            shown(driver, f"//a[@href='{ui.href}runs/{run.info.run_id}'][.='{run.info.run_name}']").click()
            # the run's page: its logged models, the one it read as "Input" and the one it made as "Output"
            for kind, name in (("Input", read), ("Output", model)):
                link = f".//a[@href='{ui.href}models/{made[name].model_id}'][.='{name}']"
                row = shown(driver, f"//*[@role='row'][{link}]")
                assert row.find_element(By.XPATH, "./*[@role='gridcell'][1]").text == kind
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
            screenshot(driver, f"{model}_run_models.png", capsys)
            if model == "dpo":  # on to the SFT model's page
                shown(driver, f"//a[@href='{ui.href}models/{made['sft'].model_id}'][.='sft']").click()
        # the SFT run's page names the data it trained on, with its digest
        text = f"{data.dataset.name} ({data.dataset.digest})"  # React writes it as several text nodes
        shown(driver, f"//*[contains(., '{text}')][not(*[contains(., '{text}')])]")
    finally:
        screenshot(driver, "sft_run_data.png", capsys)


def test_two_pipeline_runs_compare_with_their_metrics_and_what_differs(ui, capsys):
    """The runs table's Compare on the two pipeline runs: every headline metric of each, as the
    store has it, and with "Show diff only" exactly the parameters that differ (DPO's beta)."""
    driver, runs = ui.driver, (ui.parent, ui.other)
    driver.get(f"{ui.page}/runs")
    try:
        for run in runs:
            row = shown(driver, f"//*[@role='row'][.//a[@href='{ui.href}runs/{run.info.run_id}']]")
            row.find_element(By.XPATH, ".//input[@type='checkbox'][contains(@class, 'ag-checkbox-input')]").click()
        shown(driver, "//button[.='Compare']").click()
        shown(driver, "//*[.='Comparing 2 Runs from 1 Experiment']")
        # The columns' order, from the "Run ID" row
        ids = [a.text for a in driver.find_elements(By.XPATH, "//*[@role='row' or self::tr][.//*[.='Run ID:']]//a")]
        assert sorted(ids) == sorted(r.info.run_id for r in runs), ids
        columns = [next(r for r in runs if r.info.run_id == i) for i in ids]
        # Metric names and values are two virtualised grids side by side, rows matched by their offset:
        # scrolled through, collecting each name's row.
        names = shown(driver, "//a[@title='Plot chart']/ancestor::div[@role='grid'][1]")
        values = names.find_element(By.XPATH, "./following::div[@role='grid'][1]")
        seen = {}
        for top in range(0, 50 * 45, 200):
            driver.execute_script("arguments[0].scrollTop = arguments[1]", values, top)
            for link in names.find_elements(By.XPATH, ".//a[@title='Plot chart']"):
                offset = link.find_element(By.XPATH, "./..").get_attribute("style").split("top: ")[1].split(";")[0]
                cells = values.find_elements(By.XPATH, f"./div/div[contains(@style, 'top: {offset};')]")
                if len(cells) != len(runs):  # a row whose values are not drawn at this scroll
                    continue
                # textContent: Selenium's text is empty for a row scrolled out of the grid's view
                seen[link.get_attribute("textContent")] = [c.get_attribute("textContent") for c in sorted(
                    cells, key=lambda c: int(c.get_attribute("style").split("left: ")[1].split("px")[0]))]
        assert set(seen) == set(ui.parent.data.metrics) | set(ui.other.data.metrics)
        assert any(name.startswith("evaluate_dpo/") for name in seen)
        for name, shown_values in seen.items():
            assert [float(v) for v in shown_values] == [
                pytest.approx(run.data.metrics[name], rel=1e-3, nan_ok=True) for run in columns], name
        screenshot(driver, "compare_metrics.png", capsys)
        # What differs between the two configs, and only that
        switch = shown(driver, "//button[@aria-label='Parameters - Show diff only']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", switch)
        switch.click()
        differ = {k for k in ui.parent.data.params | ui.other.data.params
                   if ui.parent.data.params.get(k) != ui.other.data.params.get(k)}
        assert differ == {"dpo.trainer.beta"}  # set in one config only: the other shows nothing
        table = "//button[@aria-label='Parameters - Show diff only']/following::table[1]"
        WebDriverWait(driver, WAIT).until(lambda d: len(d.find_elements(By.XPATH, f"{table}//tr")) == len(differ))
        rows = {r.find_element(By.XPATH, "./th").get_attribute("textContent"):
                [td.get_attribute("textContent") for td in r.find_elements(By.XPATH, "./td")]
                for r in driver.find_elements(By.XPATH, f"{table}//tr")}
        assert rows == {k: [run.data.params.get(k, "") for run in columns] for k in differ}
    finally:
        screenshot(driver, "compare.png", capsys)
