"""Progress reporting and cancellation for long runs, shared by the CLI, the Slicer module and the deploy app.

A progress callback receives ``(done, total)`` in the run's own units (windows, patches, scans).  A cancel check is
a ``threading.Event`` (cancelled when set) or any callable returning True to cancel; long loops call
:func:`check_cancelled` between steps, which raises :class:`Cancelled` so writers leave nothing behind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ctfm_engine.errors import Cancelled

__all__ = ["Progress", "CancelCheck", "Cancelled", "check_cancelled"]

Progress = Callable[[int, int], None]
CancelCheck = threading.Event | Callable[[], bool]


def check_cancelled(cancel: CancelCheck | None) -> None:
    if cancel is None:
        return
    cancelled = cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())
    if cancelled:
        raise Cancelled("cancelled; no partial output was left behind")
