"""Edges of the dashboard and /metrics found in review: a Redis that goes away while the page is
open, a Redis holding very many active batches, and the rendered progress itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from dashboard_helpers import get
from helpers import ROOT, batchrun_cmd, cli_env, spare_port, write_jobs


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start one")
def test_a_redis_that_goes_away_is_a_sentence_on_every_route_and_no_traceback(spawn, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from chaos import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        env = cli_env(BATCHRUN_REDIS_URL=server.url, OPENAI_API_KEY="sk-test")
        jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
        assert subprocess.run(batchrun_cmd("submit", str(jobs), "--batch-id", "gone"), env=env,
                              capture_output=True, timeout=60).returncode == 0
        port = spare_port()
        dash = spawn(batchrun_cmd("dashboard", "--port", str(port)), env=env, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE, text=True)
        assert "dashboard of" in dash.stderr.readline()
        assert get(port, "/api/overview")[0] == 200
        server.kill()
        time.sleep(1.5)  # past the snapshot the dashboard keeps for a second
        for path in ("/api/overview", "/api/batch/gone", "/metrics"):
            code, body = get(port, path)
            assert code == 503 and "cannot read Redis" in body and "Server got itself in trouble" not in body, body
        server.start()  # back: the page carries on
        assert get(port, "/api/overview")[0] == 200 and get(port, "/metrics")[0] == 200
    finally:
        server.kill()
    dash.terminate()
    err = dash.communicate(timeout=30)[1]
    assert "Traceback" not in err and "cannot read Redis" in err, err[-3000:]


def test_worker_metrics_on_a_redis_gone_answer_503_with_a_sentence(capfd):
    from batchrun.dashboard.prometheus import serve_metrics
    from batchrun.state.connections import connect
    from batchrun.state.store import BatchStore

    dead = spare_port()  # nothing listens there
    server = serve_metrics(BatchStore(connect(f"redis://127.0.0.1:{dead}/0")), "127.0.0.1", 0)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/metrics")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == 503 and "cannot read Redis" in info.value.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capfd.readouterr().err

