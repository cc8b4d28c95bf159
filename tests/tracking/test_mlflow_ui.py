"""A sweep's runs and champion in the MLflow UI, in a real browser (headless Chromium through
Selenium), and the champion served by ``mlflow models serve``.

    pytest tests/tracking/test_mlflow_ui.py -s   # needs Debian chromium and chromium-driver
    FINQA_UI_SCREENSHOT=/abs/ui.png pytest tests/tracking/test_mlflow_ui.py  # keep the pictures

Runs a 2-trial sweep (``python -m finqa_exp -m``) into an ``mlflow server`` on 127.0.0.1
(tests/servers.py), with its own copy of the model cache. Then:

- the runs table ("Model training" view; MLflow 3 opens experiments in its GenAI view
  otherwise): the study's parent run, trial-0 and trial-1 under it, and each trial's
  ROUGE-L as MLflow stored it;
- the champion: a logged model of its trial's run, listed with the experiment's models, its
  page showing the run's metrics and the registered version;
- with the sweep's model cache deleted, ``mlflow models serve -m models:/<study>@champion``
  answers a POSTed question exactly as ``python -m finqa_exp.ask`` and
  ``mlflow.pyfunc.load_model`` do.

Screenshots are saved in each test's folder, and beside $FINQA_UI_SCREENSHOT when it is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.conftest import FAST
from tests.servers import MlflowServer, model_server, tracking_server

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


@dataclass(frozen=True)
class Swept:
    server: MlflowServer
    root: Path
    cache: Path  # the sweep's own model cache (the serving test deletes it)
    seconds: float


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cache_dir) -> Iterator[Swept]:
    """A 2-trial sweep into an ``mlflow server`` on 127.0.0.1, with its own copy of the
    session's model cache."""
    root = tmp_path_factory.mktemp("ui")
    cache = root / "cache"
    shutil.copytree(cache_dir, cache)
    with tracking_server(root / "mlflow") as server:
        start = time.perf_counter()
        sweep_into(server.url, root, cache)
        yield Swept(server, root, cache, time.perf_counter() - start)


@contextmanager
def browser(shot: Path) -> Iterator[Any]:
    """Headless Chromium; saves a screenshot to ``shot`` on the way out if the test did not
    (what the page showed when it failed), copied to $FINQA_UI_SCREENSHOT's folder."""
    pytest.importorskip("selenium", reason="selenium not installed: pip install -e '.[dev]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # and Selenium Manager may not go online
    driver = chromium()
    try:
        yield driver
    finally:
        if not shot.exists():
            driver.save_screenshot(str(shot))
        driver.quit()
        if os.environ.get("FINQA_UI_SCREENSHOT"):
            target = Path(os.environ["FINQA_UI_SCREENSHOT"])
            target.parent.mkdir(parents=True, exist_ok=True)
            main = shot.name == "mlflow-ui.png"  # the others go beside it, by their names
            shutil.copyfile(shot, target if main else target.with_name(shot.name))


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_BROWSER)
def test_the_runs_table_shows_the_study_its_trials_and_their_rouge(swept, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    shot = tmp_path / "mlflow-ui.png"
    server = swept.server
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(["trial-0", "trial-1", STUDY])
    parent = runs[STUDY].info.run_id

    with browser(shot) as driver:
        wait = WebDriverWait(driver, 60)

        def row(run_id: str) -> str:
            return f"[role='row'][row-id='{run_id}']"

        def cell(run_id: str, column: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, f"{row(run_id)} [col-id='{column}']").text

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
    print(f"sweep of 2 trials into the server: {swept.seconds:.0f} s; screenshot {shot}")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_BROWSER)
def test_the_champion_is_a_logged_model_in_the_ui(swept, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = swept.server
    client = MlflowClient(server.url, registry_uri=server.url)
    version = client.get_model_version_by_alias(STUDY, "champion")
    model_id = version.source.removeprefix("models:/")
    model = client.get_logged_model(model_id)
    assert model.source_run_id == version.run_id
    trial_name = client.get_run(version.run_id).info.run_name
    assert model.name == trial_name
    assert model.params["lora.r"] == client.get_run(version.run_id).data.params["lora.r"]

    shot = tmp_path / "mlflow-ui-model.png"
    with browser(shot) as driver:
        wait = WebDriverWait(driver, 60)
        # The experiment's logged models, as the UI lists them.
        driver.get(f"{server.url}/#/experiments/{model.experiment_id}/models")
        wait.until(lambda d: d.find_elements(By.XPATH, f"//*[normalize-space(.)='{trial_name}']"))
        time.sleep(1)
        driver.save_screenshot(str(shot))
        # Its page: its run's metrics, and the registry version that it is.
        driver.get(f"{server.url}/#/experiments/{model.experiment_id}/models/{model_id}")
        for text in (STUDY, "rougeL", f"v{version.version}"):
            wait.until(
                lambda d, t=text: d.find_elements(By.XPATH, f"//*[normalize-space(.)='{t}']")
            )
        time.sleep(1)
        driver.save_screenshot(str(tmp_path / "mlflow-ui-model-page.png"))
    print(f"logged model {model_id} ({trial_name}) shown; screenshot {shot}")


def test_the_champion_serves_the_answers_ask_gives(swept, tmp_path, monkeypatch):
    """`mlflow models serve`, `mlflow.pyfunc.load_model` and `ask` give one greedy answer,
    with the sweep's model cache deleted: the tiny base is inside the model."""
    import mlflow
    import requests

    shutil.rmtree(swept.cache)
    question = "What is a Roth IRA?"
    server = swept.server
    champion = f"models:/{STUDY}@champion"
    with model_server(champion, server.url, tmp_path / "serve") as url:
        reply = requests.post(f"{url}/invocations", json={"inputs": [question]}, timeout=120)
    assert reply.status_code == 200, reply.text
    served = reply.json()["predictions"][0]

    proc = subprocess.run(
        [sys.executable, "-m", "finqa_exp.ask", question, f"tracking.uri={server.url}",
         f"paths.root_dir={swept.root}", f"paths.cache_dir={swept.cache}"],
        cwd=swept.root, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    asked = proc.stdout.split("A: ", 1)[1].strip()
    assert "4-bit NF4, as trained" in proc.stderr

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    loaded = mlflow.pyfunc.load_model(champion).predict([question])[0]
    assert served and served == asked == loaded
    assert not swept.cache.exists()  # nothing rebuilt the base
    print(f"served, asked and loaded: {served!r}")
