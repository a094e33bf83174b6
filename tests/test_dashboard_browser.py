"""The dashboard in a real browser: headless Chromium loads the page during a running batch, and the
rendered DOM (after the page's script has fetched and drawn) shows the batch's row, a chart with
bars, and progress that moves between two loads. The run saves a screenshot as docs/dashboard.png
(the README shows it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dashboard_helpers import get_json, running_batch, start_dashboard, wait_until
from helpers import ROOT

pytestmark = pytest.mark.redis

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / "docs" / "dashboard.png"

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)


def _chromium(profile: Path, url: str, *extra: str) -> str:
    """Chromium headless on ``url``: its script runs (fetches included) within the virtual time budget."""
    assert CHROMIUM, "CI must have chromium (.ci/run installs it)"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--window-size=1300,1000", "--virtual-time-budget=4000",
                           *extra, url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _main(dom: str) -> str:
    """What the page's script rendered (the <main> element; the script's own text left out)."""
    if '<main id="main">' not in dom:
        return dom  # already cut out
    return dom.split('<main id="main">', 1)[1].split("</main>", 1)[0]


def _batch_row(dom: str, batch_id: str) -> dict[str, str]:
    dom = _main(dom)
    found = re.search(r'<tr class="batch-row"([^>]*)>(.*?)</tr>', dom, re.S)
    assert found, "no batch row in the rendered page:\n" + dom[-3000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', found.group(1)))
    assert attrs["data-batch"] == batch_id
    # What the user sees: "ENDED / TOTAL (P %)" and the bar's widths, drawn from the same figures
    text = re.search(r'<span class="progress-text">([\d,]+) / ([\d,]+) \(([\d.]+) %\)</span>', found.group(2))
    assert text, "no progress text in the row:\n" + found.group(2)
    ended, total = (int(x.replace(",", "")) for x in text.group(1, 2))
    assert (ended, total) == (int(attrs["data-ended"]), int(attrs["data-total"])), (text.group(0), attrs)
    widths = [float(w) for w in re.findall(r'<span style="width:\s*([\d.]+)%', found.group(2))]
    assert len(widths) == 2 and widths[0] == pytest.approx(100 * ended / total, abs=0.01), (widths, ended, total)
    attrs["bar_width"] = str(widths[1])  # the done part (the other one counts failures too)
    return attrs


def test_chromium_renders_the_running_batch_and_its_progress_moves(real_redis_url, spawn, tmp_path):
    # An RPM limit (the chart's dashed line), and a few 429s and 500s (red dots, orange retry ticks).
    with running_batch(spawn, real_redis_url, tmp_path, n=500, latency_ms=200, concurrency=4,
                       error_rates={"429": 0.05, "500": 0.05}, submit_args=("--rpm", "900")) as (env, worker):
        port = start_dashboard(spawn, env)
        wait_until("the batch's first requests counted", lambda: (o := get_json(port, "/api/overview"))["budgets"]
                   and o["budgets"][0]["history"] and o["batches"][0]["ended"] > 0)
        url = f"http://127.0.0.1:{port}/"
        first = _main(_chromium(tmp_path / "p1", url, "--dump-dom"))
        row = _batch_row(first, "live")
        assert row["data-state"] == "running" and row["data-total"] == "500"
        assert re.search(r'<svg class="chart"[^>]*data-series="requests"[^>]*>.*?<rect class="bar"[^>]*data-value="[1-9]',
                         first, re.S), "the budget's requests chart has no bar"
        assert '<tr class="worker-row">' in first and "no batch in this Redis" not in first
        wait_until("more jobs ended", lambda: get_json(port, "/api/overview")["batches"][0]["ended"]
                   > int(row["data-ended"]) + 5)
        second = _batch_row(_chromium(tmp_path / "p2", url, "--dump-dom"), "live")
        assert int(second["data-ended"]) > int(row["data-ended"]), (row, second)
        assert float(second["bar_width"]) > float(row["bar_width"]) > 0, (row, second)  # the bar grew

        page = _chromium(tmp_path / "p3", f"http://127.0.0.1:{port}/batch/live", "--dump-dom")
        assert _batch_row(page, "live") and 'id="batch-history"' in page and 'id="jobs"' in page
        SCREENSHOT.parent.mkdir(exist_ok=True)
        _chromium(tmp_path / "p4", url, f"--screenshot={SCREENSHOT}")
        assert SCREENSHOT.stat().st_size > 10_000
        worker.wait(timeout=240)


def test_the_page_sends_its_token_and_shows_server_text_as_text(real_redis_url, spawn, tmp_path):
    """A server's error message and a job's custom_id are text: on the page they are text, never markup."""
    from hostile import HostileServer, Reply, error_body, ok

    from helpers import batchrun_cmd, cli_env, write_jobs

    token = "browser-test-token-0123456789"
    evil = "<img src=x onerror=\"document.title='pwned'\"> broke"
    jobs = write_jobs(tmp_path / "jobs.jsonl", 4, prefix="<i>req")  # custom_ids "<i>req-0" ...
    with HostileServer([ok(), Reply(400, {}, error_body(evil, "invalid_request_error", "bad_thing"))]) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=srv.base_url,
                      BATCHRUN_DASHBOARD_TOKEN=token)
        for args in (("submit", str(jobs), "--batch-id", "evil"), ("worker", "--burst")):
            proc = subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stderr
    port = start_dashboard(spawn, env)
    refused = _main(_chromium(tmp_path / "p1", f"http://127.0.0.1:{port}/batch/evil", "--dump-dom"))
    assert "needs its token" in refused  # the page itself was refused: the browser shows the sentence
    dom = _chromium(tmp_path / "p2", f"http://127.0.0.1:{port}/batch/evil?token={token}", "--dump-dom")
    main = _main(dom)
    assert _batch_row(main, "evil")["data-state"] == "finished"
    assert '<tr class="error-row">' in main and " broke" in main  # (batchrun itself drops markup from messages)
    assert "&lt;i&gt;req-" in main  # the custom_id of the sample, shown as it is
    assert "<img" not in main and "<i>" not in main and "pwned" not in dom.split("<title>")[1].split("</title>")[0]


def test_chromium_shows_what_the_page_leaves_out_and_a_bad_batch_address(real_redis_url, spawn, tmp_path):
    """Review: batches beyond the ones shown, error counts from part of a batch's outcomes, and a
    malformed /batch/ address are each a sentence on the page (not silence, not "loading" for ever)."""
    import json

    from batchrun.dashboard import errors, snapshot
    from batchrun.settings import BatchOptions
    from batchrun.state import keys
    from batchrun.state.connections import connect
    from batchrun.state.store import BatchStore

    from helpers import cli_env

    store = BatchStore(connect(real_redis_url))
    n = snapshot.RECENT_BATCHES + snapshot.MAX_ACTIVE_ROWS + 7
    for i in range(n):
        store.create_batch(f"many-{i:04d}", BatchOptions())
        store.redis.zadd(keys.BATCHES, {f"many-{i:04d}": 1_000_000 + i})
    line = json.dumps({"custom_id": "x", "error": {"code": "server_error", "message": "boom"}})
    store.redis.rpush(keys.sub(f"many-{n - 1:04d}", "results"), *(["E" + line] * (errors.FIRST_LOOK + 5)))
    port = start_dashboard(spawn, cli_env(BATCHRUN_REDIS_URL=real_redis_url))
    main = _main(_chromium(tmp_path / "p1", f"http://127.0.0.1:{port}/", "--dump-dom"))
    assert re.search(r'id="not-shown"[^>]*>and 7 older active batches not shown', main), main[-2000:]
    assert re.search(r'id="errors-not-read"[^>]*>[^<]*5 earlier outcomes not read', main), main[-2000:]
    dom = _chromium(tmp_path / "p2", f"http://127.0.0.1:{port}/batch/%E0", "--dump-dom")
    status = re.search(r'<span id="status-line"[^>]*>([^<]*)</span>', dom)
    assert status and "is not a batch id" in status.group(1), dom.split("<script>")[0][-2000:]
