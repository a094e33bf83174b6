"""`batchrun dashboard` over HTTP: every JSON endpoint the page uses, during a batch running on the
real Redis; /metrics parsed with prometheus_client and checked against `status --json`; the token
and loopback rules; the actions; `worker --metrics-port`."""

from __future__ import annotations

import json
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dashboard_helpers import get, get_json, running_batch, start_dashboard, wait_until
from helpers import batchrun_cmd, cli_env, spare_port, write_jobs

pytestmark = pytest.mark.redis

TOKEN = "s3cret-token-for-the-tests"


def _samples(text: str) -> dict[str, list]:
    """name -> [(labels, value)] of every sample, as prometheus_client's parser reads them."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _row(overview: dict, batch_id: str) -> dict | None:
    return next((b for b in overview["batches"] if b["batch_id"] == batch_id), None)


def test_every_json_endpoint_during_a_running_batch_then_metrics_agree_with_status(real_redis_url, spawn, tmp_path):
    faults = {"500": 0.15, "429": 0.1}
    with running_batch(spawn, real_redis_url, tmp_path, n=240, error_rates=faults,
                       submit_args=("--max-attempts", "2")) as (env, worker):
        port = start_dashboard(spawn, env)
        first = wait_until("the batch's first outcomes", lambda: (_row(get_json(port, "/api/overview"), "live") or
                                                                  {}).get("ended"))
        over = wait_until("an alive worker on the batch and a budget with history", lambda: (
            o := get_json(port, "/api/overview"))["workers"] and o["budgets"] and o["budgets"][0]["history"] and o)
        row = _row(over, "live")
        assert row["state"] in ("running", "finished") and row["jobs"]["total"] == 240
        assert 0 < row["progress"] <= 1 and row["cost"]["spent_usd"] > 0
        assert row["history"]["requests"] and sum(row["history"]["requests"]) > 0
        [budget] = over["budgets"]
        assert budget["model"] == "gpt-4o-mini" and budget["circuit"]["state"] in ("open", "closed")
        assert len(budget["history"]["minutes"]) == 60 and sum(budget["history"]["requests"]) > 0
        assert sum(budget["history"]["tokens"]) > 0
        assert "sk-test" not in json.dumps(over)  # the key never; its fingerprint only
        w = over["workers"][0]
        assert w["alive"] and w["seconds_since_heartbeat"] is not None
        page = get_json(port, "/api/batch/live")
        assert page["status"]["batch_id"] == "live" and page["status"]["jobs"]["total"] == 240
        assert set(page) >= {"history", "errors", "most_retried", "workers", "progress", "actions"}
        assert page["actions"] is False
        later = wait_until("progress between two polls", lambda: (
            (_row(get_json(port, "/api/overview"), "live") or {}).get("ended", 0) > first and True))
        assert later
        assert get(port, "/api/batch/nothing-here")[0] == 404
        assert "no batch 'nothing-here'" in get(port, "/api/batch/nothing-here")[1]
        assert get(port, "/api/batch/bad%20id")[0] == 400
        worker.wait(timeout=180)
        assert worker.returncode == 0

        page = wait_until("the batch's failures grouped", lambda: (p := get_json(port, "/api/batch/live"))[
            "status"]["state"] == "finished" and p)
        status = json.loads(subprocess.run(batchrun_cmd("status", "live", "--json"), env=env, capture_output=True,
                                           text=True, timeout=60).stdout)
        if status["jobs"]["failed"]:  # 15 % of 500s, twice in a row: some jobs fail with the code server_error
            assert page["errors"] and sum(e["count"] for e in page["errors"]) == status["jobs"]["failed"]
            assert page["errors"][0]["sample_message"] and page["errors"][0]["batches"] == {
                "live": page["errors"][0]["count"]}
        assert page["most_retried"] and page["most_retried"][0]["failed_attempts"] >= 1

        code, text = get(port, "/metrics")
        assert code == 200
        m = _samples(text)
        assert sum(v for _, v in m["batchrun_requests_total"]) == status["totals"]["requests"]
        by_class = {labels["status_class"]: v for labels, v in m["batchrun_requests_total"]}
        assert by_class["2xx"] == status["jobs"]["done"] and by_class["5xx"] > 0
        assert sum(v for _, v in m["batchrun_rate_limited_total"]) == status["totals"]["rate_limited"] > 0
        ended = {labels["outcome"]: v for labels, v in m["batchrun_jobs_ended_total"] if labels["batch"] == "live"}
        assert ended == {"done": status["jobs"]["done"], "failed": status["jobs"]["failed"]}
        assert m["batchrun_retries_total"] == [({"batch": "live"}, status["totals"]["retries"])]
        [(_, cost)] = m["batchrun_cost_usd_total"]
        assert cost == pytest.approx(status["cost"]["spent_usd"], abs=1e-6)  # status rounds to 6 places
        assert [v for labels, v in m["batchrun_requests_in_flight"]] == [0]
        assert sum(v for _, v in m["batchrun_tokens_charged_total"]) > 0
        assert {labels["model"] for labels, _ in m["batchrun_budget_available_tokens"]} == {"gpt-4o-mini"}


def test_the_page_is_served_with_its_script(real_redis_url, spawn):
    port = start_dashboard(spawn, cli_env(BATCHRUN_REDIS_URL=real_redis_url))
    for path in ("/", "/batch/anything"):
        code, html = get(port, path)
        assert code == 200 and "<svg" not in html.split("<script>")[0] and "function chart(" in html


def test_another_host_needs_a_token_of_some_length(real_redis_url):
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    for args, words in ((["--host", "0.0.0.0"], "give a --token"),
                        (["--host", "0.0.0.0", "--token", "short"], "at least 16 characters")):
        proc = subprocess.run(batchrun_cmd("dashboard", "--port", str(spare_port()), *args), env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def test_a_port_in_use_is_a_sentence(real_redis_url, spawn):
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    port = start_dashboard(spawn, env)
    proc = subprocess.run(batchrun_cmd("dashboard", "--port", str(port)), env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_with_a_token_every_route_wants_it(real_redis_url, spawn):
    port = start_dashboard(spawn, cli_env(BATCHRUN_REDIS_URL=real_redis_url, BATCHRUN_DASHBOARD_TOKEN=TOKEN))
    for path in ("/", "/api/overview", "/metrics", "/api/batch/x"):
        code, body = get(port, path)
        assert code == 401 and "needs its token" in body
        assert get(port, path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "X"})[0] == 401
    assert get(port, "/api/overview", headers={"Authorization": "Bearer " + TOKEN})[0] == 200
    assert get(port, f"/api/overview?token={TOKEN}")[0] == 200
    assert get(port, f"/metrics?token={TOKEN}")[0] == 200


def test_without_a_token_only_loopback_names_are_answered(real_redis_url, spawn):
    """A page on another site reaching 127.0.0.1 through a rebound DNS name sends its own Host."""
    port = start_dashboard(spawn, cli_env(BATCHRUN_REDIS_URL=real_redis_url))
    assert get(port, "/api/overview", headers={"Host": f"localhost:{port}"})[0] == 200
    code, body = get(port, "/api/overview", headers={"Host": "attacker.example"})
    assert code == 403 and "--token" in body


def test_actions_need_the_flag_and_a_confirmation(real_redis_url, spawn, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_API_KEY="sk-test")
    assert subprocess.run(batchrun_cmd("submit", str(jobs), "--batch-id", "held"), env=env, capture_output=True,
                          timeout=60).returncode == 0
    plain = start_dashboard(spawn, env)
    code, body = get(plain, "/api/batch/held/pause", method="POST", headers={"X-Batchrun-Confirm": "held"})
    assert code == 403 and "--allow-actions" in body
    port = start_dashboard(spawn, env, "--allow-actions")
    assert get_json(port, "/api/overview")["actions"] is True
    code, body = get(port, "/api/batch/held/pause", method="POST")
    assert code == 400 and "not confirmed" in body
    assert get(port, "/api/batch/held/pause", method="POST", headers={"X-Batchrun-Confirm": "other"})[0] == 400

    def act(action: str) -> tuple[int, str]:
        return get(port, f"/api/batch/held/{action}", method="POST", headers={"X-Batchrun-Confirm": "held"})

    def state() -> str:
        return json.loads(subprocess.run(batchrun_cmd("status", "held", "--json"), env=env, capture_output=True,
                                         text=True, timeout=60).stdout)["state"]

    assert act("resume")[0] == 409
    code, body = act("pause")
    assert code == 200 and "paused" in json.loads(body)["message"] and state() == "paused"
    assert act("pause")[0] == 409
    assert act("resume")[0] == 200 and state() == "running"
    assert act("cancel")[0] == 200 and state() == "cancelled"
    code, body = act("cancel")
    assert code == 409 and "ended already" in body
    assert act("explode")[0] == 404
    assert get(port, "/api/batch/held/pause", method="GET")[0] == 405


def test_worker_metrics_port_serves_the_fleet(real_redis_url, spawn, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    assert subprocess.run(batchrun_cmd("submit", str(jobs), "--batch-id", "m"), env=env, capture_output=True,
                          timeout=60).returncode == 0
    subprocess.run(batchrun_cmd("cancel", "m"), env=env, capture_output=True, timeout=60)  # nothing to send
    port = spare_port()
    spawn(batchrun_cmd("worker", "--metrics-port", str(port)), env=env, stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL)

    def scraped():
        code, text = get(port, "/metrics") if _listening(port) else (0, "")
        # (it listens before the worker has registered with RQ: then it counts no worker yet)
        m = _samples(text) if code == 200 else {}
        return ({"alive": "true"}, 1.0) in m.get("batchrun_workers", []) and m

    m = wait_until("the worker's /metrics counting itself alive", scraped, timeout=60)
    assert ({"batch": "m", "state": "cancelled"}, 1.0) in m["batchrun_batch_state"]
    assert ({"batch": "m"}, 3.0) in m["batchrun_jobs"]


def test_worker_metrics_port_in_use_is_a_sentence(real_redis_url):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_API_KEY="sk-test")
        proc = subprocess.run(batchrun_cmd("worker", "--burst", "--metrics-port", str(port)), env=env,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr, proc.stderr


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
