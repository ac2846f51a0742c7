"""``trainer ablate``: see :mod:`dnn_tricks.ablate`."""

from __future__ import annotations

from collections.abc import Sequence

from dnn_tricks.ablate import parse_ablate_config, run_ablation


def main(argv: Sequence[str]) -> None:
    """Entry point of ``trainer ablate`` (argv without the ``ablate`` word)."""
    run_ablation(parse_ablate_config(list(argv)))
