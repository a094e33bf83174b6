"""Redis connections: a real server by URL, or an in-process one.

``memory://`` (the default when no URL is configured) means fakeredis in this
process: zero set-up, but only workers in this process can see it.
"""

from __future__ import annotations

import os
import threading

import redis

from batchrun.urls import mask_url

MEMORY_URL = "memory://"
ENV_URL = "BATCHRUN_REDIS_URL"

_fake_servers: dict[str, object] = {}
last_url: str | None = None  # the URL of the last connection made, for messages about it
_lock = threading.Lock()


def resolve_url(url: str | None) -> str:
    return url or os.environ.get(ENV_URL) or MEMORY_URL


SCHEMES = ("redis://", "rediss://", "unix://")


def check_url(url: str) -> str | None:
    """Pure: why ``url`` cannot be a Redis URL (one sentence, the URL masked), or None if it can.
    Whether its database exists is for the server to say (see ``db_out_of_range``)."""
    from urllib.parse import parse_qs, urlsplit

    shown = mask_url(url)
    if is_memory(url):
        return None
    if not url.startswith(SCHEMES):
        hint = f"; did you mean redis://{url}" if "://" not in url else ""
        return f"{shown!r} is not a Redis URL: it must start with redis://, rediss:// or unix://{hint}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return f"{shown!r} is not a Redis URL: its port must be a number from 1 to 65535"
    db = parts.path.lstrip("/") if not url.startswith("unix://") else ""
    db = db or (parse_qs(parts.query).get("db") or [""])[0]
    if db and not (db.isdigit() and int(db) < 2**31):
        return f"{shown!r}: the database after the host must be a number (redis://HOST:6379/0), not {db!r}"
    return None


def db_out_of_range(exc: Exception) -> bool:
    """The server's answer to a SELECT of a database it does not have."""
    return "DB index is out of range" in str(exc)


def is_memory(url: str) -> bool:
    return url.startswith("memory://")


def connect(url: str | None = None) -> redis.Redis:
    """A Redis client for ``url`` (``memory://NAME`` shares one fakeredis per NAME in this process)."""
    global last_url
    url = last_url = resolve_url(url)
    if is_memory(url):
        import fakeredis

        with _lock:
            server = _fake_servers.setdefault(url, fakeredis.FakeServer())
        return fakeredis.FakeRedis(server=server, connection_class=_direct_connection_class())
    # socket_timeout bounds every command; RQ raises it for its own blocking pops.
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30)


def after_interrupt(client: redis.Redis) -> None:
    """Call before a thread that caught a KeyboardInterrupt uses ``client`` again (`run` goes on to
    collect, count and print the command that continues). Landing between a command's send and the
    read of its reply, the interrupt leaves the reply on a connection that redis-py gives back to
    the pool, and its check for that is off while its maintenance notifications are "auto" (its
    default): every later command on it would read the reply of the one before (an HGETALL answered
    with an LRANGE's list, on a real Redis). The idle connections are dropped; the next command
    connects again. (Those in use by other threads are theirs, and were not cut.)"""
    client.connection_pool.disconnect(inuse_connections=False)


_direct_class = None
_MAIN_THREAD = threading.main_thread().ident
_in_redis = 0  # the main thread's depth in calls to the in-process Redis
_held = False  # an interrupt came during one: raised once it is done


def interrupt_unless_in_redis(signum, frame) -> None:
    """A SIGINT/SIGTERM handler for a process whose worker threads share an in-process Redis with
    its main thread (`run`): KeyboardInterrupt at once, except while the main thread is inside a
    call to that Redis, where it is held and raised as the call returns. Its server side runs in
    the calling thread under Python-level locks (threading.Condition, queue.Queue): one raised in
    there (at the entry of a Condition's ``__exit__``, say) leaves a lock held for good, and the
    next command, this thread's or a worker's, waits on it for ever."""
    global _held
    if _in_redis:
        _held = True
        return
    raise KeyboardInterrupt


