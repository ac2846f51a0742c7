"""The ``trainer`` command: dispatches each subcommand to its module and turns the errors a
user can cause into one line with exit status 2. Subcommands depend on the application
(``app.py``), never the reverse."""

from __future__ import annotations

import logging
import re
import sys

from jsonargparse import ArgumentError

from dnn_tricks.redact import redact

USER_ERRORS = (ArgumentError, ValueError, TypeError, FileNotFoundError, FloatingPointError)
# What torch.distributed (gloo) raises in the processes of a DDP run whose peer died; that
# peer prints its own error, so the others say one line instead of a collective's traceback.
PEER_STOPPED = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def _one_line(error: BaseException) -> str:
    """The most specific line of a (possibly nested, multi-line) error message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # jsonargparse: 'Parser key "data.batch_size":' then the reason on the next line.
    key = re.match(r'Parser key "([^"]+)":', lines[0])
    if key and len(lines) > 1:
        reason = lines[1]
        if reason.startswith("Type ") and ": " in reason:
            reason = reason.split(": ", 1)[1]  # drop the long type name, keep what is wrong
        reason = re.sub(r"\.? Got value: Namespace\(.*$", "", reason)
        return f"{key.group(1)}: {reason}"
    return lines[0]


def _run(args: list[str]) -> None:
    command = args[0] if args else ""
    if command == "search":
        from dnn_tricks.commands.search import main as command_main
    elif command == "ablate":
        from dnn_tricks.commands.ablate import main as command_main
    elif command == "export":
        from dnn_tricks.commands.export import main as command_main
    elif command == "preview-augment":
        from dnn_tricks.commands.preview_augment import main as command_main
    elif command == "lr-find":
        from dnn_tricks.commands.lr_find import main as command_main
    elif command == "prepare-data":
        from dnn_tricks.commands.prepare_data import main as command_main
    else:
        from dnn_tricks.app import run_app as command_main

        command_main(args)
        return
    command_main(args[1:])


class _DropLightningTips(logging.Filter):
    """Lightning 2.6 logs a "💡 Tip" advertising its cloud logger whenever a Trainer is built
    without it; searches and ablations build many. The ``trainer`` command leaves it out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning_tips() -> None:
    """Drop Lightning's advertising lines (its rank-zero logger; nothing else it logs)."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLightningTips())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``trainer`` console script."""
    quiet_lightning_tips()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        _run(args)
    except USER_ERRORS as error:
        if debug:
            raise
        hint = "; see `trainer fit --help`" if isinstance(error, ArgumentError) else ""
        # one write, newline included: the ranks of a DDP run print at once, and a separate
        # write of the newline let their lines interleave
        line = redact(_one_line(error))  # a storage URL in the message loses its password
        sys.stderr.write(f"error: {line}{hint}  (--debug shows the traceback)\n")
        raise SystemExit(2) from None
    except RuntimeError as error:
        if debug or not any(text in str(error) for text in PEER_STOPPED):
            raise
        sys.stderr.write(
            "error: another process of this distributed run stopped (its error is above), so "
            "this one stops too  (--debug shows the traceback)\n"
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
