"""``trainer search``: see :mod:`dnn_tricks.search`."""

from __future__ import annotations

from collections.abc import Sequence

from dnn_tricks.search import parse_search_config, run_search


def main(argv: Sequence[str]) -> None:
    """Entry point of ``trainer search`` (argv without the ``search`` word)."""
    run_search(parse_search_config(list(argv)))
