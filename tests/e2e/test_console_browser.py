"""The console in a real browser: Debian's Chromium driven by selenium, with JavaScript on,
against a real `cpm` and two real hubs over HTTPS.

Screenshots of every page it visits are saved under ``build/console-screenshots/`` for a
person to look at (CI keeps the build directory of the clone it ran in).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console_helpers import WAIT, console_space, package_bytes
from tests.helpers import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = ROOT / "build" / "console-screenshots"

#: Unhealthy after 2 missed one-second heartbeats; the silent link closed after 1 + 9 s,
#: so the page has several seconds to show "unhealthy" before "disconnected".
HEALTH = ("--missed-heartbeats", "2", "--pong-timeout", "9")

COUNTER_PY = """
import asyncio

async def run(context, input, prefix="tick", *args):
    n = 0
    while True:
        yield f"{prefix} {n}\\n"
        n += 1
        await asyncio.sleep(0.2)
"""

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI needs chromium and chromium-driver (.ci/run installs them)")
    pytest.skip("chromium and chromium-driver are not installed", allow_module_level=True)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in CI: Chromium's sandbox refuses to run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        # The test manager's certificate comes from its own CA; this browser goes nowhere else.
        "--ignore-certificate-errors",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: WebDriver, check: Callable[[WebDriver], Any], what: str, seconds: float = WAIT) -> Any:
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(check, f"timed out waiting for {what}")


def shoot(driver: WebDriver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def state_of(driver: WebDriver, hub_id: str) -> str:
    cells = driver.find_elements(By.CSS_SELECTOR, f'tr[id="hub-{hub_id}"] td:nth-child(2)')
    return cells[0].text.strip() if cells else ""


def count(driver: WebDriver, name: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'[data-count="{name}"]').text.strip()


def test_console_in_a_browser(tmp_path: Path, browser: WebDriver) -> None:
    package = tmp_path / "counter.tar.gz"
    package.write_bytes(package_bytes(COUNTER_PY, name="counter-py"))
    deb = tmp_path / "spacehub_9.9.9_all.deb"  # the manager hands it out; nothing installs it here
    deb.write_bytes(os.urandom(1000))
    with console_space(tmp_path, 2, *HEALTH, "--package", str(deb)) as space:
        base = space.manager.base
        first, second = space.hub_ids

        # Signing in: the form, then the fleet with both hubs healthy.
        browser.get(f"{base}/")
        wait_until(browser, lambda d: d.find_elements(By.ID, "token"), "the sign-in form")
        shoot(browser, "01-sign-in")
        browser.find_element(By.ID, "token").send_keys("shk_wrong")
        browser.find_element(By.ID, "sign-in").click()
        wait_until(browser, lambda d: d.find_elements(By.ID, "login-message"), "the refusal")
        shoot(browser, "02-sign-in-refused")
        browser.find_element(By.ID, "token").send_keys(space.token)
        browser.find_element(By.ID, "sign-in").click()
        wait_until(browser, lambda d: d.current_url.endswith("/console/fleet"), "the fleet page")
        wait_until(browser, lambda d: d.find_element(By.ID, "live").is_displayed(), "live updates")
        assert state_of(browser, first) == "healthy" and state_of(browser, second) == "healthy"
        assert count(browser, "healthy") == "2"
        assert space.token not in browser.page_source
        shoot(browser, "03-fleet")
        browser.set_window_size(390, 844)  # a phone
        shoot(browser, "04-fleet-phone")
        browser.set_window_size(1280, 900)

        # The hub page: upload the package from a file input, start it, watch its output.
        browser.find_element(By.LINK_TEXT, first).click()
        wait_until(browser, lambda d: d.find_elements(By.ID, "load-chart"), "the load chart")
        wait_until(browser, lambda d: d.find_element(By.ID, "hub-log").text, "the hub's log")
        browser.find_element(By.ID, "package").send_keys(str(package))
        browser.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
        row = wait_until(
            browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-sequence]"), "the uploaded sequence"
        )[0]
        assert "counter-py" in row.text
        shoot(browser, "05-hub")
        row.find_element(By.NAME, "args").send_keys('["count"]')
        row.find_element(By.CSS_SELECTOR, "button.start-button").click()
        wait_until(browser, lambda d: "/instances/" in d.current_url, "the instance page")
        instance_url = browser.current_url
        assert browser.find_element(By.ID, "instance-status").text == "running"

        def output(d: WebDriver) -> str:
            return str(d.find_element(By.ID, "tail-output").text)

        wait_until(browser, lambda d: "count 3" in output(d), "live output")
        seen = output(browser)
        wait_until(browser, lambda d: len(output(d)) > len(seen), "more output, with no reload")
        shoot(browser, "06-instance")

        # Pause holds the text still; clear empties it; resume goes on.
        box = browser.find_element(By.CSS_SELECTOR, '[data-tail$="/tail/output"]')
        box.find_element(By.CSS_SELECTOR, "[data-pause]").click()
        held = output(browser)
        time.sleep(0.6)
        assert output(browser) == held
        box.find_element(By.CSS_SELECTOR, "[data-clear]").click()
        assert output(browser) == ""
        box.find_element(By.CSS_SELECTOR, "[data-pause]").click()
        wait_until(browser, lambda d: "count" in output(d), "output after resume")

        browser.find_element(By.ID, "stop").click()
        wait_until(browser, lambda d: d.current_url == instance_url, "back on the instance page")

        def stopped(d: WebDriver) -> bool:
            d.refresh()
            return d.find_element(By.ID, "instance-status").text != "running"

        wait_until(browser, stopped, "the instance to stop")
        shoot(browser, "07-instance-stopped")

        # Topics and joining.
        browser.find_element(By.LINK_TEXT, "Topics").click()
        wait_until(browser, lambda d: "Topics of demo" in d.page_source, "the topics page")
        shoot(browser, "08-topics")
        browser.find_element(By.PARTIAL_LINK_TEXT, "joining").click()
        wait_until(browser, lambda d: d.find_elements(By.NAME, "description"), "the join page")
        browser.find_element(By.NAME, "description").send_keys("press 4")
        browser.find_element(By.NAME, "tags").send_keys("line4")
        browser.find_element(By.ID, "make-join-token").click()
        wait_until(browser, lambda d: d.find_elements(By.ID, "join-command"), "the join line")
        assert "install.sh" in browser.find_element(By.ID, "join-command").text
        assert browser.find_element(By.ID, "join-cloud-init").text.startswith("#cloud-config")
        copy = browser.find_element(By.CSS_SELECTOR, '[data-copy="join-command"]')
        copy.click()
        wait_until(browser, lambda d: copy.text == "Copied", "the copy button to answer")
        shoot(browser, "09-join")

        # A hub's process freezes, as a hung machine does: heartbeats stop, the link stays up
        # (unhealthy); its link is closed for silence (disconnected); then it is killed.
        browser.find_element(By.LINK_TEXT, "Fleet").click()
        wait_until(browser, lambda d: d.find_element(By.ID, "live").is_displayed(), "live updates")
        frozen = space.hubs[1].process
        frozen.send_signal(signal.SIGSTOP)
        try:

            def unhealthy(d: WebDriver) -> list[str]:
                return [hub for hub in (first, second) if state_of(d, hub) == "unhealthy"]

            (gone,) = wait_until(browser, unhealthy, "a hub to turn unhealthy")
            (kept,) = {first, second} - {gone}
            assert count(browser, "unhealthy") == "1" and state_of(browser, kept) == "healthy"
            shoot(browser, "10-fleet-unhealthy")
            wait_until(browser, lambda d: state_of(d, gone) == "disconnected", "the hub to disconnect")
            assert count(browser, "disconnected") == "1" and state_of(browser, kept) == "healthy"
            shoot(browser, "11-fleet-disconnected")
        finally:
            frozen.send_signal(signal.SIGKILL)
            frozen.send_signal(signal.SIGCONT)

        # Signing out: the console refuses until signed in again.
        browser.find_element(By.ID, "sign-out").click()
        wait_until(browser, lambda d: "/console/login" in d.current_url, "the sign-in page")
        browser.get(f"{base}/console/fleet")
        wait_until(browser, lambda d: "/console/login" in d.current_url, "a refusal")
        assert not browser.find_elements(By.ID, "fleet")
        browser.get(f"{base}/console/hubs/{first}")
        assert "/console/login" in browser.current_url
        shoot(browser, "12-signed-out")
