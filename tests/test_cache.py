"""The response cache's parts: keys and entries (pure), both storages (sqlite file, real Redis)
behind one interface, the size bound under concurrent writers, claims that lapse."""

from __future__ import annotations

import json
import threading
import time
import zlib

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.policy.cache_entries import (MAGIC, CachedAnswer, cache_key, decode_entry, encode_entry,
                                           line_opts_out, normalised_base_url, opt_out_problem)
from batchrun.state.cache import ResponseCache
from batchrun.state.cache_redis import BYTES, ENTRY, RedisCacheStorage
from batchrun.state.cache_sqlite import SqliteCacheStorage
from batchrun.state.cache_storage import is_in_process, open_storage
from batchrun.state.scripts import Scripts

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


# --- keys and entries (pure) ------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=10)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), st.randoms())
def test_the_key_does_not_depend_on_the_order_of_the_bodys_keys(body, rnd):
    items = list(body.items())
    rnd.shuffle(items)
    assert cache_key("https://api.openai.com/v1", "/v1/chat/completions", dict(items)) == \
        cache_key("https://api.openai.com/v1", "/v1/chat/completions", body)


def test_the_key_names_the_server_and_path_and_body_but_no_credentials():
    base = cache_key("https://api.openai.com/v1", "/v1/chat/completions", BODY)
    assert cache_key("https://user:sk-secret@API.openai.com/v1/?api-key=x", "/v1/chat/completions", BODY) == base
    assert "sk-secret" not in normalised_base_url("https://user:sk-secret@api.openai.com/v1")
    assert cache_key("https://other.example/v1", "/v1/chat/completions", BODY) != base
    assert cache_key("https://api.openai.com/v1", "/v1/completions", BODY) != base
    assert cache_key("https://api.openai.com/v1", "/v1/chat/completions", {**BODY, "max_tokens": 6}) != base


def test_an_entry_reads_back_as_the_answer_it_holds():
    answer = CachedAnswer(200, "req_1", {"choices": [{"message": {"content": "héllo"}}]}, 1234.5)
    raw = encode_entry(answer)
    assert raw.startswith(MAGIC) and len(raw) < len(json.dumps(answer.body)) + 64
    assert decode_entry(raw) == answer
    assert decode_entry(None) is None


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_bytes_that_are_not_an_entry_never_read_as_an_answer(junk):
    for raw in (junk, MAGIC + junk):
        with pytest.raises(ValueError):
            decode_entry(raw)


@pytest.mark.parametrize("payload", [b"[1, 2]", b'{"s": 500, "b": {}, "t": 1}', b'{"s": 200, "b": "x", "t": 1}',
                                     b'{"s": 200, "b": {}}', b'{"s": 200, "b": {}, "t": 1, "r": 5}'])
def test_an_entry_that_decompresses_to_no_successful_answer_is_corrupt(payload):
    with pytest.raises(ValueError):
        decode_entry(MAGIC + zlib.compress(payload))
    good = encode_entry(CachedAnswer(200, None, {"a": 1}, 1.0))
    with pytest.raises(ValueError):
        decode_entry(good[:-3])  # cut short


def test_the_per_line_opt_out_field():
    assert line_opts_out({"batchrun": {"cache": False}})
    assert not line_opts_out({"batchrun": {"cache": True}}) and not line_opts_out({})
    assert opt_out_problem({"batchrun": {"cache": "no"}}) == "'batchrun.cache' must be true or false"
    assert "unknown field 'cach'" in opt_out_problem({"batchrun": {"cach": False}})
    assert "must be an object" in opt_out_problem({"batchrun": False})


# --- both storages, one interface ---------------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def storage(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteCacheStorage(tmp_path / "c" / "responses.sqlite3")
        yield s
        s.close()
        return
    url = request.getfixturevalue("real_redis_url")
    client = redis.Redis.from_url(url)
    yield RedisCacheStorage(client, url)
    client.close()


def test_a_stored_entry_is_found_and_counted(storage):
    assert storage.get("k1") is None
    assert storage.put("k1", b"value-1", 60, 10_000)
    assert storage.get("k1") == b"value-1"
    assert storage.put("k1", b"value-1b", 60, 10_000)  # stored again: replaced, counted once
    stats = storage.stats()
    assert stats.entries == 1 and stats.bytes == len(b"value-1b") + 2 and stats.oldest is not None


def test_an_entry_expires_after_its_ttl(storage):
    storage.put("short", b"x" * 10, 0.2, 10_000)
    storage.put("long", b"y" * 10, 600, 10_000)
    time.sleep(1.0)
    assert storage.get("short") is None
    assert storage.get("long") == b"y" * 10
    assert storage.stats().entries == 1


def test_the_size_bound_evicts_the_entries_nearest_their_expiry(storage):
    bound = 1000
    for i in range(30):
        assert storage.put(f"key{i:03d}", b"v" * 94, 100 + i, bound)  # 100 bytes each with its key
    stats = storage.stats()
    assert stats.bytes <= bound and stats.entries == 10
    assert storage.get("key029") is not None and storage.get("key000") is None
    assert not storage.put("huge", b"v" * 2000, 60, bound), "an entry larger than the bound is not stored"


def test_clear_removes_all_or_only_the_older_entries(storage):
    storage.put("old", b"o", 600, 10_000)
    time.sleep(1.2)
    storage.put("new", b"n", 600, 10_000)
    assert storage.clear(older_than_seconds=0.6) == 1
    assert storage.get("old") is None and storage.get("new") == b"n"
    assert storage.clear() == 1
    assert storage.get("new") is None and storage.stats().entries == 0 and storage.stats().bytes == 0


