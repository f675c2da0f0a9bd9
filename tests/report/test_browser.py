"""The report in a real browser: headless Chromium renders it offline, every embedded image
decodes (read back from the report's own `data-images-loaded` attribute), and the
screenshot is not blank. The screenshot is kept as a CI artifact for a human to look at.

Skipped only on a developer machine without Chromium; under CI (env CI set) a missing
Chromium is a failure, so the check cannot silently disappear.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from promptshift.report import FIGURE_IDS

REPO = Path(__file__).resolve().parents[2]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_chromium() -> str:
    path = _chromium()
    if path is None:
        if _in_ci():
            pytest.fail("CI is set but chromium is not installed: the report's browser test must run in CI "
                        "(`apt-get install -y chromium`, as .ci/run does)")
        pytest.skip("chromium not installed (apt-get install -y chromium); the browser test is required in CI")
    return path


@pytest.fixture(scope="module")
def chromium():
    return _require_chromium()


def test_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_chromium", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set but chromium is not installed"):
        _require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="chromium not installed"):
        _require_chromium()


def _run(chromium: str, profile: Path, *args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    # flags keep the browser offline and quiet: no network services, no first-run UI, a
    # throwaway profile, no sandbox (containers run as root)
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_chromium(chromium, built_report, tmp_path):
    url = built_report.resolve().as_uri()

    dom = _run(chromium, tmp_path / "profile-dom", "--run-all-compositor-stages-before-draw",
               "--virtual-time-budget=5000", "--dump-dom", url)
    m = re.search(r'<body[^>]*data-images-loaded="([^"]*)"', dom.stdout)
    assert m, f"no data-images-loaded on <body> (rc={dom.returncode}): {dom.stderr[-2000:]}"
    n = len(FIGURE_IDS)
    assert m.group(1) == f"{n}/{n}", f"images loaded: {m.group(1)}, expected {n}/{n}"

    shot = tmp_path / "report_screenshot.png"
    # tall enough to reach past the findings and the behaviour section's table into the figures
    r = _run(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,8000", url)
    assert shot.is_file(), f"no screenshot (rc={r.returncode}): {r.stderr[-2000:]}"
    img = mpimg.imread(shot)
    assert img.shape[:2] == (8000, 1400)
    rgb = img[..., :3]
    assert rgb.std() > 0.05, "screenshot is (nearly) uniform: the page did not render"
    # the figures are there: a good share of the page is neither background nor text colour
    colourful = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2
    assert colourful.mean() > 0.02, f"only {colourful.mean():.3%} of pixels are coloured"

    dest = Path(os.environ.get("PROMPTSHIFT_ARTIFACTS") or REPO / "ci-artifacts")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, dest / "report_screenshot.png")
    assert np.asarray(mpimg.imread(dest / "report_screenshot.png")).shape == img.shape
