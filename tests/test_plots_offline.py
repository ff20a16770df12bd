"""`dvc plots show` renders with no network through probegen's offline template (real DVC, real Chromium).

A tiny git + DVC project with one stage that writes a decreasing loss curve; its page is loaded in headless
Chromium with every network name unresolvable, and the screenshot must show the curve. The control: DVC's
default page (Vega from a CDN) must come out blank under the same conditions, so the check can fail.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from dvc_render.vega import OPTIONAL_ANCHOR_RANGES
from PIL import Image

from conftest import ROOT, run
from probegen.dvcplots import offline_template
from probegen.errors import ProbegenError

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "Chromium is not installed (apt-get install chromium): the page is checked in a real browser"
LINE_RGB = np.array([int(OPTIONAL_ANCHOR_RANGES["color"][0][i:i + 2], 16) for i in (1, 3, 5)])  # 1st rev
PLOT_REGION = (slice(0, 400), slice(0, 500))   # (rows, cols): DVC puts the first plot at the page's top left
TEMPLATE = ".dvc/tmp/plots_offline.html"

WRITE_CURVE = """\
import math
with open("loss.csv", "w") as f:
    f.write("step,loss\\n")
    for step in range(50):
        f.write(f"{step},{math.exp(-step / 10):.4f}\\n")
"""
DVC_YAML = """\
stages:
  train:
    cmd: python write_curve.py
    deps: [write_curve.py]
    plots:
      - loss.csv:
          cache: false
          x: step
          y: loss
"""


def probegen(cmd, cwd, check=True):
    return run(f"python -m probegen.dvcplots {cmd}", cwd, check=check, env={"PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = tmp_path_factory.mktemp("plots") / "repo"
    repo.mkdir()
    (repo / "write_curve.py").write_text(WRITE_CURVE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    run("git init -q && dvc init -q && dvc repro -q && git add -A && git commit -qm curve", repo)
    probegen("", repo)   # the default output, .dvc/tmp/plots_offline.html
    run(f"dvc plots show --html-template {TEMPLATE} -o offline", repo)
    run("dvc plots show -o default", repo)
    return repo


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):   # .ci/run installs it: a skip there would hide a broken CI step
            pytest.fail(NO_CHROMIUM)
        pytest.skip(NO_CHROMIUM)
    return CHROMIUM


def screenshot(chromium, page, tmp_path):
    """(H, W, 3) uint8 screenshot of `page` in headless Chromium with the network made unreachable."""
    png = tmp_path / f"{page.parent.name}.png"
    profile = tmp_path / f"profile-{page.parent.name}"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           # No name resolves and any connection goes to a closed local port: offline even on a networked host.
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
           "--virtual-time-budget=10000",   # let vegaEmbed's asynchronous rendering finish before the shot
           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1000,800", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB"))


def line_pixels(image):
    """(rows, cols) of pixels in the plot region within 20 of the first revision's line colour."""
    region = image[PLOT_REGION].astype(int)
    return np.nonzero(np.abs(region - LINE_RGB).max(axis=2) <= 20)


def test_offline_page_references_no_remote_script(project):
    html = (project / "offline/index.html").read_text()
    assert re.search(r"""(src|href)\s*=\s*["']?https?:""", html) is None
    assert "vegaEmbed('#loss_csv', spec)" in html and "inlined by probegen.dvcplots" in html
    assert not any(p in html for p in ("{plot_divs}", "{scripts}", "{refresh_tag}"))
    assert 'src="https://cdn.jsdelivr.net' in (project / "default/index.html").read_text()


def test_offline_page_draws_the_curve(chromium, project, tmp_path):
    image = screenshot(chromium, project / "offline/index.html", tmp_path)
    assert (image[PLOT_REGION].min(axis=2) < 245).sum() > 3000   # axes, grid, labels, line
    rows, cols = line_pixels(image)
    assert len(cols) > 300, len(cols)   # a line about 300 px long, 2 px wide
    assert cols.max() - cols.min() > 250 and rows.max() - rows.min() > 250
    # The loss decreases: the line starts high on the left (small row) and ends low on the right.
    left, right = rows[cols < np.percentile(cols, 10)], rows[cols > np.percentile(cols, 90)]
    assert left.mean() + 200 < right.mean()


def test_default_cdn_page_is_blank_offline(chromium, project, tmp_path):
    image = screenshot(chromium, project / "default/index.html", tmp_path)
    assert len(line_pixels(image)[0]) == 0
    assert (image[PLOT_REGION].min(axis=2) < 245).sum() < 50


def test_local_config_makes_plain_plots_show_offline(project, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(project, repo, symlinks=True)
    run("dvc config --local plots.html_template tmp/plots_offline.html", repo)   # relative to .dvc/
    run("dvc plots show -o configured", repo)
    assert (repo / "configured/index.html").read_text() == (project / "offline/index.html").read_text()


def test_unknown_vega_lite_version_is_one_error_line(project):
    proc = probegen("--vega-lite 4.0 out.html", project, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --vega-lite: '4.0'"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (project / "out.html").exists()


def test_default_output_outside_a_dvc_project_is_one_error_line(tmp_path):
    proc = probegen("", tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: .dvc: no DVC project here"), proc.stderr
    assert not (tmp_path / ".dvc").exists()


@pytest.mark.parametrize("bad", ["{plot_divs}", "{scripts}", "</SCRIPT>"])
def test_bundle_that_dvc_would_alter_is_refused(bad):
    with pytest.raises(ProbegenError, match=re.escape(bad.lower()[:8])):
        offline_template(f"var x = '{bad}';", "test bundle")
