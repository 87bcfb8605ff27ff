"""
Headless Chromium through Playwright, for explore.py's --screenshot and the browser tests. It uses the
system's Chromium (Debian: `apt-get install chromium`; or set CHROMIUM=/path/to/chrome) and never
`playwright install`, which downloads a browser build and fails on machines without internet.
"""

import contextlib
import os
import shutil

from common import UserError

# No background traffic (component updates, sync, safe browsing...): the page is all it loads.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions"]


def chromium_path() -> str | None:
    candidates = [os.environ.get("CHROMIUM", "")] + [shutil.which(n) or "" for n in ("chromium", "chromium-browser",
                                                                                  "google-chrome")]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def missing() -> str | None:
    """Why a browser cannot start here (one line), or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install playwright (no `playwright install` needed)"
    if chromium_path() is None:
        return "no Chromium found: apt-get install chromium (Debian/Ubuntu), or set CHROMIUM=/path/to/chromium"
    return None


@contextlib.contextmanager
def launch_chromium():
    """A Playwright Browser on the system Chromium, closed afterwards."""
    reason = missing()
    if reason:
        raise UserError(reason)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()
