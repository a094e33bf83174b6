"""Edges of [[endpoints]] found by an adversarial review: config mistakes that echo secrets, a
request larger than every endpoint's day, an endpoint told to wait longer than the backoff cap."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from batchrun.mock import MockConfig, MockServerThread
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, read_lines, write_jobs


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "batchrun.toml"
    path.write_text(text)
    return str(path)


def _cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


# -- config mistakes never print a secret ----------------------------------------------------------

def test_a_key_written_in_api_key_env_is_refused_without_being_printed(tmp_path):
    path = _write(tmp_path, '[[endpoints]]\nname = "a"\nbase_url = "https://api.openai.com/v1"\n'
                            'api_key_env = "sk-proj-abcDEF123secret"\n')
    proc = _cli(["--config", path, "endpoints"], cli_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "abcDEF123secret" not in proc.stderr + proc.stdout
    assert "api_key_env" in proc.stderr and "looks like a key" in proc.stderr


def test_a_bad_base_url_with_credentials_is_named_masked(tmp_path):
    path = _write(tmp_path, '[[endpoints]]\nname = "a"\nbase_url = "htps://me:hunter2pass@gw.example/v1"\n')
    proc = _cli(["--config", path, "endpoints"], cli_env())
    assert proc.returncode == 2 and "must be an http:// or https:// URL" in proc.stderr
    assert "hunter2pass" not in proc.stderr + proc.stdout


# -- a request larger than its endpoints' day fails, it does not wait for ever ----------------------

@pytest.mark.redis
def test_a_request_larger_than_every_endpoints_tpd_fails_at_once_with_a_sentence(real_redis_url, tmp_path):
    with MockServerThread(MockConfig()) as srv:
        path = _write(tmp_path, f'[[endpoints]]\nname = "tiny"\nbase_url = "{srv.base_url}"\n'
                                'tpd = ["gpt-4o-mini=20"]\n')
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 2), tmp_path / "out.jsonl"
        proc = _cli(["--config", path, "run", str(jobs), "-o", str(out)],
                    cli_env(BATCHRUN_REDIS_URL=real_redis_url), timeout=90)
        assert srv.stats()["requests"] == 0
    results, errors = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
    assert not results and len(errors) == 2, proc.stderr[-2000:]
    assert all(e["error"]["code"] == "request_too_large" for e in errors)
    message = errors[0]["error"]["message"]
    assert "tpd" in message and "tiny" in message, message


@pytest.mark.redis
def test_a_request_too_large_for_one_endpoints_day_goes_to_another(real_redis_url, tmp_path):
    with MockServerThread(MockConfig()) as tiny, MockServerThread(MockConfig()) as big:
        path = _write(tmp_path, f'[[endpoints]]\nname = "tiny"\nbase_url = "{tiny.base_url}"\n'
                                'tpd = ["gpt-4o-mini=20"]\n'
                                f'[[endpoints]]\nname = "big"\nbase_url = "{big.base_url}"\n')
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 4), tmp_path / "out.jsonl"
        proc = _cli(["--config", path, "run", str(jobs), "-o", str(out)],
                    cli_env(BATCHRUN_REDIS_URL=real_redis_url), timeout=90)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert tiny.stats()["requests"] == 0
    results, errors = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
    assert not errors and {r["batchrun_endpoint"] for r in results} == {"big"}
    assert read_lines(out)


# -- an endpoint told to wait long, the other one down: a sentence, not a silent wait ----------------

@pytest.mark.redis
def test_one_endpoint_cooling_for_an_hour_and_the_other_down_pause_the_batch_with_a_sentence(real_redis_url, tmp_path):
    from tests.hostile import HostileServer, Reply, closed_port, error_body

    hour = error_body("Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 "
                      "have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after "
                      "3600 seconds.", code="429")
    with HostileServer(lambda seen: Reply(429, {"retry-after-ms": "3600000", "retry-after": "3600"}, hour)) as srv:
        path = _write(tmp_path, f'[[endpoints]]\nname = "cooling"\nbase_url = "{srv.base_url}"\n'
                                f'[[endpoints]]\nname = "down"\nbase_url = "http://127.0.0.1:{closed_port()}/v1"\n')
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 3), tmp_path / "out.jsonl"
        proc = _cli(["--config", path, "run", str(jobs), "-o", str(out), "--give-up-after", "5",
                     "--backoff-cap", "2"], cli_env(BATCHRUN_REDIS_URL=real_redis_url), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "paused" in proc.stderr and "3600" in proc.stderr, proc.stderr[-3000:]


# -- --mock never sends to the config file's endpoints ------------------------------------------------

@pytest.mark.redis
def test_run_with_mock_does_not_send_to_the_config_files_endpoints(real_redis_url, tmp_path):
    with MockServerThread(MockConfig()) as real:  # stands for a paid endpoint
        path = _write(tmp_path, f'[[endpoints]]\nname = "paid"\nbase_url = "{real.base_url}"\n'
                                'models = ["some-other-model"]\n')
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 3), tmp_path / "out.jsonl"
        proc = _cli(["--config", path, "run", str(jobs), "-o", str(out), "--mock"],
                    cli_env(BATCHRUN_REDIS_URL=real_redis_url), timeout=90)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert real.stats()["requests"] == 0
    results, errors = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
    assert len(results) == 3 and not errors and not any("batchrun_endpoint" in r for r in results)
    assert "[[endpoints]]" in proc.stderr + proc.stdout  # it says they are not used


# -- a key refused on one endpoint: the pause names which endpoint and which variable -------------

@pytest.mark.redis
def test_a_key_refused_by_one_endpoint_pauses_naming_that_endpoint_and_its_variable(real_redis_url, tmp_path):
    from tests.hostile import HostileServer, Reply, error_body

    refused = error_body("Access denied due to invalid subscription key or wrong API endpoint.", code="401")
    with HostileServer(lambda seen: Reply(401, {}, refused)) as bad, MockServerThread(MockConfig()) as good:
        path = _write(tmp_path, f'[[endpoints]]\nname = "good"\nbase_url = "{good.base_url}"\n'
                                f'[[endpoints]]\nname = "east"\nkind = "azure"\nbase_url = "{bad.base_url}"\n'
                                'api_key_env = "EAST_KEY"\n')
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 6), tmp_path / "out.jsonl"
        proc = _cli(["--config", path, "run", str(jobs), "-o", str(out)],
                    cli_env(BATCHRUN_REDIS_URL=real_redis_url, EAST_KEY="wrong"), timeout=90)
    paused = [line for line in proc.stderr.splitlines() if "paused" in line]
    assert paused and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "east" in paused[-1] and "EAST_KEY" in paused[-1], paused


# -- Azure: only a dated api-version selects deployment paths ------------------------------------------

@pytest.mark.parametrize("version", ["v1", "latest", "preview"])
def test_an_azure_v1_api_version_keeps_the_v1_path_and_names_the_deployment_as_the_model(version):
    from batchrun.endpoints import Endpoint, EndpointKind
    from batchrun.runner.azure import azure_body, azure_base_url
    from batchrun.runner.routes import Route

    ep = Endpoint("az", "https://r.openai.azure.com", EndpointKind.AZURE, deployments={"gpt-4o-mini": "d1"},
                  api_version=version)
    assert not ep.deployment_paths
    assert azure_body(ep, {"model": "gpt-4o-mini"}) == {"model": "d1"}
    assert azure_base_url(ep, "").startswith("https://r.openai.azure.com/openai/v1")
    route = Route.__new__(Route)
    route.endpoint, route.clients = ep, {}
    route.settings = __import__("batchrun.settings", fromlist=["WorkerSettings"]).WorkerSettings(api_key="k")
    client = route.client_for("gpt-4o-mini")
    assert "/deployments/" not in str(client.base_url) and "/openai/v1" in str(client.base_url)


def test_a_model_without_a_deployment_on_the_v1_path_gets_no_dated_api_version():
    from batchrun.endpoints import Endpoint, EndpointKind
    from batchrun.runner.azure import azure_base_url

    ep = Endpoint("az", "https://r.openai.azure.com", EndpointKind.AZURE, api_version="2024-10-21")
    assert azure_base_url(ep, "") == "https://r.openai.azure.com/openai/v1"
    assert azure_base_url(Endpoint("az", "https://r", EndpointKind.AZURE, api_version="preview"), "") \
        == "https://r/openai/v1?api-version=preview"


# -- a slot taken while its waiter was cancelled is given back, not held for a lease ----------------

@pytest.mark.parametrize("redis_client", ["real"], indirect=True)
def test_a_slot_taken_as_its_waiter_is_cancelled_is_given_back(redis_client):
    import asyncio
    import threading
    import time

    from batchrun.state.slots import FleetSlots
    from batchrun.state.store import BatchStore

    slots = FleetSlots(BatchStore(redis_client), "http://x/v1", 1, lease_ms=60_000, token="t")
    real_take, go, entered = slots._take, threading.Event(), threading.Event()

    def slow_take(member):  # the script runs after the waiter is cancelled (its thread goes on)
        entered.set()
        go.wait(10)
        return real_take(member)

    slots._take = slow_take

    async def scenario():
        task = asyncio.create_task(slots.acquire())
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        go.set()

    asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while redis_client.zcard(slots.key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_client.zcard(slots.key) == 0  # not held until its lease (60 s) runs out


# -- `batchrun endpoints` in a shell without the workers' keys still shows their budgets and days ------

@pytest.mark.redis
def test_endpoints_without_the_key_in_this_shell_still_shows_the_budget_and_todays_count(real_redis_url, tmp_path):
    with MockServerThread(MockConfig()) as srv:
        path = _write(tmp_path, f'[[endpoints]]\nname = "daily"\nbase_url = "{srv.base_url}"\n'
                                'api_key_env = "DAILY_KEY"\nrpd = ["gpt-4o-mini=2"]\n')
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 2), tmp_path / "out.jsonl"
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, DAILY_KEY="sk-worker-only")
        proc = _cli(["--config", path, "run", str(jobs), "-o", str(out)], env, timeout=90)
        assert proc.returncode == 0, proc.stderr[-2000:]
    env.pop("DAILY_KEY")  # the operator's shell
    listed = _cli(["--config", path, "endpoints"], env).stdout
    assert "NOT SET" in listed and "budget gpt-4o-mini" in listed, listed
    assert "today (UTC): 2 of 2 requests" in listed, listed
    assert "requests-per-day limit (2) is spent; it resumes at 00:00 UTC (in " in listed, listed
    assert "sk-worker-only" not in listed
