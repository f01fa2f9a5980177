"""``python -m deploy_app.node.child NODE_PID ARGS...``: become ``python -m deploy_app ARGS...``, bound to the node.

The kernel kills this process (SIGKILL) when the node thread that started it dies, so a node killed with kill -9
leaves no deploy app running on behind it: the study is run again, whole, by the restarted node.  Linux only
(prctl PR_SET_PDEATHSIG); elsewhere the child runs unbound.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    node_pid, arguments = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != node_pid:  # the node died before the binding took hold
            return 137
    os.execv(sys.executable, [sys.executable, "-m", "deploy_app", *arguments])
    return 1  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
