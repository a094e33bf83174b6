"""The Lua scripts in ``batchrun/state/lua``, loaded once per connection.

Each script is one atomic state change that several workers may race on; its
KEYS/ARGV contract is at the top of its file. Each is loaded behind one shared
prelude (``lua/_prelude.lua``: reading Redis ``TIME``, so workers on machines with
skewed clocks still agree), which no script repeats.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from redis.commands.core import Script

NAMES = ("add_jobs", "lease", "complete", "requeue", "renew", "reclaim", "park", "promote", "reserve",
         "cool_down", "circuit", "set_state", "settle", "observe", "release_held", "level", "reserve_cost", "metrics",
         "expire_batch", "error_outcomes", "slot_acquire", "slot_release", "slot_renew", "day_take", "day_spent",
         "day_give_back", "set_priority", "to_front", "cache_put", "cache_delete", "cache_release", "serve_cached",
         "finish_ended")


PRELUDE = "_prelude"
LIBRARIES = {"reserve": ("_fairshare",)}  # shared Lua a script needs, put between the prelude and it


def _read(name: str) -> str:
    return resources.files("batchrun.state").joinpath("lua", f"{name}.lua").read_text()


@lru_cache(maxsize=None)
def source(name: str) -> str:
    """The script as Redis runs it: the prelude, then the script's own file."""
    return "\n".join(_read(part) for part in (PRELUDE, *LIBRARIES.get(name, ()), name))


class Scripts:
    """Registered scripts for one Redis client: ``scripts.lease(keys=…, args=…)``."""

    def __init__(self, redis):
        for name in NAMES:
            setattr(self, name, redis.register_script(source(name)))

    add_jobs: Script
    lease: Script
    complete: Script
    requeue: Script
    renew: Script
    reclaim: Script
    park: Script
    promote: Script
    reserve: Script
    cool_down: Script
    circuit: Script
    set_state: Script
    settle: Script
    observe: Script
    release_held: Script
    level: Script
    reserve_cost: Script
    metrics: Script
    expire_batch: Script
    error_outcomes: Script
    slot_acquire: Script
    slot_release: Script
    slot_renew: Script
    day_take: Script
    day_spent: Script
    day_give_back: Script
    set_priority: Script
    to_front: Script
    cache_put: Script
    cache_delete: Script
    cache_release: Script
    serve_cached: Script
    finish_ended: Script
