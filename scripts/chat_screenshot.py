#!/usr/bin/env python
"""A screenshot of the chat page (`eval_model.py --serve`) holding a real conversation, taken in headless Chromium.

    python scripts/chat_screenshot.py --model_path out/sft/final --out docs/chat_page.png

Starts the server on a free local port, opens the page in Debian's headless Chromium (apt-get install chromium
chromium-driver) through selenium, sends --message (each one a turn, answered to the end), and saves the
window. tests/test_serve.py drives the page with the same browser.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# This machine's network may be closed: nothing Chromium would fetch or update on its own.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


def chromium(profile_dir: str | Path, width: int = 1200, height: int = 800):
    """A selenium driver of headless Chromium with a fresh profile in `profile_dir`. The paths of Debian's chromium
    and chromedriver are given, so selenium never tries to download a browser."""
    from selenium import webdriver

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        raise FileNotFoundError("chromium and chromedriver are not installed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def wait_for(check, timeout: float, what: str):
    """check()'s first truthy value within `timeout` seconds (tests/test_serve.py waits with it too)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := check():
            return value
        time.sleep(0.01)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="the model folder to serve")
    p.add_argument("--out", default="docs/chat_page.png", help="the PNG to write (default: %(default)s)")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt typed into the page")
    p.add_argument("--message", action="append", default=None,
                   help='a user message (repeat for several turns; default: "What is 12 + 7?", "And if you add 3 more?")')
    p.add_argument("--temperature", default="0", help="typed into the page's temperature field (default: %(default)s)")
    p.add_argument("--port", type=int, default=8765, help="local port of the server (default: %(default)s)")
    args = p.parse_args()
    messages = args.message or ["What is 12 + 7?", "And if you add 3 more?"]

    from selenium.webdriver.common.by import By

    log = Path(tempfile.mkdtemp()) / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(ROOT / "eval_model.py"), "--model_path", args.model_path,
                                   "--serve", "--port", str(args.port), "--max_new_tokens", "64"],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: server.poll() is not None or "[serving" in log.read_text(), 120, "the server")
        if server.poll() is not None:
            raise SystemExit(f"error: the server did not start:\n{log.read_text()}")
        with tempfile.TemporaryDirectory() as profile:
            driver = chromium(profile, 1100, 720)
            try:
                driver.get(f"http://127.0.0.1:{args.port}/")
                driver.find_element(By.ID, "system").send_keys(args.system)
                temperature = driver.find_element(By.ID, "temperature")
                temperature.clear()
                temperature.send_keys(args.temperature)
                for i, message in enumerate(messages, start=1):
                    driver.find_element(By.ID, "input").send_keys(message + "\n")
                    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == i and
                             driver.execute_script("return document.body.dataset.state") == "idle", 120, "an answer")
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(args.out)
            finally:
                driver.quit()
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