@pytest.mark.redis
def test_the_bound_holds_with_writers_racing_on_one_redis(real_redis_url):
    bound = 20_000

    def write(n: int) -> None:
        s = RedisCacheStorage(redis.Redis.from_url(real_redis_url))
        for i in range(150):
            s.put(f"w{n}-{i}", b"z" * (50 + (i * 37) % 400), 60 + (i % 7), bound)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    client = redis.Redis.from_url(real_redis_url)
    counted = int(client.get(BYTES))
    held = sum(len(client.get(k)) + len(k) - len(ENTRY) for k in client.scan_iter(match=ENTRY + "*"))
    assert counted == held <= bound


def test_the_in_process_redis_caches_to_the_file(tmp_path, monkeypatch):
    import fakeredis

    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path / "here"))
    fake = fakeredis.FakeRedis()
    assert is_in_process(fake)
    storage = open_storage(fake)
    assert isinstance(storage, SqliteCacheStorage) and storage.where == str(tmp_path / "here" / "responses.sqlite3")
    assert not is_in_process(redis.Redis())


# --- claims (in-batch dedupe) and corrupt entries ------------------------------------------------

def test_a_claim_is_one_runners_until_it_lapses_and_a_lapsed_one_is_not_released_by_it(redis_client, tmp_path):
    scripts = Scripts(redis_client)
    storage = SqliteCacheStorage(tmp_path / "r.sqlite3")
    a = ResponseCache(storage, redis_client, scripts, "runner-a|0")
    b = ResponseCache(storage, redis_client, scripts, "runner-b|0")
    # Claims of 1.5 s: a loaded machine's gap between two calls stays well inside one.
    assert a.claim("k", 1500) and not b.claim("k", 1500)
    a.renew_claims(1500)
    assert a.being_sent("k")
    time.sleep(1.8)  # a died: nothing renews its claim
    assert b.claim("k", 10_000)
    a.release("k")  # a comes back late: b's claim stays
    assert b.being_sent("k")
    a.renew_claims(1500)
    assert "k" not in a.claims
    b.release("k")
    assert not b.being_sent("k")


def test_a_corrupt_entry_is_ignored_logged_and_removed(tmp_path, caplog, redis_client):
    storage = SqliteCacheStorage(tmp_path / "r.sqlite3")
    cache = ResponseCache(storage, redis_client, Scripts(redis_client), "r|0")
    storage.put("bad", MAGIC + b"\x00garbage", 60, 10_000)
    with caplog.at_level("WARNING", logger="batchrun.worker"):
        assert cache.lookup("bad") is None
    assert "cannot be read" in caplog.text and "ignored" in caplog.text
    assert storage.get("bad") is None and cache.corrupt == 1


def test_the_key_names_the_endpoints_serving_a_model_and_their_azure_deployments():
    from batchrun.policy.cache_entries import cache_server

    body = {"model": "m", "messages": []}
    one = cache_key("https://default/v1", "/v1/chat/completions", body, cache_server([("http://a/v1", "")]))
    assert one == cache_key("http://a/v1/", "/v1/chat/completions", body)  # one server: as without endpoints
    two = cache_server([("http://a/v1", ""), ("http://b/v1", "")])
    assert two == cache_server([("http://b/v1", ""), ("http://a/v1", "")])
    assert cache_key("", "/v1/chat/completions", body, two) != one
    east, west = cache_server([("https://x.azure.com", "gpt4o-0513")]), cache_server([("https://x.azure.com", "gpt4o-0806")])
    assert cache_key("", "/v1/chat/completions", body, east) != cache_key("", "/v1/chat/completions", body, west)


def _written_behind(s) -> None:
    """Wake the writer thread and wait (generously) until it has taken what was put."""
    deadline = time.monotonic() + 20
    s._wake.set()
    while s._pending and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # (it took them; its transaction ends, or fails, soon after)


def test_a_full_cache_file_is_a_warning_once_and_the_answers_are_not_kept(tmp_path, caplog):
    import logging

    s = SqliteCacheStorage(tmp_path / "c" / "responses.sqlite3")
    try:
        pages = s._db.execute("PRAGMA page_count").fetchone()[0]
        s._db.execute(f"PRAGMA max_page_count = {pages}")  # sqlite's own 'database or disk is full'
        with caplog.at_level(logging.WARNING, logger="batchrun.worker"):
            for i in range(3):
                s.put(f"{i:064x}", b"x" * 20_000, 60, 10**9)
                _written_behind(s)
        said = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
        assert len(said) == 1 and "full" in said[0] and str(s.path) in said[0]
        assert s.get(f"{0:064x}") is None
        s._db.execute("PRAGMA max_page_count = 1073741823")
        s.put("f" * 64, b"y", 60, 10**9)
        _written_behind(s)
        assert s.get("f" * 64) == b"y"
    finally:
        s.close()


def test_the_flush_at_exit_waits_for_the_writer_threads_flush_to_commit(tmp_path, monkeypatch):
    """The writer thread is a daemon: the interpreter stops it after the atexit flush. A flush at
    exit that found nothing waiting because the writer had just taken the answers must wait for
    that commit, or a run's last answers are lost and its rerun sends them again."""
    import sqlite3

    path = tmp_path / "responses.sqlite3"
    storage = SqliteCacheStorage(path)
    entered, release = threading.Event(), threading.Event()
    real = storage._put_one

    def slow(*args):
        entered.set()
        release.wait(10)
        real(*args)

    monkeypatch.setattr(storage, "_put_one", slow)
    storage.put("k", b"BRC1 value", 60, 1 << 20)
    threading.Thread(target=storage.flush, daemon=True).start()
    assert entered.wait(10)  # a flush (this thread's or the writer's) holds the answer, not committed
    threading.Timer(0.2, release.set).start()
    storage._flush_or_warn()  # as atexit calls it
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 1
    finally:
        db.close()
        storage.close()
