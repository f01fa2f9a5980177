"""Errors a user can cause, each carrying the exit code the `ctfm` command documents."""

from __future__ import annotations


class CTFMError(Exception):
    """Base class: the message is one sentence saying what, where and what to do."""

    exit_code = 1


class UsageError(CTFMError):
    """The command line asks for something impossible (exit code 2)."""

    exit_code = 2


class InputError(CTFMError):
    """The input data is not acceptable: not CT, not DICOM, broken geometry, corrupt files (exit code 3)."""

    exit_code = 3


class ModelError(CTFMError):
    """A model or weights problem: missing, unreadable, wrong architecture or wrong keys (exit code 4)."""

    exit_code = 4
