"""Headless Debian Chromium for the browser tests and the dashboard benchmark.

Chromium here must run headless, without the sandbox and the GPU, and without its background
network traffic (component updates, sync, first-run fetches), or it stalls on a closed network.
``make browser-deps`` installs ``chromium`` and ``chromium-driver`` through apt when missing.
"""

from __future__ import annotations

import os
import shutil

from selenium.webdriver.chrome.options import Options

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1440,1000",
)


def chromium_binary() -> str:
    """The Chromium executable: DASH_TEST_CHROMEPATH, else ``chromium`` on PATH; chromedriver must be on PATH."""
    path = os.environ.get("DASH_TEST_CHROMEPATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("chromium not found: run `make browser-deps` (apt install chromium chromium-driver)")
    if not shutil.which("chromedriver"):
        raise RuntimeError("chromedriver not found: run `make browser-deps` (apt install chromium-driver)")
    return path


def chromium_options() -> Options:
    """WebDriver options of headless Debian Chromium on a machine with a closed network."""
    options = Options()
    options.binary_location = chromium_binary()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return options
