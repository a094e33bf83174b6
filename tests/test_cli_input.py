"""Every mistake a new user makes on the command line gets one sentence and an exit code, and
nothing is written for refused input (issue 12 items 5, 7, 8, 9, 11; issue 11 item 6).

Each test runs the real command in a subprocess and asserts on its exit code and its words;
those that need a Redis use the test DB and check that it stays empty.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import redis

from tests.helpers import ROOT, batchrun_cmd, cli_env, read_lines, spare_port, write_jobs

EXAMPLE = ROOT / "jobs.example.jsonl"


def cli(*args: str, env: dict | None = None, cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = env if env is not None else cli_env()
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def no_redis_env(**extra: str) -> dict:
    env = cli_env(**extra)
    env.pop("BATCHRUN_REDIS_URL", None)
    env.pop("BATCHRUN_CONFIG", None)
    return env


def one_sentence(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    for w in words:
        assert w in out, f"{w!r} not in {out!r}"


def keys_in(url: str) -> list:
    client = redis.Redis.from_url(url)
    try:
        return client.keys("*")
    finally:
        client.close()


# --- 12.5: Redis URLs and the mock server's port ----------------------------------------


@pytest.mark.parametrize("command", [("status", "b"), ("list",), ("submit", str(EXAMPLE)), ("limits",)])
def test_a_redis_url_without_a_scheme_is_a_usage_error_with_the_fix(command):
    proc = cli(*command, "--redis-url", "127.0.0.1:6379", env=no_redis_env())
    one_sentence(proc, 2, "'127.0.0.1:6379' is not a Redis URL", "did you mean redis://127.0.0.1:6379")


def test_a_redis_url_with_a_password_and_a_bad_port_does_not_show_the_password():
    proc = cli("list", "--redis-url", "redis://:s3cret@127.0.0.1:99999/0", env=no_redis_env())
    one_sentence(proc, 2, "port must be a number")
    assert "s3cret" not in proc.stdout + proc.stderr


@pytest.mark.redis
def test_a_database_the_server_does_not_have_is_one_sentence(real_redis_url):
    url = real_redis_url.rsplit("/", 1)[0] + "/99"
    proc = cli("list", "--redis-url", url, env=no_redis_env())
    one_sentence(proc, 2, "names a database this Redis server does not have", "--redis-url")


def test_mock_server_port_out_of_range_or_in_use_is_one_sentence():
    one_sentence(cli("mock-server", "--port", "70000"), 2, "--port", "70000")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("mock-server", "--port", str(port), timeout=30)
    one_sentence(proc, 2, f"cannot listen on 127.0.0.1:{port}", "address already in use", "pick another --port")


# --- 12.7: commands that work on a shared Redis refuse to run without one -------------------


@pytest.mark.parametrize("command", [
    ("submit", str(EXAMPLE)), ("status", "b"), ("list",), ("collect", "b", "-o", "out.jsonl"), ("cancel", "b"),
    ("purge", "b", "--yes"), ("limits",), ("resume", "b"),
])
def test_without_a_configured_redis_the_command_says_how_to_set_one(command, tmp_path):
    proc = cli(*command, env=no_redis_env(), cwd=tmp_path)
    one_sentence(proc, 2, "no Redis is configured", "--redis-url", "BATCHRUN_REDIS_URL")
    assert not (tmp_path / "out.jsonl").exists()
    if command[0] == "submit":
        assert "batchrun run" in proc.stderr and proc.stdout == ""  # no batch id that is already gone


def test_worker_without_a_redis_says_how_to_set_one():
    proc = cli("worker", "--burst", env=no_redis_env(OPENAI_API_KEY="sk-x"))
    one_sentence(proc, 2, "a worker needs a shared Redis", "BATCHRUN_REDIS_URL")


# --- 12.8: the config file ------------------------------------------------------------------


@pytest.mark.parametrize("text, words", [
    ("[worker]\nconcurency = 200\n", ["unknown key in [worker] 'concurency'", "did you mean 'concurrency'"]),
    ('redis_urll = "redis://127.0.0.1:6379/0"\n', ["unknown key 'redis_urll'", "did you mean 'redis_url'"]),
    ("[wroker]\nconcurrency = 200\n", ["unknown section '[wroker]'", "did you mean '[worker]'"]),
    ('[worker]\nconcurrency = "lots"\n', ["[worker] concurrency = 'lots'", "not a valid integer"]),
    ("[submit]\nbackoff_cap = -1\n", ["[submit] backoff_cap = -1"]),
    ("max_attempts = 0\n", ["max_attempts = 0"]),
])
def test_config_file_mistakes_name_the_file_and_the_key(tmp_path, text, words):
    config = tmp_path / "batchrun.toml"
    config.write_text(text)
    proc = cli("--config", str(config), "list", "--redis-url", "redis://127.0.0.1:1/0", env=no_redis_env())
    one_sentence(proc, 2, str(config), *words)
    assert "cannot reach Redis" not in proc.stderr  # refused before anything is tried


def test_a_config_file_that_is_not_there_is_refused_naming_the_option_and_the_variable(tmp_path):
    missing = tmp_path / "nope.toml"
    for args, env in ((["--config", str(missing)], no_redis_env()), ([], {**no_redis_env(), "BATCHRUN_CONFIG": str(missing)})):
        proc = cli(*args, "list", "--redis-url", "redis://127.0.0.1:1/0", env=env)
        one_sentence(proc, 2, str(missing), "--config", "BATCHRUN_CONFIG", "No such file")


def test_a_good_config_file_still_applies(tmp_path):
    config = tmp_path / "batchrun.toml"
    config.write_text('[estimate]\ntpm = ["gpt-4o-mini=1000000"]\n')
    proc = cli("--config", str(config), "estimate", str(EXAMPLE), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["models"][0]["tpm"] == 1_000_000


# --- 12.9: input checks ---------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("field, value", [("max_tokens", "ten"), ("max_tokens", -5), ("max_tokens", 10.5),
                                          ("max_completion_tokens", 0), ("n", True), ("max_output_tokens", "5")])
def test_bad_token_counts_are_refused_at_validation_with_file_line_and_reason(real_redis_url, tmp_path, field,
                                                                           value):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    lines = jobs.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["body"][field] = value
    lines[1] = json.dumps(bad)
    jobs.write_text("\n".join(lines) + "\n")
    proc = cli("submit", str(jobs), "--redis-url", real_redis_url)
    one_sentence(proc, 1, f"{jobs}, line 2: {field} must be a whole number of at least 1, not {value!r}",
                 "nothing was submitted")
    assert keys_in(real_redis_url) == []
    est = cli("estimate", str(jobs))
    assert est.returncode == 0 and f"line 2: {field} must be a whole number" in est.stderr


@pytest.mark.redis
def test_a_limit_for_a_model_no_job_uses_is_refused_naming_the_files_models(real_redis_url, tmp_path):
    proc = cli("submit", str(EXAMPLE), "--tpm", "gpt4o-mini=1000", "--redis-url", real_redis_url)
    one_sentence(proc, 1, "no job uses 'gpt4o-mini'", "the file's models are 'gpt-4o-mini'", "nothing was submitted")
    assert keys_in(real_redis_url) == []
    est = cli("estimate", str(EXAMPLE), "--tpm", "gpt4o-mini=1000")
    one_sentence(est, 1, "no job uses 'gpt4o-mini'", "'gpt-4o-mini'")  # about the file: exit 1, as run's
    run = cli("run", str(EXAMPLE), "-o", str(tmp_path / "out.jsonl"), "--mock", "--rpm", "gpt4o-mini=10",
              env=no_redis_env())
    one_sentence(run, 1, "no job uses 'gpt4o-mini'")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.redis
@pytest.mark.parametrize("spec, words", [
    ("0", ["--tpm '0': a limit must be at least 1; leave --tpm out for no limit"]),
    ("gpt-4o-mini=0", ["a limit must be at least 1"]),
    ("=100", ["--tpm '=100': the model name before '=' is missing"]),
    ("1e400", ["a limit is a whole number of tokens per minute"]),
    ("nan", ["a limit is a whole number"]),
    ("10.5", ["a limit is a whole number"]),
    ("-3", ["a limit cannot be negative"]),
])
def test_impossible_limits_are_usage_errors(real_redis_url, spec, words):
    for command in (["submit", str(EXAMPLE), "--redis-url", real_redis_url], ["estimate", str(EXAMPLE)]):
        one_sentence(cli(*command, "--tpm", spec), 2, *words)
    assert keys_in(real_redis_url) == []


@pytest.mark.redis
def test_an_empty_file_is_refused_with_a_sentence(real_redis_url, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    one_sentence(cli("submit", str(empty), "--redis-url", real_redis_url), 1, "has no job to submit (it is empty)")
    assert keys_in(real_redis_url) == []
    one_sentence(cli("estimate", str(empty)), 1, "has no job to estimate (it is empty)")
    invalid = tmp_path / "invalid.jsonl"
    invalid.write_text("[1]\n")
    one_sentence(cli("submit", str(invalid), "--skip-invalid", "--redis-url", real_redis_url), 1,
                 "no valid line")
    assert keys_in(real_redis_url) == []


def test_run_with_processes_but_no_redis_is_refused(tmp_path):
    proc = cli("run", str(EXAMPLE), "-o", str(tmp_path / "out.jsonl"), "--mock", "--processes", "4",
               env=no_redis_env())
    one_sentence(proc, 2, "--processes 4 needs a shared Redis", "BATCHRUN_REDIS_URL")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.redis
def test_resubmitting_a_batch_id_with_other_settings_is_refused_naming_them(real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    first = cli("submit", str(jobs), "--batch-id", "b1", "--tpm", "gpt-4o-mini=1000", "--max-attempts", "3", env=env)
    assert first.returncode == 0, first.stderr
    before = redis.Redis.from_url(real_redis_url).hgetall("batchrun:batch:b1")
    again = cli("submit", str(jobs), "--batch-id", "b1", "--tpm", "gpt-4o-mini=2000", "--max-attempts", "5",
                "--max-cost", "1", env=env)
    one_sentence(again, 2, "batch b1 exists with other settings", "--max-attempts 5 (it has 3)",
                 "--tpm gpt-4o-mini=2000 (it has gpt-4o-mini=1000)", "--max-cost 1 (it has 0)",
                 "batchrun resume b1 --max-cost USD")
    assert redis.Redis.from_url(real_redis_url).hgetall("batchrun:batch:b1") == before
    # the same settings, or none, add to it as before
    same = cli("submit", str(jobs), "--batch-id", "b1", "--tpm", "gpt-4o-mini=1000", env=env)
    assert same.returncode == 0 and "0 job(s) added to batch b1 (5 in all)" in same.stdout, same.stderr
    assert cli("submit", str(jobs), "--batch-id", "b1", env=env).returncode == 0


def test_estimate_and_run_agree_on_the_jobs_that_can_never_fit(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 8, max_tokens=20)
    with open(jobs, "a") as f:  # four jobs whose max_tokens alone is over the limit
        for i in range(4):
            f.write(json.dumps({"custom_id": f"big-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "gpt-4o-mini", "max_tokens": 60_000 + i,
                                         "messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    est = cli("estimate", str(jobs), "--tpm", "60000", "--json")
    assert est.returncode == 0, est.stderr
    [model] = json.loads(est.stdout)["models"]
    too_large = {j["custom_id"] for j in model["too_large"]}
    assert model["too_large_jobs"] == 4 and too_large == {f"big-{i}" for i in range(4)}
    out = tmp_path / "out.jsonl"
    run = cli("run", str(jobs), "-o", str(out), "--mock", "--tpm", "60000", "-q", env=no_redis_env(), timeout=120)
    assert run.returncode == 3, run.stderr  # finished, with jobs in the errors file
    failed = {e["custom_id"] for e in read_lines(tmp_path / "out.errors.jsonl")
              if e["error"]["code"] == "request_too_large"}
    assert failed == too_large
    assert {r["custom_id"] for r in read_lines(out)} == {f"req-{i}" for i in range(8)}


def test_the_last_line_of_a_resume_from_the_files_says_this_runs_count_and_the_files_total(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 10)
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:  # an earlier run wrote 6 of them
        for i in range(6):
            f.write(json.dumps({"custom_id": f"req-{i}", "response": {"status_code": 200}}) + "\n")
    proc = cli("resume", str(jobs), "-o", str(out), "--mock", env=no_redis_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (f"4 result(s) written to {out}, 0 error(s) to {tmp_path / 'out.errors.jsonl'}; 6 job(s) were there "
            f"already; the files now hold 10 result(s) and 0 error(s) in all") in proc.stdout


# --- 11.6: options that cannot work -----------------------------------------------------------


BAD_BATCH_OPTIONS = [
    ("--backoff-cap", "0"), ("--backoff-cap", "nan"), ("--backoff-cap", "1e9"), ("--backoff-base", "inf"),
    ("--backoff-base", "-1"), ("--max-attempts", "0"), ("--shard-size", "-1"), ("--burst-seconds", "nan"),
    ("--burst-seconds", "1e9"), ("--max-cost", "inf"), ("--max-cost", "nan"), ("--keep-days", "0"),
    ("--keep-days", "inf"), ("--keep-days", "1e12"),
]


@pytest.mark.redis
@pytest.mark.parametrize("option, value", BAD_BATCH_OPTIONS)
def test_submit_refuses_batch_options_that_cannot_work_before_writing_anything(real_redis_url, option, value):
    proc = cli("submit", str(EXAMPLE), option, value, "--redis-url", real_redis_url)
    one_sentence(proc, 2, option)
    assert keys_in(real_redis_url) == []


@pytest.mark.parametrize("option, value", BAD_BATCH_OPTIONS[:4] + [("--grace", "nan"), ("--concurrency", "0")])
def test_run_refuses_options_that_cannot_work(tmp_path, option, value):
    proc = cli("run", str(EXAMPLE), "-o", str(tmp_path / "out.jsonl"), "--mock", option, value, env=no_redis_env())
    one_sentence(proc, 2, option)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.redis
@pytest.mark.parametrize("args, env, words", [
    (["--grace", "nan"], {}, ["--grace"]),
    (["--concurrency", "0"], {}, ["--concurrency"]),
    ([], {"BATCHRUN_LEASE_SECONDS": "abc"}, ["BATCHRUN_LEASE_SECONDS='abc' is not a number"]),
    ([], {"BATCHRUN_LEASE_SECONDS": "0"}, ["BATCHRUN_LEASE_SECONDS must be a number of seconds from 3"]),
    ([], {"BATCHRUN_CONCURRENCY": "-4"}, ["BATCHRUN_CONCURRENCY"]),
])
def test_worker_refuses_settings_that_cannot_work(real_redis_url, args, env, words):
    proc = cli("worker", "--burst", *args, env=cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_API_KEY="sk-x",
                                                        **env))
    one_sentence(proc, 2, *words)


def test_status_every_and_resume_max_cost_refuse_non_numbers():
    one_sentence(cli("status", "b", "--every", "nan", "--redis-url", "redis://127.0.0.1:1/0"), 2, "--every")
    one_sentence(cli("resume", "b", "--max-cost", "inf", "--redis-url", "redis://127.0.0.1:1/0"), 2, "--max-cost")


# --- 12.11: -q, -v and -h after the subcommand -------------------------------------------------


def test_quiet_after_the_subcommand_shows_only_warnings_and_errors(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = cli("run", str(EXAMPLE), "-o", str(out), "--mock", "-q", env=no_redis_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no banner, no note, no progress line
    assert len(read_lines(out)) == 12
    loud = cli("run", str(EXAMPLE), "-o", str(tmp_path / "loud.jsonl"), "--mock", env=no_redis_env(), timeout=120)
    assert "progress:" in loud.stderr and "batch " in loud.stderr  # what -q hid


def test_help_and_verbosity_flags_work_after_the_subcommand():
    proc = cli("status", "-h")
    assert proc.returncode == 0 and "Usage:" in proc.stdout and "--watch" in proc.stdout
    proc = cli("estimate", str(EXAMPLE), "-v", "-v")
    assert proc.returncode == 0, proc.stderr


def test_verbose_shows_batchrun_detail_but_not_asyncio_or_rq_unless_asked_twice():
    import logging

    from batchrun.cli.main import setup_logging

    try:
        setup_logging(1)
        assert logging.getLogger("batchrun.shard").isEnabledFor(logging.DEBUG)
        for noisy in ("asyncio", "rq.worker", "rq.queue", "openai"):
            assert not logging.getLogger(noisy).isEnabledFor(logging.INFO), noisy
        setup_logging(2)
        for noisy in ("asyncio", "rq.worker", "openai"):
            assert logging.getLogger(noisy).isEnabledFor(logging.DEBUG), noisy
        setup_logging(-1)
        assert not logging.getLogger("batchrun.run").isEnabledFor(logging.INFO)
        assert logging.getLogger("batchrun.run").isEnabledFor(logging.WARNING)
    finally:
        setup_logging(0)
        logging.getLogger().setLevel(logging.WARNING)


def test_verbosity_flags_are_lifted_but_option_values_and_arguments_after_a_double_dash_are_not():
    from batchrun.cli.main import _lift_verbosity

    assert _lift_verbosity(["run", "f", "-o", "x", "-q"]) == ["-q", "run", "f", "-o", "x"]
    assert _lift_verbosity(["status", "b", "-vv"]) == ["-vv", "status", "b"]
    assert _lift_verbosity(["status", "--", "-q"]) == ["status", "--", "-q"]
    assert _lift_verbosity(["list", "-n", "5"]) == ["list", "-n", "5"]


# --- 12.17: the test command on a fresh machine -------------------------------------------------


def test_cli_env_does_not_invent_a_tiktoken_cache(monkeypatch, tmp_path):
    import tests.helpers as helpers

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setattr(helpers, "ROOT", tmp_path / "fresh" / "batchrun")  # no ../shared/tiktoken_cache there
    assert "TIKTOKEN_CACHE_DIR" not in helpers.cli_env()
    os.makedirs(tmp_path / "fresh" / "shared" / "tiktoken_cache")
    assert helpers.cli_env()["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "fresh" / "shared" / "tiktoken_cache")


# --- any option string: a value or a sentence, never a traceback -------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

OPTION_VALUES = st.one_of(st.sampled_from(["0", "-0", "1e400", "-inf", "nan", "NaN", "1_000", "=5", "m=", "0x10",
                                           "", " ", "5e-324", "9" * 30, "1.5", "gpt-4o-mini=nan"]),
                          st.text(max_size=12))
NUMERIC_OPTIONS = ["--tpm", "--rpm", "--max-attempts", "--backoff-base", "--backoff-cap", "--shard-size",
                   "--burst-seconds", "--max-cost", "--keep-days"]


@given(option=st.sampled_from(NUMERIC_OPTIONS), value=OPTION_VALUES)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_option_string_gives_a_value_or_a_sentence_never_a_traceback(option, value):
    from click.testing import CliRunner

    from batchrun.cli.main import main

    # submit checks its options before it looks for a Redis: none is configured here, so an
    # accepted value ends in "no Redis is configured", a refused one in a sentence naming it.
    res = CliRunner().invoke(main, ["submit", str(EXAMPLE), option, value], env={"BATCHRUN_REDIS_URL": ""})
    assert isinstance(res.exception, SystemExit) and res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert "no Redis is configured" in res.output or option in res.output, res.output


# --- review: `resume JOBS -o OUT` refuses impossible options, given or stored --------------------


@pytest.mark.parametrize("option, value", [("--backoff-cap", "0"), ("--backoff-cap", "inf"), ("--backoff-cap", "1e9"),
                                           ("--backoff-base", "inf"), ("--burst-seconds", "inf"),
                                           ("--tpm", "0"), ("--tpm", "abc")])
def test_resume_from_the_files_refuses_options_that_cannot_work_before_writing_anything(tmp_path, option, value):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    out = tmp_path / "out.jsonl"
    proc = cli("resume", str(jobs), "-o", str(out), "--mock", option, value, env=no_redis_env())
    one_sentence(proc, 2, option)
    assert not out.exists() and not (tmp_path / "out.batchrun.json").exists()


def test_resume_from_the_files_names_a_settings_file_whose_values_cannot_work(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    out = tmp_path / "out.jsonl"
    first = cli("run", str(jobs), "-o", str(out), "--mock", "-q", env=no_redis_env(), timeout=120)
    assert first.returncode == 0, first.stderr
    settings = tmp_path / "out.batchrun.json"
    data = json.loads(settings.read_text())
    data["options"]["backoff_cap"] = "0.0"  # written by hand, or by an older batchrun
    settings.write_text(json.dumps(data))
    before = out.read_text()
    proc = cli("resume", str(jobs), "-o", str(out), "--mock", env=no_redis_env())
    one_sentence(proc, 2, str(settings), "--backoff-cap must be")
    assert out.read_text() == before and json.loads(settings.read_text()) == data
    fixed = cli("resume", str(jobs), "-o", str(out), "--mock", "--backoff-cap", "5", env=no_redis_env(), timeout=120)
    assert fixed.returncode == 0, fixed.stderr


def test_quiet_hides_the_note_on_the_first_runs_settings(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    out = tmp_path / "out.jsonl"
    first = cli("run", str(jobs), "-o", str(out), "--mock", "-q", "--backoff-cap", "5", env=no_redis_env(),
                timeout=120)
    assert first.returncode == 0, first.stderr
    proc = cli("resume", str(jobs), "-o", str(out), "--mock", "-q", env=no_redis_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    loud = cli("resume", str(jobs), "-o", str(out), "--mock", env=no_redis_env(), timeout=120)
    assert "resuming with the first run's settings" in loud.stderr and "--backoff-cap 5" in loud.stderr


# --- review: config values of another shape, and the Redis URL's check -------------------------


@pytest.mark.parametrize("text", ['tpm = ["gpt-4o-mini=100000"]\n', "tpm = 100000\n",
                                  '[estimate]\ntpm = "gpt-4o-mini=100000"\n', '[estimate]\ntpm = 100000\n'])
def test_a_limit_in_a_config_file_applies_as_a_list_a_string_or_a_number(tmp_path, text):
    config = tmp_path / "batchrun.toml"
    config.write_text(text)
    proc = cli("--config", str(config), "estimate", str(EXAMPLE), "--json", env=no_redis_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["models"][0]["tpm"] == 100_000


def test_a_config_string_for_a_repeatable_option_is_split_on_spaces_as_its_env_var_is(tmp_path):
    config = tmp_path / "batchrun.toml"
    config.write_text('[estimate]\nrpm = "gpt-4o-mini=100 gpt-4o-mini=200"\n')
    proc = cli("--config", str(config), "estimate", str(EXAMPLE), "--json", env=no_redis_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["models"][0]["rpm"] == 200


@pytest.mark.parametrize("text, words", [
    ('redis_url = "http://x"\n', ["redis_url = 'http://x'", "is not a Redis URL"]),
    ('[run]\nredis_url = "http://x"\n', ["[run] redis_url = 'http://x'", "is not a Redis URL"]),
    ("latency_ms = [1]\n", ["latency_ms = [1]", "--latency-ms"]),
    ("[worker]\nconcurrency = [1, 2]\n", ["[worker] concurrency = [1, 2]", "--concurrency"]),
])
def test_config_values_of_the_wrong_kind_name_the_file_and_the_key(tmp_path, text, words):
    config = tmp_path / "batchrun.toml"
    config.write_text(text)
    out = tmp_path / "out.jsonl"
    proc = cli("--config", str(config), "run", str(EXAMPLE), "-o", str(out), "--mock", env=no_redis_env())
    one_sentence(proc, 2, str(config), *words)
    assert not out.exists()


# --- review: a --redis-url at a server that is not Redis, or that refuses the credentials -------


@pytest.mark.parametrize("command", ["list", "run"])
def test_a_redis_url_at_a_server_that_is_not_redis_is_one_sentence(tmp_path, command):
    from tests.hostile import HostileServer, ok

    out = tmp_path / "out.jsonl"
    args = ["run", str(EXAMPLE), "-o", str(out), "--mock"] if command == "run" else ["list"]
    with HostileServer([ok()]) as srv:  # an HTTP server: its answer to a Redis command starts with "HTTP"
        url = f"redis://:s3cret@127.0.0.1:{srv.port}/8"
        proc = cli(*args, "--redis-url", url, env=no_redis_env())
    one_sentence(proc, 1, f"redis://:***@127.0.0.1:{srv.port}/8 does not answer as a Redis server", "--redis-url")
    assert "s3cret" not in proc.stdout + proc.stderr
    assert not out.exists()


def test_a_redis_that_refuses_the_password_is_one_sentence(tmp_path):
    import shutil
    import time

    if not shutil.which("redis-server"):
        pytest.skip("no redis-server to start")
    port = spare_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "right", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        for url in (f"redis://:wrong@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
            proc = cli("list", "--redis-url", url, env=no_redis_env())
            one_sentence(proc, 1, "refused batchrun's credentials", "give the right user and password")
            assert "wrong" not in proc.stdout + proc.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


# --- review: exit 4 prints the command that continues -------------------------------------------


@pytest.mark.redis
def test_collect_without_follow_on_a_running_batch_prints_the_follow_command(real_redis_url, tmp_path):
    sub = cli("submit", str(EXAMPLE), "--batch-id", "b-follow", "--redis-url", real_redis_url)
    assert sub.returncode == 0, sub.stderr
    out = tmp_path / "out.jsonl"
    proc = cli("collect", "b-follow", "-o", str(out), "--redis-url", real_redis_url)
    one_sentence(proc, 4, "batch b-follow is still running; follow it with: "
                          f"batchrun collect b-follow -o {out} --redis-url {real_redis_url} --follow")


@pytest.mark.parametrize("target, extra", [("missing.jsonl", ["-o", "out.jsonl"]), ("missing", ["-o", "out.jsonl"]),
                                           ("missing.jsonl", []), ("sub/missing", [])])
def test_resume_of_a_jobs_file_that_does_not_exist_says_so(tmp_path, target, extra):
    proc = cli("resume", target, *extra, env=no_redis_env(), cwd=tmp_path)
    one_sentence(proc, 2, f"{target}: no such file")
    assert "no Redis is configured" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_batch_id_without_a_redis_still_says_how_to_set_one(tmp_path):
    one_sentence(cli("resume", "b-123", env=no_redis_env(), cwd=tmp_path), 2, "no Redis is configured")


# --- review: verbosity flags run together, and option values that look like them -----------------


def test_quiet_run_together_with_a_short_option_after_the_subcommand(tmp_path):
    proc = cli("run", str(EXAMPLE), "-qo", "out.jsonl", "--mock", env=no_redis_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert len(read_lines(tmp_path / "out.jsonl")) == 12
    helped = cli("run", "-qh")
    assert helped.returncode == 0 and "Usage:" in helped.stdout and "--give-up-after" in helped.stdout, helped.stderr


def test_a_value_that_looks_like_a_verbosity_flag_stays_the_options_value(tmp_path):
    # `-o -q` names the file "-q": --mock stays an option instead of becoming the output's name
    proc = cli("run", str(EXAMPLE), "-o", "-q", "--mock", env=no_redis_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(read_lines(tmp_path / "-q")) == 12 and not (tmp_path / "--mock").exists()


def test_lifting_keeps_option_values_and_splits_run_together_flags():
    from batchrun.cli.main import _lift_verbosity

    assert _lift_verbosity(["run", "j", "-qo", "x"]) == ["-q", "run", "j", "-o", "x"]
    assert _lift_verbosity(["run", "-qh"]) == ["-q", "run", "-h"]
    assert _lift_verbosity(["run", "j", "-o", "-q", "--mock"]) == ["run", "j", "-o", "-q", "--mock"]
    assert _lift_verbosity(["--config", "-v", "list"]) == ["--config", "-v", "list"]
    assert _lift_verbosity(["run", "j", "--output=-q", "-v"]) == ["-v", "run", "j", "--output=-q"]
    assert _lift_verbosity(["resume", "j", "-c", "-q"]) == ["resume", "j", "-c", "-q"]


# --- review: sane ceilings for --concurrency and --shard-size ------------------------------------


@pytest.mark.redis
def test_huge_concurrency_and_shard_size_are_refused_naming_the_ceiling(real_redis_url, tmp_path):
    out = tmp_path / "out.jsonl"
    one_sentence(cli("run", str(EXAMPLE), "-o", str(out), "--mock", "--concurrency", "99999999999",
                     env=no_redis_env()), 2, "--concurrency", "10000")
    one_sentence(cli("run", str(EXAMPLE), "-o", str(out), "--mock", "--shard-size", "99999999999999999999",
                     env=no_redis_env()), 2, "--shard-size", "1000000")
    assert not out.exists()
    one_sentence(cli("submit", str(EXAMPLE), "--shard-size", "1000001", "--redis-url", real_redis_url), 2,
                 "--shard-size")
    assert keys_in(real_redis_url) == []
    one_sentence(cli("worker", "--burst", env=cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_API_KEY="sk-x",
                                                      BATCHRUN_CONCURRENCY="20000")), 2, "BATCHRUN_CONCURRENCY",
                 "10,000")
    assert "at most 10,000" in cli("run", "-h").stdout and "at most 1,000,000" in cli("run", "-h").stdout


def test_a_ctrl_c_before_a_commands_own_handling_exits_130_saying_interrupted(monkeypatch):
    # click alone prints "Aborted!" and exits 1, which scripts and shells do not read as an interrupt.
    from click.testing import CliRunner

    from batchrun.cli.main import main
    from batchrun.state.store import BatchStore

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(BatchStore, "recent_batches", interrupted)
    res = CliRunner().invoke(main, ["list"], env={"BATCHRUN_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert res.exit_code == 130, res.output
    assert "batchrun: interrupted" in res.output and "Aborted" not in res.output, res.output
