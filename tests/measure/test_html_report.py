"""The HTML report: one offline page with the tables and plots, which a browser draws."""

import re
import shutil
import subprocess

import keras
import numpy as np
import pytest

import kshrink
from kshrink.report import html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(trained, digits, tmp_path_factory):
    x, y = digits.train
    recipe = [kshrink.Prune(sparsity=0.8, schedule="one_shot"), kshrink.Cluster(clusters=16),
              kshrink.Quantize(mode="int8")]
    small, report = kshrink.compress(trained, recipe, data=(x, y), verbose=False)
    comparison = kshrink.measure.compare(trained, small, digits.test, load_runs=1,
                                         latency_runs=3)
    path = tmp_path_factory.mktemp("report") / "report.html"
    html(path, small, trained, comparison=comparison, report=report,
         front=("file bytes", [(9e4, 0.95, False), (2e4, 0.94, True)]))
    return path


def test_the_page_holds_every_table_and_plot_and_loads_nothing(page):
    text = page.read_text()
    assert text.count("<svg") == 5  # bytes by layer, by storage type, per layer, latency, front
    for heading in ("Measured", "What was done", "Where the bytes are", "Layer by layer",
                    "Latency", "Candidates"):
        assert f"<h2>{heading}</h2>" in text
    rows = re.findall(r"<tr><td>(conv1|conv2|fc1|fc2)</td>", text)
    assert {"conv1", "conv2", "fc1", "fc2"} <= set(rows)
    assert "81.8%" in text  # conv2's sparsity, as the layer table gives it
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing fetched


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="one browser run is enough")
def test_a_headless_browser_draws_the_page(page, tmp_path):
    assert CHROMIUM, "chromium is missing: scripts/test.sh installs it"
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1200,3000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    ink = np.mean(pixels.mean(axis=-1) < 0.9)  # not white: text, bars, axes
    colour = np.mean(pixels.max(axis=-1) - pixels.min(axis=-1) > 0.2)  # the plots' colours
    assert ink > 0.02 and colour > 0.005, (ink, colour)
