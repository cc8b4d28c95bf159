"""``python -m finqa_exp.app``: the champion and its base answer side by side, in Gradio.

Starts the app on 127.0.0.1 over the toy champion of tests/test_ask.py, asks it through
``gradio_client``, then types a question in headless Chromium and reads both answers off
the page (screenshot saved in the test's folder, and copied to $FINQA_APP_SCREENSHOT).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from finqa_exp import evaluation, modeling
from finqa_exp.config import validate
from tests.servers import background_server, free_port
from tests.test_ask import EXAMPLES, QUESTIONS, args, logged  # noqa: F401 (the champion fixture)
from tests.tracking.test_mlflow_ui import CHROMEDRIVER, CHROMIUM, NO_BROWSER, chromium

REPO = Path(__file__).resolve().parents[1]
gradio_client = pytest.importorskip("gradio_client", reason="pip install -e '.[app]'")


@pytest.fixture(scope="module")
def base_answers(logged):  # noqa: F811
    """What the toy base says without the adapter (4-bit, as the app loads it)."""
    import torch

    root, cfg, *_ = logged
    conf = validate(cfg)
    base = modeling.load_base_model(root / "base", conf.model, conf.quant, torch.device("cpu"))
    tokenizer = modeling.load_tokenizer(root / "base", conf.model)
    template = conf.data.prompt_template
    return evaluation.generate_answers(base, tokenizer, template, QUESTIONS, 12, 8)


@pytest.fixture(scope="module")
def app_url(logged, tmp_path_factory):  # noqa: F811
    root, *_ = logged
    port = free_port()
    cmd = [sys.executable, "-m", "finqa_exp.app", *args(root), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    url = f"http://127.0.0.1:{port}"
    folder = tmp_path_factory.mktemp("app")
    with background_server(cmd, folder, url, "/gradio_api/info", "finqa_exp.app", 180, env) as log:
        yield url
    assert "127.0.0.1" in log.read_text()  # bound to loopback, as by default


def test_the_app_answers_with_both_models_through_gradio_client(logged, app_url, base_answers):  # noqa: F811
    _, _, _, expected, _ = logged
    client = gradio_client.Client(app_url, verbose=False)
    tuned, base = client.predict(QUESTIONS[0], api_name="/ask")
    assert tuned == expected[0]
    assert base == base_answers[0]
    assert tuned != base  # the adapter changes the answer


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_BROWSER)
def test_a_question_typed_in_the_page_shows_both_answers(logged, app_url, base_answers, tmp_path):  # noqa: F811
    pytest.importorskip("selenium", reason="selenium not installed: pip install -e '.[dev]'")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, _, expected, _ = logged
    os.environ.setdefault("SE_OFFLINE", "true")
    shot = tmp_path / "app.png"
    driver = chromium("1400,900")
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(app_url)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea"))
        page = driver.find_element(By.TAG_NAME, "body").text
        assert "toy-champion version 1 (champion)" in page
        assert "rougeL 0.3800 (base 0.2800)" in page
        assert all(q in page for q in EXAMPLES)  # the run's test questions, as examples
        box.send_keys(QUESTIONS[1])
        driver.find_element(By.CSS_SELECTOR, "#ask").click()

        def answer(elem_id: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute(
                "value"
            )

        wait.until(lambda d: answer("tuned") and answer("base"))
        time.sleep(0.5)
        driver.save_screenshot(str(shot))
        assert answer("tuned") == expected[1]
        assert answer("base") == base_answers[1]
    finally:
        if not shot.exists():
            driver.save_screenshot(str(shot))
        driver.quit()
        if os.environ.get("FINQA_APP_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["FINQA_APP_SCREENSHOT"])
    print(f"screenshot {shot}")
