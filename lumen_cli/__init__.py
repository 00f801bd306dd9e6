"""The ``lumen`` command line, the top layer: it drives the library (:mod:`pipeline`), the perception
models (:mod:`perception`) and the Prefect flows (:mod:`flows`), none of which imports it.

``lumen_cli.main`` owns the top-level commands; ``lumen_cli.layouts``, ``lumen_cli.shards`` and
``lumen_cli.synthesis`` contribute command groups through a ``register(subparsers)`` function.
"""

from lumen_cli.main import main

__all__ = ["main"]
