"""A sweep's runs in the MLflow UI, in a real browser (headless Chromium through Selenium).

    pytest tests/tracking/test_mlflow_ui.py -s   # needs Debian chromium and chromium-driver
    FINQA_UI_SCREENSHOT=/abs/ui.png pytest tests/tracking/test_mlflow_ui.py  # keep the picture

Runs a 2-trial sweep into an ``mlflow server`` on 127.0.0.1 (tests/servers.py), opens the
experiment's runs table ("Model training" view; MLflow 3 opens experiments in its GenAI
view otherwise), expands the study's parent run, adds the rougeL column, and checks that
the page shows the parent run, trial-0 and trial-1 under it, and each trial's ROUGE-L as
MLflow stored it. The screenshot is saved in the test's folder, and copied to
$FINQA_UI_SCREENSHOT when that is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import FAST
from tests.servers import tracking_server

REPO = Path(__file__).resolve().parents[2]
STUDY = "finqa_tiny_finqa_sample"
EXPERIMENT = "finqa-ui"

pytestmark = pytest.mark.slow

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = (
    "chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver)"
)


def sweep_into(server_url: str, root: Path, cache_dir: Path) -> None:
    args = [
        *[o for o in FAST if not o.startswith("train.learning_rate=")],  # searched below
        "hydra.sweeper.params={train.learning_rate: 'tag(log, interval(1e-4, 3e-3))',"
        " lora.r: 'choice(4, 16)'}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.confirm.top_k=0",
        # Both trials complete, so both show a ROUGE-L (the default pruner could stop one).
        "hydra/sweeper/pruner=none",
        f"hydra.sweep.dir={root / 'multirun'}",
        f"paths.root_dir={root}",
        f"paths.cache_dir={cache_dir}",
        f"tracking.uri={server_url}",
        f"tracking.experiment_name={EXPERIMENT}",
        "tracking.artifact_location=null",  # artifacts go through the server
    ]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "finqa_exp", "-m", *args],
        cwd=root,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def chromium(window: str = "1800,900"):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root
    options.add_argument(f"--window-size={window}")
    # Both paths given: Selenium Manager has nothing to look up, so it downloads nothing.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_BROWSER)
def test_the_runs_table_shows_the_study_its_trials_and_their_rouge(
    tmp_path, cache_dir, monkeypatch
):
    pytest.importorskip("selenium", reason="selenium not installed: pip install -e '.[dev]'")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # and Selenium Manager may not go online
    shot = tmp_path / "mlflow-ui.png"
    with tracking_server(tmp_path / "mlflow") as server:
        start = time.perf_counter()
        sweep_into(server.url, tmp_path, cache_dir)
        swept = time.perf_counter() - start
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        assert sorted(runs) == sorted(["trial-0", "trial-1", STUDY])
        parent = runs[STUDY].info.run_id

        driver = chromium()
        try:
            wait = WebDriverWait(driver, 60)

            def row(run_id: str) -> str:
                return f"[role='row'][row-id='{run_id}']"

            def cell(run_id: str, column: str) -> str:
                return driver.find_element(
                    By.CSS_SELECTOR, f"{row(run_id)} [col-id='{column}']"
                ).text

            # The runs table, as the "Model training" switch shows it.
            table = f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
            driver.get(server.url + table)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row(parent)))
            # Trials are nested under the study's run: expand it.
            driver.find_element(
                By.CSS_SELECTOR, f"{row(parent)} [col-id='attributes.`Run Name`'] button"
            ).click()
            for name in ("trial-0", "trial-1"):
                run_id = runs[name].info.run_id
                wait.until(lambda d, r=run_id: d.find_elements(By.CSS_SELECTOR, row(r)))
            # Metric columns are hidden by default: add rougeL from the column picker.
            driver.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
            search = wait.until(
                lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']")
            )
            search.send_keys("rougeL")
            wait.until(
                lambda d: d.find_element(
                    By.XPATH, "//*[contains(@class, 'tree-title')][normalize-space(.)='rougeL']"
                )
            ).click()
            search.send_keys(Keys.ESCAPE)
            for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
                if button.is_displayed():
                    button.click()  # the assistant panel, which would hide the new column
            trial_0 = runs["trial-0"].info.run_id
            wait.until(lambda d: cell(trial_0, "metrics.`rougeL`") not in ("", "-"))
            time.sleep(1)  # let the grid finish drawing before the picture
            driver.save_screenshot(str(shot))

            assert STUDY in cell(parent, "attributes.`Run Name`")
            for name in ("trial-0", "trial-1"):
                run = runs[name]
                assert name in cell(run.info.run_id, "attributes.`Run Name`")
                shown = float(cell(run.info.run_id, "metrics.`rougeL`"))
                assert shown == pytest.approx(run.data.metrics["rougeL"])
                print(f"{name}: rougeL {shown} in the UI")
        finally:
            if not shot.exists():
                driver.save_screenshot(str(shot))  # what the page showed when it failed
            driver.quit()
            if os.environ.get("FINQA_UI_SCREENSHOT"):
                target = Path(os.environ["FINQA_UI_SCREENSHOT"])
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, target)
    print(f"sweep of 2 trials into the server: {swept:.0f} s; screenshot {shot}")
