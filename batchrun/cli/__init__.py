"""The ``batchrun`` command: click commands over the library in ``batchrun.ops``."""

from batchrun.cli.main import main

__all__ = ["main"]
