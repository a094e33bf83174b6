"""`via` per endpoint ([[endpoints]] of the config file): a via = "batch-api" endpoint takes its
models' remote batches (/v1/files, /v1/batches) instead of live requests; bad values refused with
the endpoint's sentence; how it combines with the batch's own --via; `batchrun endpoints` shows it."""

from __future__ import annotations

import json
import subprocess

import pytest

from batchrun.endpoints import (EndpointsError, EndpointVia, load_endpoints, remote_endpoint, remote_models)
from batchrun.mock import MockServerThread
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, write_jobs
from tests.test_endpoints_fleet import _config, _endpoint
from tests import test_remote
from tests.test_remote import mock_summary

real_store = test_remote.real_store  # the fixture, shared

MIXED = '''
[[endpoints]]
name = "live-a"
base_url = "https://api.openai.com/v1"
models = ["gpt-4o-mini"]

[[endpoints]]
name = "batch-b"
base_url = "https://other.example/v1"
via = "batch-api"

[[endpoints]]
name = "azure-c"
kind = "azure"
base_url = "https://r.openai.azure.com"
deployments = { "gpt-4.1" = "d41" }
'''


def _cli(args, env, timeout=60):
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def test_via_parses_and_decides_which_models_go_remote_and_where(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(MIXED)
    a, b, c = load_endpoints(str(path))
    assert (a.via, b.via, c.via) == (EndpointVia.LIVE, EndpointVia.BATCH_API, EndpointVia.LIVE)
    eps = (a, b, c)
    # gpt-4o-mini has a live endpoint: live; gpt-4o only batch-b: remote; gpt-4.1 has azure-c (live)
    assert remote_models(eps, ["gpt-4o-mini", "gpt-4o", "gpt-4.1"]) == {"gpt-4o"}
    assert remote_endpoint(eps, "gpt-4o").name == "batch-b"
    assert remote_endpoint(eps, "gpt-4o-mini").name == "batch-b"  # (--via batch-api: its batch-api endpoint first)
    assert remote_endpoint((a, c), "gpt-4o-mini").name == "live-a"  # none: the first that is not Azure
    assert remote_endpoint((c,), "gpt-4.1") is None  # Azure takes no remote batches


@pytest.mark.parametrize("extra, words", [
    ('via = "sometimes"', "via = 'sometimes': must be 'live' (the default: requests one by one) or 'batch-api'"),
    ('via = 3', "via = 3: must be 'live'"),
    ('via = "auto"', "via = 'auto': an endpoint has no deadline to split by; give the batch --via auto "
                     "--deadline DURATION instead"),
    ('kind = "azure"\nvia = "batch-api"', "via = 'batch-api' is for OpenAI's Batch API; batchrun does not send "
                                          "remote batches to Azure OpenAI"),
    ('vai = "live"', "unknown field 'vai' (did you mean 'via'?)"),
])
def test_a_bad_via_is_refused_naming_file_table_and_field(tmp_path, extra, words):
    path = _config(tmp_path, _endpoint("e1", "https://x.example/v1", extra))
    with pytest.raises(EndpointsError) as err:
        load_endpoints(path)
    assert f"{path}, [[endpoints]] #1 ('e1'): {words}" in str(err.value)


def test_a_bad_via_stops_submit_before_anything_is_written(tmp_path):
    path = _config(tmp_path, _endpoint("e1", "https://x.example/v1", 'via = "later"'))
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    proc = _cli(["--config", path, "submit", str(jobs)], cli_env(BATCHRUN_REDIS_URL="redis://127.0.0.1:1/0"))
    assert proc.returncode == 2, proc.stderr
    assert "[[endpoints]] #1 ('e1'): via = 'later': must be 'live'" in proc.stderr and "Traceback" not in proc.stderr


def test_batchrun_endpoints_shows_each_endpoints_via(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(MIXED)
    env = cli_env()
    env.pop("BATCHRUN_REDIS_URL", None)
    proc = _cli(["--config", str(path), "endpoints"], env)
    assert proc.returncode == 0, proc.stderr
    assert "live-a (openai, https://api.openai.com/v1)\n  models: gpt-4o-mini\n  via: live\n" in proc.stdout
    assert "batch-b (openai, https://other.example/v1)\n  models: (any)\n  via: batch-api (remote batches" in proc.stdout
    listed = json.loads(_cli(["--config", str(path), "endpoints", "--json"], env).stdout)
    assert [e["via"] for e in listed] == ["live", "batch-api", "live"]


def test_a_model_only_an_azure_endpoint_serves_cannot_go_through_the_batch_api(real_redis_url, tmp_path):
    path = _config(tmp_path, _endpoint("az", "https://r.openai.azure.com", 'kind = "azure"',
                                       'deployments = { "gpt-4o-mini" = "d" }'))
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    proc = _cli(["--config", path, "submit", str(jobs), "--via", "batch-api", "--batch-id", "azb"],
                cli_env(BATCHRUN_REDIS_URL=real_redis_url))
    assert proc.returncode == 1, proc.stderr
    assert "'gpt-4o-mini' would go through the Batch API (--via batch-api), but every endpoint of" in proc.stderr
    assert "is Azure OpenAI, which batchrun sends no remote batches to" in proc.stderr
    assert "nothing was submitted" in proc.stderr and "Traceback" not in proc.stderr
    import redis

    assert not redis.Redis.from_url(real_redis_url).exists("batchrun:batch:azb")


def test_a_model_served_only_by_batch_api_endpoints_goes_remote_the_others_live(tmp_path):
    # gpt-4o-mini: live-a (live) and batch-b (batch-api, every model) -> live, to live-a only.
    # gpt-4o: batch-b only -> one remote batch at batch-b, nothing live anywhere for it.
    mini = write_jobs(tmp_path / "mini.jsonl", 30, model="gpt-4o-mini", prefix="mini")
    big = write_jobs(tmp_path / "big.jsonl", 20, model="gpt-4o", prefix="big")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(mini.read_text() + big.read_text())
    out = tmp_path / "out.jsonl"
    with MockServerThread(batch_seconds=0.3) as a, MockServerThread(batch_seconds=0.3) as b:
        config = _config(tmp_path, _endpoint("live-a", a.base_url, 'api_key_env = "KEY_A"', 'models = ["gpt-4o-mini"]'),
                         _endpoint("batch-b", b.base_url, 'api_key_env = "KEY_B"', 'via = "batch-api"'))
        proc = _cli(["--config", config, "run", str(jobs), "-o", str(out)], cli_env(KEY_A="sk-a", KEY_B="sk-b"),
                    timeout=120)
        a_live, a_batches = a.stats()["requests"], mock_summary(a)
        b_live, b_batches = b.stats()["requests"], mock_summary(b)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert a_live == 30 and a_batches["created"] == 0
    assert b_live == 0 and b_batches["created"] == 1 and list(b_batches["batches"].values()) == ["completed"]
    assert "20 job(s) in 1 new remote batch" in proc.stderr
    results, errors = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
    assert not errors and len(results) == 50
    assert {r["custom_id"] for r in results if r.get("batchrun_endpoint") == "live-a"} == {f"mini-{i}" for i in range(30)}


def test_the_batchs_via_batch_api_overrides_live_endpoints(tmp_path):
    # Every endpoint live, the batch --via batch-api: its remote batches go to the model's endpoint
    # (its key, its URL), not to OPENAI_BASE_URL.
    jobs = write_jobs(tmp_path / "jobs.jsonl", 10)
    out = tmp_path / "out.jsonl"
    with MockServerThread(batch_seconds=0.3) as a, MockServerThread(batch_seconds=0.3) as stray:
        config = _config(tmp_path, _endpoint("live-a", a.base_url, 'api_key_env = "KEY_A"'))
        proc = _cli(["--config", config, "run", str(jobs), "-o", str(out), "--via", "batch-api"],
                    cli_env(KEY_A="sk-a", OPENAI_BASE_URL=stray.base_url, OPENAI_API_KEY="sk-stray"), timeout=120)
        a_batches, stray_batches, a_live = mock_summary(a), mock_summary(stray), a.stats()["requests"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert a_batches["created"] == 1 and stray_batches["created"] == 0 and a_live == 0
    assert not check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")[1]


def test_the_plan_takes_every_remote_models_job_however_many_live_ones_come_first(real_store, tmp_path,
                                                                                     monkeypatch):
    # (the remote runner gave up on a shard at the first lease chunk that was all live jobs: a
    # batch-api model's jobs behind 2,000 live ones were never sent)
    import batchrun.remote.runner as runner_mod
    from batchrun.endpoints import CONFIG_ENV
    from batchrun.ops.submit import submit_file
    from batchrun.remote.client import RemoteClient
    from batchrun.state import keys
    from batchrun.state.remote_parts import RemoteParts

    # (the todo set is ordered by name among equal due times: the live ones are leased first)
    mini = write_jobs(tmp_path / "mini.jsonl", 12, model="gpt-4o-mini", prefix="a-mini")
    big = write_jobs(tmp_path / "big.jsonl", 8, model="gpt-4o", prefix="z-big")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(mini.read_text() + big.read_text())
    config = _config(tmp_path, _endpoint("live-a", "http://127.0.0.1:9/v1", 'models = ["gpt-4o-mini"]'),
                     _endpoint("batch-b", "http://127.0.0.1:9/v1", 'via = "batch-api"'))
    monkeypatch.setenv(CONFIG_ENV, config)
    monkeypatch.setattr(runner_mod, "LEASE_CHUNK", 5)
    report = submit_file(real_store, str(jobs))
    bid = report.batch_id
    meta = real_store.meta(bid)
    assert json.loads(meta["remote_models"]) == ["gpt-4o"]
    runner = runner_mod.RemoteRunner(real_store, bid, RemoteClient("http://127.0.0.1:9/v1", ""))
    assert runner.parts.lock(bid, runner.token, 60_000)
    runner.plan(meta)
    parts = RemoteParts(real_store.redis)
    [part] = parts.parts(bid)
    assert (part.model, part.size, part.endpoint) == ("gpt-4o", 8, "batch-b")
    assert sorted(parts.ids(bid, 0)) == sorted(f"z-big-{i}" for i in range(8))
    todo = {m.decode() for m in real_store.redis.zrange(keys.todo(bid, 0), 0, -1)}
    assert todo == {f"a-mini-{i}" for i in range(12)}  # the live model's jobs, back for live runners


def test_a_remote_batch_bound_for_an_endpoint_the_worker_lacks_pauses_naming_the_endpoint(real_store, tmp_path):
    # Past --give-up-after the pause said "Check OPENAI_BASE_URL", which this part does not use.
    import time

    from batchrun.endpoints import parse_endpoints
    from batchrun.ops.submit import submit_file
    from batchrun.remote.client import RemoteClient
    from batchrun.remote.runner import RemoteRunner
    from batchrun.settings import BatchOptions
    from batchrun.state.remote_parts import RemoteParts

    eps = parse_endpoints("c.toml", [{"name": "batch-b", "base_url": "http://127.0.0.1:9/v1",
                                     "via": "batch-api"}])
    jobs = write_jobs(tmp_path / "jobs.jsonl", 2)
    bid = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api", give_up_seconds=0.3)).batch_id
    client = RemoteClient("http://127.0.0.1:9/v1", "sk-test")
    planner = RemoteRunner(real_store, bid, client, endpoints=eps)
    assert planner.parts.lock(bid, planner.token, 60_000) and planner.plan(real_store.meta(bid)) == 1
    planner.parts.unlock(bid, planner.token)
    assert RemoteParts(real_store.redis).parts(bid)[0].endpoint == "batch-b"
    started = time.monotonic()
    RemoteRunner(real_store, bid, client, endpoints=(), max_seconds=10, poll_cap=0.1).run()  # a worker without it
    meta = real_store.meta(bid)
    assert meta["state"] == "paused" and time.monotonic() - started < 10, meta
    assert "which this worker's [[endpoints]]" in meta["reason"] and "OPENAI_BASE_URL" not in meta["reason"]
    assert "Check endpoint 'batch-b' in the workers' config file" in meta["reason"], meta["reason"]
