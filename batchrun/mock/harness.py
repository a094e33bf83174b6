"""Ways to run a mock server: in a background thread (tests, benchmarks) or in the foreground."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

from batchrun.mock.app import MOCK_KEY, MockOpenAI, create_app, start_app
from batchrun.mock.config import MockConfig


class MockServerThread:
    """Runs a mock server in a background thread on 127.0.0.1 and a free port.

    ::

        with MockServerThread(rpm=60) as srv:
            OpenAI(base_url=srv.base_url, api_key="sk-test")
    """

    def __init__(
        self, config: MockConfig | None = None, *, host: str = "127.0.0.1", port: int = 0, **changes: Any
    ) -> None:
        self.config = dataclasses.replace(config or MockConfig(), **changes)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._mock: MockOpenAI | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> MockServerThread:
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name="mock-openai", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = create_app(self.config)
        self._mock = app[MOCK_KEY]
        try:
            runner, self.port = loop.run_until_complete(start_app(app, self.host, self.port))
        except BaseException as exc:  # e.g. port in use: re-raised in start()
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            # Requests still being answered (a slow latency) end with the server, quietly.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` in the server's loop, where all its state lives, and return the result."""

        async def call() -> Any:
            return fn(*args)

        assert self._loop is not None, "server not started"
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)

    def stats(self) -> dict:
        return self._call(lambda: self._mock.stats.snapshot())

    def reset(self) -> None:
        self._call(lambda: self._mock.reset())

    def set_config(self, **changes: Any) -> None:
        """Change config fields while the server runs, e.g. ``set_config(error_rates={"500": 1.0})``."""
        self.config = dataclasses.replace(self.config, **changes)  # validates before touching the server
        if self._loop is not None:
            self._call(self._mock.configure, self.config)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop = self._thread = None

    def __enter__(self) -> MockServerThread:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def serve(host: str, port: int, config: MockConfig) -> None:
    """Serve until Ctrl-C (blocking)."""

    async def main() -> None:
        runner, bound = await start_app(create_app(config), host, port)
        rpm = config.rpm or "unlimited"
        tpm = config.tpm or "unlimited"
        print(f"mock OpenAI server on http://{host}:{bound}/v1 (rpm={rpm}, tpm={tpm})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
