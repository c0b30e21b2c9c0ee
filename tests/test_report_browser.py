"""eval/report.html in a real browser: headless Chromium loads the tiny run's report, every image
decodes (naturalWidth > 0) and the stage table is there.

The set-up finds Debian's `chromium`, installs it with apt-get when it is missing and this is root
on a machine with apt, and skips with the reason when it cannot."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from rlhf.config import load_config
from rlhf.report import PLOTS, write_report
from tests.conftest import write_config

# Runs in the page once everything has loaded; the verdict goes into the DOM that --dump-dom prints.
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                                 width: i.naturalWidth, height: i.naturalHeight}));
  const tables = [...document.querySelectorAll('h2')].filter(h => h.textContent.trim() === 'Stages')
    .map(h => h.nextElementSibling).filter(t => t && t.tagName === 'TABLE')
    .map(t => [...t.querySelectorAll('tbody tr')].map(r => [...r.cells].map(c => c.textContent.trim())));
  const out = document.createElement('pre');
  out.id = 'browser-check';
  out.textContent = JSON.stringify({images, stage_tables: tables});
  document.body.appendChild(out);
});
</script>"""


def _install_chromium() -> str | None:
    """Why Chromium cannot be had (None once it is installed)."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install it (apt-get install chromium)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"`{' '.join(cmd)}` failed: {tail[0]}"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        why = _install_chromium()
        found = shutil.which("chromium")
        if found is None:
            pytest.skip(f"headless Chromium is not available: {why or 'apt-get installed no chromium binary'}")
    return found


def test_report_renders_in_headless_chromium(chromium, tiny_eval_run, tmp_path):
    src = load_config(tiny_eval_run)
    cfg = load_config(write_config(tmp_path, {"eval": {"max_prompts": 8, "overopt_prompts": 4, "batch_size": 4}}))
    for name in ("sft", "rm", "ppo", "eval"):
        shutil.copytree(src.run_dir / name, cfg.run_dir / name, ignore=shutil.ignore_patterns("model", "adapter", "checkpoints"))
    report = write_report(cfg, echo=lambda line: None)
    # The page as written, plus the check script, beside it so that its relative image paths resolve.
    page = report.with_name("report-browser-check.html")
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="browser-check">(.*?)</pre>', done.stdout, re.S)
    assert m, f"Chromium printed no check result (exit {done.returncode}): {done.stderr[-2000:]}"
    import html

    result = json.loads(html.unescape(m.group(1)))
    images = result["images"]
    expected = {name for name in PLOTS} | {"rm_calibration.png", "overoptimisation.png"}
    assert expected <= {i["src"] for i in images}, images
    broken = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert len(result["stage_tables"]) == 1, result["stage_tables"]
    rows = result["stage_tables"][0]
    assert [r[:2] for r in rows] == [["sft", "done"], ["rm", "done"], ["ppo", "done"]]