class _Uninterrupted:
    """The body of a call to the in-process Redis, during which the main thread holds an interrupt."""

    def __enter__(self) -> None:
        global _in_redis
        if threading.get_ident() == _MAIN_THREAD:
            _in_redis += 1

    def __exit__(self, *exc) -> None:
        global _in_redis, _held
        if threading.get_ident() == _MAIN_THREAD:
            _in_redis -= 1
            if _held and not _in_redis:
                _held = False
                raise KeyboardInterrupt  # the Ctrl-C that came meanwhile, now that the call is done


_UNINTERRUPTED = _Uninterrupted()


def _direct_connection_class():
    """fakeredis's connection, minus its socket emulation: a command goes to the fake server as
    its list of arguments, not packed into RESP and parsed back (fakeredis's parser costs grow
    with the square of one command's size, and submit, lease and complete send hundreds of jobs
    in one). Replies, blocking commands, transactions and pub/sub take fakeredis's own path."""
    global _direct_class
    if _direct_class is None:
        from fakeredis import FakeRedisConnection

        class DirectConnection(FakeRedisConnection):
            def connect(self) -> None:
                # The pool connects each connection it hands out: one holding replies nobody read (a
                # Ctrl-C landed between a send and its reads) starts again, or its next command would
                # read them. (redis-py's own check for this is off while its maintenance
                # notifications are "auto", its default.) In this process, where a command runs in
                # the interrupted thread itself, such a cut is far from rare.
                with _UNINTERRUPTED:
                    sock = self._sock
                    if sock is not None and sock.responses is not None and not sock.responses.empty():
                        self.disconnect()
                    super().connect()

            def disconnect(self, *args, **kwargs) -> None:
                with _UNINTERRUPTED:
                    super().disconnect(*args, **kwargs)

            def can_read(self, *args, **kwargs) -> bool:
                with _UNINTERRUPTED:
                    return super().can_read(*args, **kwargs)

            def read_response(self, *args, **kwargs):
                with _UNINTERRUPTED:
                    return super().read_response(*args, **kwargs)

            def send_command(self, *args, **kwargs) -> None:
                self.send_packed_command(self.pack_command(*args), check_health=kwargs.get("check_health", True))

            def pack_command(self, *args) -> list[_Command]:
                return [_Command(_arguments(self.encoder, args))]

            def pack_commands(self, commands) -> list[_Command]:
                return [_Command(_arguments(self.encoder, args)) for args in commands]

            def send_packed_command(self, command, check_health: bool = True) -> None:
                if not (isinstance(command, list) and command and isinstance(command[0], _Command)):
                    return super().send_packed_command(command, check_health)
                if not self._sock:
                    self.connect_check_health(check_health=False)
                sock = self._sock
                try:
                    with _UNINTERRUPTED:
                        for item in command:
                            if not sock._server or not sock._server.connected or sock._killed:
                                raise redis.ConnectionError("Connection closed by server.")
                            sock._process_command(item.arguments)
                except BaseException:
                    # As redis-py's own send: a batch cut short (a Ctrl-C between a MULTI and its
                    # EXEC, say) must not go back to the pool half done. Its client would be left
                    # inside the transaction, and every later command on it, this thread's or a
                    # worker thread's (they share the pool), would be answered QUEUED or with
                    # another command's reply.
                    self.disconnect()
                    raise

        _direct_class = DirectConnection
    return _direct_class


def _arguments(encoder, args: tuple) -> list[bytes]:
    """A command's arguments as bytes, as redis-py's packer makes them: a first argument may hold
    words of the command ("CONFIG GET")."""
    if isinstance(args[0], str):
        args = tuple(args[0].encode().split()) + args[1:]
    elif b" " in args[0]:
        args = tuple(args[0].split()) + args[1:]
    encode = encoder.encode
    return [bytes(a) if isinstance(a, (bytearray, memoryview)) else encode(a) for a in args]


class _Command:
    """One command's arguments, as the direct connection hands them to the fake server."""

    __slots__ = ("arguments",)

    def __init__(self, arguments: list[bytes]):
        self.arguments = arguments


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    if is_memory(url):
        return "in-process Redis (fakeredis)"
    return mask_url(url)
