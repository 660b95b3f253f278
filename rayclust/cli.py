"""What every job script shares: argument parsing that fails in one line, and error reporting."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from rayclust.errors import UserError

VERBOSE_ENV = "RAYCLUST_VERBOSE"  # "1": Ray's own log lines too (rayclust.runtime.init_ray reads it)


class JobArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2, and a flag must be spelt
    out in full (``--epoch 5`` is an error, not ``--epochs``). Every job has ``--verbose``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true",
                          help="also print Ray's own log lines and progress bars (default: off: the job's own "
                               "lines, and warnings and errors)")

    def add_argument(self, *args, **kwargs):
        if kwargs.get("required"):  # --help states every flag's default, or that it has none
            kwargs["help"] = f"{kwargs.get('help', '')} (required)"
        return super().add_argument(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if parsed.verbose:  # the jobs start Ray deep in library code: it reads this from the environment
            os.environ[VERBOSE_ENV] = "1"
        return parsed, rest

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


@dataclass(frozen=True)
class ClusterRange:
    """The K to choose from (``rayclust.choose_k``), both ends included."""

    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.first}:{self.last}"


AUTO_CLUSTERS = ClusterRange(2, 50)


def cluster_count(text: str) -> int | ClusterRange:
    """An argparse ``type``: K (an integer >= 2), ``auto`` (AUTO_CLUSTERS) or a range ``A:B`` (2 <= A < B)."""
    if text == "auto":
        return AUTO_CLUSTERS
    first, colon, last = text.partition(":")
    if not first.isdecimal() or (colon and not last.isdecimal()):
        raise argparse.ArgumentTypeError(f"expected K (an integer >= 2), auto or A:B, got {text!r}")
    if not colon:
        return at_least(2)(text)
    if not 2 <= int(first) < int(last):
        raise argparse.ArgumentTypeError(f"a range A:B needs 2 <= A < B, got {text!r}")
    return ClusterRange(int(first), int(last))


def fraction(text: str) -> float:
    """An argparse ``type``: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def add_thumbnails_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-thumbnails``, for the jobs that embed (``features.THUMBNAIL_PIXELS``)."""
    parser.add_argument("--no-thumbnails", dest="thumbnails", action="store_false",
                        help="do not store a 96 px JPEG thumbnail of each image beside its features (the report "
                             "then shows no pictures; default: stored, about 3 KB per image)")


def user_error(exn: BaseException) -> UserError | None:
    """``exn`` if it is a UserError, else the UserError that Ray wrapped in it, if any: a Ray task's
    or actor's (``RayTaskError.cause``; Ray's subclass of it is also a UserError, but its message is
    the remote traceback), a Ray Train worker's (``WorkerGroupError.worker_failures``) or the Ray
    Train controller's (``ControllerError.controller_failure``). (Not a Ray Data function's: Ray Data
    passes it on as a UserCodeException that keeps only its traceback's text.)"""
    if isinstance(exn, UserError) and not hasattr(exn, "cause"):
        return exn
    wrapped = [getattr(exn, "cause", None), getattr(exn, "controller_failure", None),
               *getattr(exn, "worker_failures", {}).values()]
    for inner in wrapped:
        if isinstance(inner, BaseException) and (found := user_error(inner)) is not None:
            return found
    return None


def run_job(main: Callable[[], object]) -> None:
    """Run a job's main; user mistakes end as one line and exit status 1, not a traceback
    (a bad flag has already exited with 2 in the parser), also when a Ray worker raised them;
    so does an object store that stays down."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    try:
        main()
    except FileNotFoundError as exn:
        sys.exit(f"error: not found: {exn.filename or exn}")
    except PermissionError as exn:
        sys.exit(f"error: permission denied: {exn.filename or exn}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except Exception as exn:
        # imported here: rayclust.lake imports pyarrow, and jobs import this module before parsing flags
        from rayclust.lake import store_unreachable, unreachable_store_message

        problem = user_error(exn) or (unreachable_store_message() if store_unreachable(exn) else None)
        if problem is None:
            raise
        sys.exit(f"error: {problem}")
