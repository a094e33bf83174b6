"""The ``batchrun`` command: a thin shell over the library in ``batchrun.ops``.

This module holds the click group (logging, --config, expected errors as one sentence);
each command family lives in its own module beside it.
"""

from __future__ import annotations

import logging
import os

import click
from click.core import ParameterSource

from batchrun import __version__
from batchrun.cli import cache as cache_cli
from batchrun.cli import dashboard, endpoints, estimate, manage, priority, resume, submit_run, watch, worker
from batchrun.cli.config import load_config
from batchrun.cli.helpers import fail
from batchrun.endpoints import CONFIG_ENV
from batchrun.ops import hints
from batchrun.cli.verbosity import lift_verbosity
from batchrun.state.connections import ENV_URL, db_out_of_range, describe


# Libraries whose INFO and DEBUG lines only -vv shows (RQ sets its own loggers' levels, so each is named).
NOISY = ("httpx2", "httpx", "openai", "rq", "rq.worker", "rq.job", "rq.queue", "rq.scheduler", "rq.registry",
         "asyncio", "aiohttp.access")


def setup_logging(verbosity: int) -> None:
    """-q: warnings and errors only; -v: batchrun's own detail; -vv: every library's too."""
    level = logging.DEBUG if verbosity > 1 else logging.WARNING if verbosity < 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)  # also when logging was configured before (tests invoke main again)
    from batchrun.ops import progress

    progress.QUIET = verbosity < 0
    logging.getLogger("batchrun").setLevel(logging.DEBUG if verbosity == 1 else logging.NOTSET)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING if verbosity < 2 else logging.NOTSET)


class Group(click.Group):
    """Expected trouble becomes one sentence, not a stack trace."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, lift_verbosity(self, list(args)))

    def invoke(self, ctx):
        import redis

        from batchrun.files.outputs import OutputFileError
        from batchrun.state.cache_storage import CacheUnavailable

        from batchrun.state import connections

        try:
            return super().invoke(ctx)
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:  # before ConnectionError
            fail(f"{describe(connections.last_url or '')} refused batchrun's credentials ({exc}); give the right "
                 f"user and password in --redis-url / {ENV_URL} (redis://USER:PASSWORD@HOST:6379/0)")
        except redis.InvalidResponse:
            fail(f"{describe(connections.last_url or '')} does not answer as a Redis server (another service on "
                 f"that port?); check the host and port in --redis-url / {ENV_URL}")
        except redis.exceptions.NoPermissionError as exc:
            fail(f"the Redis user of {describe(connections.last_url or '')} may not run what batchrun needs "
                 f"({exc}); give a user with these permissions in --redis-url / {ENV_URL}")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            fail(f"cannot reach Redis ({exc}); check --redis-url / {ENV_URL} and that the server runs")
        except redis.ResponseError as exc:
            if not db_out_of_range(exc):
                raise
            fail(f"{describe(connections.last_url or '')} names a database this Redis server does not have (a Redis "
                 f"has 16 by default, 0 to 15): give another one in --redis-url / {ENV_URL}", 2)
        except OutputFileError as exc:
            fail(str(exc))
        except CacheUnavailable as exc:  # `cache stats|clear` on a file that is not a database
            fail(str(exc))
        except KeyboardInterrupt:  # a Ctrl-C before the command's own handling (run's starts at its submit)
            fail("interrupted", 130)  # as a shell reports it, not click's "Aborted!" and exit 1


@click.group(cls=Group, context_settings={"auto_envvar_prefix": "BATCHRUN", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", count=True, help="Show each retry and more.")
@click.option("-q", "--quiet", count=True, help="Only warnings and errors.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="BATCHRUN_CONFIG",
              help="TOML file of option defaults (env BATCHRUN_CONFIG).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int, config_path: str | None) -> None:
    """Run bulk OpenAI requests from JSONL files at the speed your rate limits allow.

    Every option can also come from the environment, as BATCHRUN_<COMMAND>_<OPTION>
    (e.g. BATCHRUN_WORKER_CONCURRENCY=200, BATCHRUN_SUBMIT_TPM="gpt-4o-mini=2000000"),
    or from a TOML file given with --config.
    """
    setup_logging(verbose - quiet)
    if config_path:
        ctx.default_map = load_config(config_path, main)
        # Its [[endpoints]] are read where requests are sent: this process's runners, and the workers it starts
        # (for this command only: main() called again in one process starts from what it was).
        before = os.environ.get(CONFIG_ENV)
        os.environ[CONFIG_ENV] = os.path.abspath(config_path)
        ctx.call_on_close(lambda: os.environ.pop(CONFIG_ENV, None) if before is None
                          else os.environ.__setitem__(CONFIG_ENV, before))
        if ctx.get_parameter_source("config_path") is ParameterSource.COMMANDLINE:
            # Printed commands name it too (from BATCHRUN_CONFIG, the shell keeps it for them).
            printed_before = hints.given_config(os.path.abspath(config_path))
            ctx.call_on_close(lambda: hints.given_config(printed_before))


def _lift_verbosity(args: list[str]) -> list[str]:
    return lift_verbosity(main, args)


for _command in (submit_run.submit, worker.worker, watch.collect, submit_run.run, watch.status, watch.list_batches,
                 resume.resume, manage.cancel, manage.purge, manage.limits, estimate.estimate, endpoints.endpoints,
                 priority.priority):
    main.add_command(_command)
main.add_command(dashboard.dashboard)
main.add_command(cache_cli.cache_group)


def _add_mock_server() -> None:
    from batchrun.cli.mock import mock_server_command

    main.add_command(mock_server_command)


_add_mock_server()
