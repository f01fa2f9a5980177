"""Errors a user can cause, the exit status of each, and the one boundary handler every face runs its work in.

The engine words an error in domain terms (what is wrong with which input or model).  Where the user can do
something about it, the error carries a ``remedy`` key (e.g. ``"accept_partial"``); each face turns that key into
its own words -- a CLI flag, a Slicer checkbox, a deploy-app setting -- with :func:`explain`.

Exit statuses (the ``ctfm`` command, ``python -m deploy_app`` and the Slicer worker share them): 0 success, 1 anything
else, 2 usage, 3 unacceptable input data, 4 model or weights problem, 130 cancelled or interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

INTERRUPTED_EXIT_CODE = 130


class CTFMError(Exception):
    """Base class: the message is one sentence saying what is wrong and where."""

    exit_code = 1

    def __init__(self, message: str, *, remedy: str | None = None) -> None:
        super().__init__(message)
        self.remedy = remedy  # a key a face words in its own terms (see explain)


class UsageError(CTFMError):
    """The request asks for something impossible (exit code 2)."""

    exit_code = 2


class InputError(CTFMError):
    """The input data is not acceptable: not CT, not DICOM, broken geometry, corrupt files (exit code 3)."""

    exit_code = 3


class ModelError(CTFMError):
    """A model or weights problem: missing, unreadable, wrong architecture or wrong keys (exit code 4)."""

    exit_code = 4


class Cancelled(CTFMError):
    """The run was cancelled by its caller (exit code 130, as for Ctrl-C); nothing was written."""

    exit_code = INTERRUPTED_EXIT_CODE


class PacsError(CTFMError):
    """A PACS could not be reached or refused an operation (exit code 1).

    The message is one sentence: which PACS (its address without credentials), which operation, what happened.
    ``transient`` tells whether trying again later may help (connection problems) or not (a refusal);
    ``document`` optionally holds the JSON-able report of what was done before the failure.
    """

    exit_code = 1

    def __init__(self, message: str, *, transient: bool = False, document: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.document = document


def exit_code_for(error: BaseException) -> int:
    """The documented exit status of any exception: the engine's classes carry theirs, Ctrl-C is 130, else 1."""
    if isinstance(error, CTFMError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED_EXIT_CODE
    return 1


def explain(error: BaseException, remedies: Mapping[str, str] | None = None) -> str:
    """The one-sentence message of ``error``, with the face's wording of its remedy appended when it has one."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; no partial output was left behind"
    if not isinstance(error, CTFMError):
        return f"unexpected {type(error).__name__}: {error}"
    message = str(error)
    remedy = (remedies or {}).get(error.remedy or "")
    return f"{message}; {remedy}" if remedy else message


def guarded(
    work: Callable[[], T],
    report: Callable[[int, str, BaseException], Any],
    *,
    remedies: Mapping[str, str] | None = None,
    log: logging.Logger | None = None,
) -> tuple[int, T | None]:
    """Run ``work`` at a face's boundary: (0, its result), or (exit status, None) after ``report(status, message,
    error)``.  Bugs (anything not a CTFMError) are reported in one line and their traceback logged at DEBUG."""
    try:
        return 0, work()
    except (CTFMError, KeyboardInterrupt) as error:
        code = exit_code_for(error)
        report(code, explain(error, remedies), error)
        return code, None
    except Exception as error:  # a bug, not a user error: one line here, the traceback in the debug log
        if log is not None:
            log.debug("traceback", exc_info=True)
        report(1, explain(error, remedies), error)
        return 1, None
