"""[[endpoints]] in the config file: parsed and checked (batchrun/endpoints.py), listed by
`batchrun endpoints`, a model no endpoint serves refused at submit, keys checked at worker start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from batchrun.endpoints import Endpoint, EndpointKind, EndpointsError, load_endpoints, missing_keys, unserved_models
from batchrun.policy.classify import Verdict, Action
from batchrun.policy.decision import Decision, Fail, GiveBack, HoldForCircuit, Pause, PauseKind, Requeue
from batchrun.policy.routing import REROUTE_DELAY_S, RouteOption, pick, reroute
from batchrun.runner.azure import azure_base_url, azure_body
from batchrun.runner.routes import merged_limits
from batchrun.settings import Limits
from tests.helpers import batchrun_cmd, cli_env, write_jobs

GOOD = '''
[[endpoints]]
name = "openai-a"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY_A"
tpm = ["gpt-4o-mini=2000000"]
rpm = ["gpt-4o-mini=5000"]

[[endpoints]]
name = "azure-east"
kind = "azure"
base_url = "https://my-resource.openai.azure.com"
api_key_env = "AZURE_OPENAI_API_KEY"
api_version = "2024-10-21"
deployments = { "gpt-4o-mini" = "my-4o-mini" }
tpm = ["gpt-4o-mini=450000"]

[[endpoints]]
name = "local-vllm"
base_url = "http://gpu-box:8000/v1"
models = ["meta-llama/Llama-3.1-8B-Instruct"]
max_in_flight = 64
'''


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "batchrun.toml"
    path.write_text(text)
    return str(path)


def test_the_issues_example_parses_into_typed_endpoints(tmp_path):
    a, azure, vllm = load_endpoints(_write(tmp_path, GOOD))
    assert (a.name, a.kind, a.api_key_env) == ("openai-a", EndpointKind.OPENAI, "OPENAI_API_KEY_A")
    assert a.limits.for_model("gpt-4o-mini") == (5000, 2_000_000) and a.serves("anything")
    assert azure.kind is EndpointKind.AZURE and azure.deployments == {"gpt-4o-mini": "my-4o-mini"}
    assert azure.serves("gpt-4o-mini") and not azure.serves("gpt-4o")  # its deployments are what it serves
    assert vllm.max_in_flight == 64 and vllm.serves("meta-llama/Llama-3.1-8B-Instruct") and not vllm.serves("gpt-4o")
    assert unserved_models((a, azure, vllm), ["gpt-4o-mini", "x"]) == []
    assert unserved_models((azure, vllm), ["gpt-4o-mini", "gpt-4o"]) == ["gpt-4o"]
    assert unserved_models((), ["whatever"]) == []  # no [[endpoints]]: the one endpoint takes any


@pytest.mark.parametrize("table, words", [
    ('base_url = "https://x/v1"', ["#1", "name is missing"]),
    ('name = "a"\nbase_url = "ftp://x"', ["#1 ('a')", "base_url = 'ftp://x'", "http:// or https://"]),
    ('name = "a"\nbase_url = "https://u:p@x/v1"', ["must not hold credentials", "api_key_env"]),
    ('name = "a"\nbase_url = "https://x/v1"\napi_key = "sk-123"', ["unknown field 'api_key'", "api_key_env"]),
    ('name = "a"\nbase_url = "https://x/v1"\ntpm = ["gpt-4o-mini=lots"]', ["('a')", "tpm 'gpt-4o-mini=lots'"]),
    ('name = "a"\nbase_url = "https://x/v1"\nmax_in_flight = -1', ["max_in_flight = -1", "whole number"]),
    ('name = "a"\nbase_url = "https://x/v1"\nkind = "bedrock"', ["kind = 'bedrock'", "'azure'"]),
    ('name = "a"\nbase_url = "https://x/v1"\ndeployments = {m = "d"}', ["deployments are for kind"]),
    ('name = "a"\nbase_url = "https://x/v1"\napi_key_env = "sk-abc def"', ["api_key_env", "environment variable"]),
])
def test_a_bad_endpoint_is_one_sentence_naming_file_table_and_field(tmp_path, table, words):
    path = _write(tmp_path, f"[[endpoints]]\n{table}\n")
    with pytest.raises(EndpointsError) as err:
        load_endpoints(path)
    for word in [path, "[[endpoints]]", *words]:
        assert word in str(err.value)


def test_two_endpoints_of_one_name_are_refused(tmp_path):
    path = _write(tmp_path, '[[endpoints]]\nname = "a"\nbase_url = "https://x/v1"\n'
                            '[[endpoints]]\nname = "a"\nbase_url = "https://y/v1"\n')
    with pytest.raises(EndpointsError, match=r"#2 \('a'\): name 'a' is already endpoint #1's"):
        load_endpoints(path)


def test_a_key_variable_not_set_is_named_and_the_key_is_read_from_the_environment_only():
    ep = Endpoint("a", "https://x/v1", api_key_env="KEY_A")
    assert missing_keys((ep,), env={}) == [
        "endpoint 'a': its key variable KEY_A is not set in this worker's environment; export it (the key "
        "stays in the worker, never in Redis)"]
    assert missing_keys((ep,), env={"KEY_A": "sk-1"}) == []
    assert ep.api_key({"KEY_A": "sk-1"}) == "sk-1" and "sk-1" not in repr(ep)


def test_an_endpoints_own_limits_win_over_the_batchs():
    batch = Limits.parse(tpm=["1000", "gpt-4o=500"])
    assert merged_limits(batch, Limits.parse(tpm=["gpt-4o-mini=9000"])).for_model("gpt-4o-mini") == (0, 9000)
    assert merged_limits(batch, Limits.parse(tpm=["7000"])).for_model("gpt-4o") == (0, 7000)
    assert merged_limits(batch, Limits()).for_model("gpt-4o") == (0, 500)


def test_azure_paths_header_free_body_and_v1_model_names():
    dep = Endpoint("az", "https://r.openai.azure.com", EndpointKind.AZURE, deployments={"gpt-4o-mini": "d1"},
                   api_version="2024-10-21")
    assert azure_base_url(dep, "d1") == "https://r.openai.azure.com/openai/deployments/d1?api-version=2024-10-21"
    v1 = Endpoint("az", "https://r.openai.azure.com/openai/v1", EndpointKind.AZURE, deployments={"gpt-4o-mini": "d1"})
    assert azure_base_url(v1, "") == "https://r.openai.azure.com/openai/v1"
    assert azure_body(v1, {"model": "gpt-4o-mini", "x": 1}) == {"model": "d1", "x": 1}
    assert azure_body(dep, {"model": "gpt-4o-mini"}) == {"model": "gpt-4o-mini"}


# -- routing rules (policy/routing.py) ----------------------------------------------------------

options = st.builds(RouteOption, wait_s=st.floats(0, 1000), open=st.booleans(), avoided=st.booleans(),
                    load=st.floats(0, 100), full=st.booleans())


@given(st.lists(options, min_size=1, max_size=6))
def test_pick_takes_an_up_endpoint_not_just_failed_on_whenever_there_is_one(opts):
    chosen = opts[pick(opts)]
    if any(not o.open for o in opts):
        assert not chosen.open
    if any(not o.open and not o.avoided for o in opts):
        assert not chosen.avoided
    peers = [o for o in opts if (o.open, o.avoided, o.full) == (chosen.open, chosen.avoided, chosen.full)]
    assert chosen.wait_s <= min(o.wait_s for o in peers) + 0.02  # the soonest of its kind


def test_pick_of_nothing_is_none():
    assert pick([]) is None


RATE_LIMITED = Verdict(Action.RETRY, "rate_limit", "429", hint=30.0, budget_exhausted=True)
OUTAGE = Verdict(Action.RETRY, "server_error", "HTTP 500", circuit=True)


@pytest.mark.parametrize("decision, verdict, status, expected", [
    (Decision(Requeue(30.0)), RATE_LIMITED, 429, Decision(Requeue(REROUTE_DELAY_S), 30.0)),
    (Decision(HoldForCircuit(10.0, True)), OUTAGE, 500, Decision(GiveBack(True))),
    (Decision(Pause(PauseKind.GAVE_UP)), OUTAGE, 500, Decision(GiveBack())),
    (Decision(Pause(PauseKind.LONG_WAIT), 60.0), RATE_LIMITED.__class__(Action.RETRY, "rate_limit", "per day", 40_000.0,
                                                                        True), 429, Decision(GiveBack(), 40_000.0)),
    # a per-minute hint past the backoff cap (60 s here) cools the endpoint for the cap, no longer
    (Decision(Pause(PauseKind.LONG_WAIT), 60.0), RATE_LIMITED.__class__(Action.RETRY, "rate_limit", "429", 3_600.0,
                                                                        True), 429, Decision(GiveBack(), 60.0)),
    (Decision(Fail("bad_request", "x")), Verdict(Action.FAIL, "bad_request", "x"), 400,
     Decision(Fail("bad_request", "x"))),
])
def test_trouble_of_one_endpoint_sends_the_job_elsewhere_instead_of_waiting_or_pausing(decision, verdict, status,
                                                                                        expected):
    assert reroute(decision, verdict, status, elsewhere=True, cap=60.0) == expected
    assert reroute(decision, verdict, status, elsewhere=False, cap=60.0) == decision  # nowhere else: as decided


# -- the command line ------------------------------------------------------------------------------

def _cli(args, env, timeout=60):
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def test_batchrun_endpoints_lists_them_with_key_status_and_never_the_key(tmp_path):
    path = _write(tmp_path, GOOD)
    env = cli_env(OPENAI_API_KEY_A="sk-secret-a")
    env.pop("AZURE_OPENAI_API_KEY", None)
    env.pop("BATCHRUN_REDIS_URL", None)
    proc = _cli(["--config", path, "endpoints"], env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "openai-a (openai, https://api.openai.com/v1)" in out and "$OPENAI_API_KEY_A set" in out
    assert "$AZURE_OPENAI_API_KEY NOT SET" in out and "gpt-4o-mini -> my-4o-mini (api-version 2024-10-21)" in out
    assert "max_in_flight 64 across the fleet" in out and "sk-secret-a" not in out
    listed = json.loads(_cli(["--config", path, "endpoints", "--json"], env).stdout)
    assert [e["name"] for e in listed] == ["openai-a", "azure-east", "local-vllm"]


def test_a_bad_endpoints_table_is_a_usage_error_before_any_command_runs(tmp_path):
    path = _write(tmp_path, '[[endpoints]]\nname = "a"\nbase_url = "gopher://x"\n')
    proc = _cli(["--config", path, "endpoints"], cli_env())
    assert proc.returncode == 2
    assert "[[endpoints]] #1 ('a'): base_url = 'gopher://x': must be an http:// or https:// URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_endpoints_the_single_endpoint_is_listed(tmp_path):
    proc = _cli(["endpoints"], cli_env(OPENAI_BASE_URL="http://127.0.0.1:9/v1"))
    assert proc.returncode == 0 and "no [[endpoints]]" in proc.stdout and "http://127.0.0.1:9/v1" in proc.stdout


def test_a_model_no_endpoint_serves_fails_at_submit_with_a_sentence(real_redis_url, tmp_path):
    path = _write(tmp_path, '[[endpoints]]\nname = "vllm"\nbase_url = "http://127.0.0.1:9/v1"\n'
                            'models = ["llama"]\n')
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)  # gpt-4o-mini
    proc = _cli(["--config", path, "submit", str(jobs)], cli_env(BATCHRUN_REDIS_URL=real_redis_url))
    assert proc.returncode != 0
    assert "no endpoint of" in proc.stderr and "serves model 'gpt-4o-mini' (endpoints: vllm)" in proc.stderr
    assert "nothing was submitted" in proc.stderr and "Traceback" not in proc.stderr


def test_a_worker_refuses_to_start_without_an_endpoints_key(real_redis_url, tmp_path):
    path = _write(tmp_path, '[[endpoints]]\nname = "a"\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "NO_SUCH_KEY_X"\n')
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    env.pop("NO_SUCH_KEY_X", None)
    proc = _cli(["--config", path, "worker", "--burst"], env)
    assert proc.returncode == 1 and "endpoint 'a': its key variable NO_SUCH_KEY_X is not set" in proc.stderr


def test_a_burst_over_endpoints_without_limits_spreads_at_once(redis_client):
    """Before any answer or budget reading, equal endpoints take turns (not all to the first)."""
    import asyncio

    from batchrun.runner.routes import Routes
    from batchrun.settings import BatchOptions, WorkerSettings
    from batchrun.state.store import BatchStore

    eps = (Endpoint("a", "http://a/v1"), Endpoint("b", "http://b/v1"), Endpoint("c", "http://c/v1", models=("x",)))

    async def burst():
        routes = Routes(BatchStore(redis_client), WorkerSettings(), BatchOptions(), "t", endpoints=eps)
        return Counter(routes.choose("gpt-4o-mini", 50).name for _ in range(90))

    from collections import Counter
    assert asyncio.run(burst()) == {"a": 45, "b": 45}  # c does not serve the model
