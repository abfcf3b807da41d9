"""A finished 2-seed sweep as a researcher sees it in `mlflow ui`, in a real (headless) Chromium from Debian's packages
driven by Selenium: the collapsed sweep charts the comparison, its runs have distinct names, "Group by" offers arm.
Only localhost is reached. The last screen is kept as a test artifact (AVRL_TEST_ARTIFACTS, default
outputs/test-artifacts/mlflow_ui_sweep.png)."""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import ROOT, mlflow_runs, run_cli, services

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1200",
)
WAIT = 120  # seconds: a hang guard for each thing the page must show, far above a render on a busy machine


@contextlib.contextmanager
def mlflow_ui(store_uri: str, log: Path):
    """`mlflow ui` on 127.0.0.1 over the store, as the sweep's last lines say to start it; yields its address."""
    port = services.free_port()
    with open(log, "w") as console:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "ui",
                "--backend-store-uri",
                store_uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=console,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        import urllib.request

        assert server.poll() is None, log.read_text()[-3000:]
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=5).status == 200
        except OSError:
            return False

    try:
        services.wait_for(up, "mlflow ui", log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


@contextlib.contextmanager
def chromium():
    """Debian's Chromium, headless, with a fresh profile, driven through Debian's chromedriver."""
    services.require("chromium", ["chromium", "chromedriver"])
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = services._which("chromium")
    with tempfile.TemporaryDirectory(prefix="avrl-chromium-") as profile:
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(services._which("chromedriver")))
        try:
            yield driver
        finally:
            driver.quit()


def seen(driver, xpath: str, count: int = 1) -> list:
    """The elements at `xpath` once at least `count` of them are on the page (the UI renders as data arrives)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(
        lambda d: found if len(found := d.find_elements(By.XPATH, xpath)) >= count else False,
        message=f"not shown: {xpath}",
    )


def view(driver, mode: str) -> None:
    """The runs page's table or chart view (the toggle left of the search box)."""
    seen(driver, f"//input[@name='runs-view-mode' and @value='{mode}']/ancestor::label")[0].click()


def search_charts(driver, text: str) -> None:
    """Narrow the chart view to the charts whose titles hold `text` (the page draws only the charts in view)."""
    from selenium.webdriver.common.keys import Keys

    box = seen(driver, "//input[@placeholder='Search metric charts']")[0]
    box.send_keys(Keys.CONTROL + "a")  # (a modifier stays down to the end of a send_keys call)
    box.send_keys(Keys.BACKSPACE)  # typed, as React needs: clear() is not seen
    box.send_keys(text)


def chart_value(driver, title: str) -> float:
    """The number the bar chart titled `title` shows."""
    card = f"//div[@data-testid='experiment-view-compare-runs-card'][.//h4[@title='{title}']]"
    return float(seen(driver, card + "//*[contains(@class, 'bartext')]")[0].get_attribute("data-unformatted"))


@pytest.mark.services
@pytest.mark.slow
def test_a_researcher_compares_a_two_seed_sweep_in_the_mlflow_ui(tmp_path):
    with chromium() as driver:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        run_cli(
            "-m",
            "sweep=rl_vs_sft",
            "algorithm=grpo,sft",
            "seeds=2",
            "data.ood_size=4",  # the toy world's 384-item splits, cut for a test
            "+eval.data.synthetic_prior.test_size=4",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "data.val_size=4",
            "data.batch_size=2",
            "algorithm.max_completion_length=10",
            "trainer.enable_progress_bar=false",
            "save_final_model=false",
            f"hydra.sweep.dir={tmp_path}/sweep",
            tmp_path=tmp_path,
        )
        _, runs = mlflow_runs(tmp_path)
        (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
        arms = json.loads((tmp_path / "sweep/report.json").read_text())["arms"]
        assert sorted(arms) == ["grpo", "sft"]

        with mlflow_ui(f"sqlite:///{tmp_path}/mlruns.db", tmp_path / "mlflow-ui.log") as url:
            driver.get(f"{url}/#/experiments/{parent.info.experiment_id}/runs")

            # Collapsed, the sweep is one row, and its chart view already compares the arms: the report's means.
            (row,) = seen(driver, "//div[@col-id='attributes.`Run Name`']//a[contains(@href, '/runs/')]")
            assert row.text == parent.info.run_name == "sweep rl_vs_sft · algorithm=grpo,sft · seeds=2"
            view(driver, "CHART")
            for arm, stats in arms.items():
                search_charts(driver, f"sweep/val/accuracy/{arm} mean")
                shown = chart_value(driver, f"sweep/val/accuracy/{arm} mean")
                assert shown == pytest.approx(stats["val/accuracy"]["mean"], abs=0.005)

            # Expanded, its four runs: one name per arm and seed.
            view(driver, "TABLE")
            seen(driver, "//div[@col-id='attributes.`Run Name`']//button")[0].click()  # the row's expander
            names = [
                a.text
                for a in seen(driver, "//div[@col-id='attributes.`Run Name`']//a[contains(@href, '/runs/')]", count=5)
            ]
            assert sorted(names[1:]) == [
                "grpo · no_think · seed 42",
                "grpo · no_think · seed 43",
                "sft · no_think · seed 42",
                "sft · no_think · seed 43",
            ]

            # "Group by" offers the arm (and the seed, the method); grouped, each arm is one group of two runs.
            seen(driver, "//button[contains(., 'Group by')]")[0].click()
            options = {e.text for e in seen(driver, "//div[@role='menuitemcheckbox']")}
            assert {"arm", "seed", "method", "prompt", "model"} <= options
            seen(driver, "//div[@role='menuitemcheckbox' and normalize-space()='arm']")[0].click()
            ActionChains(driver).send_keys(Keys.ESCAPE).perform()  # the menu stays open for more choices
            groups = seen(driver, "//*[starts-with(normalize-space(), 'Group: ')][not(*)]", count=2)
            assert sorted(g.text for g in groups) == ["Group: grpo · no_think", "Group: sft · no_think"]

            view(driver, "CHART")
            search_charts(driver, "sweep/val/accuracy/")  # the section that compares the arms' final accuracy
            assert all(chart_value(driver, f"sweep/val/accuracy/{arm} mean") >= 0 for arm in arms)
            for close in driver.find_elements("css selector", "button[aria-label=Close]"):
                close.click()  # the assistant's side panel, which narrows the page
            shot = Path(os.environ.get("AVRL_TEST_ARTIFACTS", ROOT / "outputs/test-artifacts")) / "mlflow_ui_sweep.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(shot))
