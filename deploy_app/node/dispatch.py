"""Running jobs on an existing Ray cluster (``ray_address``) instead of in the node's own child processes.

The node connects once, at start-up, as a Ray driver.  Each job becomes one Ray task asking for ``ray_num_cpus``
CPUs and ``ray_num_gpus`` GPUs; it receives the study's instance files as bytes (the cluster's machines do not see
the spool), writes them into a temporary folder on its worker, runs the deploy app there exactly as the node runs it
locally (``python -m deploy_app -i ... -o ...``, bound to the worker process, so a cancelled task leaves no deploy
app behind) and returns its exit code, the tail of its log and the files of its output folder.  The node writes them
into the job's attempt folder; from there on a run on the cluster ends as a local one does (``deploy_app.node.worker``).

The node's code (``ctfm_engine`` and ``deploy_app``) travels with each task (Ray's ``py_modules``): the workers need
only the deploy app's third-party packages and the node's Ray version.  A model given as a folder must be at the
same path on every worker (shared storage, or the same image); a worker without it fails the job with that reason.

The node's queue stays the only record: a node killed while a task runs finds the job ``running`` at its next start
and runs it again (Ray ends the tasks of a driver that died); the job timeout and a node stop cancel the task.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ctfm_engine.errors import UsageError
from deploy_app.node.config import NodeConfig
from deploy_app.node.spool import Spool
from deploy_app.node.worker import ERROR_PREFIX, app_environment, app_settings, child_command

log = logging.getLogger("deploy_app.node")

TESTED_RAY = "2.60.0"
NAMESPACE = "ctfm-node"
CONNECT_TIMEOUT_S = 5.0
POLL_S = 0.5
LOG_TAIL_BYTES = 64 * 1024
RULES_NAME = "selection-rules"
SCRATCH_PREFIX = "ctfm-job-"  # then the worker's process id: a cancelled task's folder is removed by the next task


@dataclass(frozen=True)
class WorkerRun:
    """What one task brings back from its worker: the deploy app's exit code, the tail of its log (stdout and stderr
    together), its output folder's files by relative path, and where it ran."""

    exit_code: int
    log: bytes
    files: dict[str, bytes]
    node_id: str
    host: str


def run_on_worker(instances: dict[str, bytes], settings: list[str], rules: bytes | None, rules_suffix: str,
                  model_folders: list[str]) -> WorkerRun:
    """The body of a job's Ray task, on the worker: the deploy app on ``instances`` (file name: bytes) with
    ``settings`` and, when given, the node's selection rules (``rules``, the file's bytes)."""
    import ray

    node_id, host = ray.get_runtime_context().get_node_id(), socket.gethostname()
    missing = [folder for folder in model_folders if not Path(folder).is_dir()]
    if missing:
        line = (f"{ERROR_PREFIX}the model folder {missing[0]} is not on the Ray worker {host}: put it on storage "
                "every worker mounts at the same path, or in the workers' image\n")
        return WorkerRun(4, line.encode(), {}, node_id, host)
    _remove_abandoned_scratch()
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        input_folder, output_folder = Path(scratch, "input"), Path(scratch, "output")
        input_folder.mkdir()
        for name, data in instances.items():
            (input_folder / name).write_bytes(data)
        if rules is not None:
            rules_path = Path(scratch, RULES_NAME + rules_suffix)
            rules_path.write_bytes(rules)
            settings = [*settings, "--rules", str(rules_path)]
        log_path = Path(scratch, "app.log")
        with log_path.open("wb") as stream:  # in the scratch folder: the app imports the code shipped with the task
            code = subprocess.run(child_command(os.getpid(), input_folder, output_folder, settings), stdout=stream,
                                  stderr=subprocess.STDOUT, env=app_environment(os.environ), cwd=scratch,
                                  check=False).returncode
        with log_path.open("rb") as stream:
            stream.seek(max(0, log_path.stat().st_size - LOG_TAIL_BYTES))
            tail = stream.read()
        files = {str(path.relative_to(output_folder)): path.read_bytes()
                 for path in sorted(output_folder.rglob("*")) if path.is_file()} if code == 0 else {}
    return WorkerRun(code, tail, files, node_id, host)


def _remove_abandoned_scratch() -> None:
    """Remove the scratch folders of workers that died in a task (a cancelled or timed-out job leaves its own)."""
    for folder in Path(tempfile.gettempdir()).glob(SCRATCH_PREFIX + "*"):
        owner = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not owner.isdigit():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


class RayDispatcher:
    """The node's connection to a Ray cluster; :meth:`run` runs one job there, from any of the node's threads."""

    def __init__(self, config: NodeConfig, ray: Any) -> None:
        self.config = config
        self.ray = ray
        self._task = ray.remote(run_on_worker).options(num_cpus=config.ray_num_cpus, num_gpus=config.ray_num_gpus,
                                                        max_retries=0)
        self._running: set[Any] = set()
        self._lock = threading.Lock()

    def run(self, input_folder: Path, output: Path, log_path: Path, stopping: threading.Event
            ) -> tuple[int, bool, str]:
        """Run the deploy app on the instances of ``input_folder`` as a Ray task; write its log to ``log_path`` and,
        when it exited 0, its files into ``output``: (exit code, whether the job timeout stopped it, where it ran).

        Raises RuntimeError when the cluster lost the task (its worker or machine died)."""
        config = self.config
        instances = {path.name: path.read_bytes() for path in sorted(input_folder.iterdir()) if path.is_file()}
        rules = config.rules.read_bytes() if config.rules is not None else None
        models = [model for model in (config.model, config.triage_model) if model and Path(model).is_dir()]
        reference = self._task.remote(instances, app_settings(replace(config, rules=None)), rules,
                                      config.rules.suffix if config.rules else "", models)
        with self._lock:
            self._running.add(reference)
        try:
            deadline = time.monotonic() + config.job_timeout_minutes * 60
            while not self.ray.wait([reference], timeout=POLL_S)[0]:
                if stopping.is_set() or time.monotonic() > deadline:
                    self.ray.cancel(reference, force=True)
                    return -9, not stopping.is_set(), "ray"
            try:
                result: WorkerRun = self.ray.get(reference)
            except self.ray.exceptions.RayError as error:
                if stopping.is_set():
                    return -9, False, "ray"
                raise RuntimeError(f"the Ray cluster lost the job's task: {_first_line(error)}") from None
        finally:
            with self._lock:
                self._running.discard(reference)
        spool = Spool(output.parent)
        spool.write_durably(log_path, result.log)
        for name, data in result.files.items():
            spool.write_durably(output / name, data)
        return result.exit_code, False, f"ray:{result.node_id}"

    def cancel_all(self) -> None:
        """Cancel every task still running (the node stops)."""
        with self._lock:
            running = list(self._running)
        for reference in running:
            self.ray.cancel(reference, force=True)

    def close(self) -> None:
        self.ray.shutdown()


def connect(config: NodeConfig) -> RayDispatcher:
    """Connect to the Ray cluster at ``config.ray_address`` (``HOST:PORT`` or ``auto``), shipping the node's code."""
    address = config.ray_address
    try:
        import ray
    except ImportError:
        raise UsageError(f"ray_address is set but the ray package is missing from the node's environment: pip install "
                         f"ray=={TESTED_RAY} (the cluster's version)") from None
    if address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"ray_address {address!r} is not HOST:PORT (the Ray head's GCS port) or auto")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise UsageError(f"cannot reach the Ray cluster at {address}: {error.strerror or error}") from None
    import ctfm_engine
    import deploy_app

    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING",
                 runtime_env={"py_modules": [ctfm_engine, deploy_app], "excludes": ["__pycache__"]})
    except Exception as error:  # ConnectionError, an authentication error, a version mismatch: all say why
        raise UsageError(f"cannot reach the Ray cluster at {address}: {_first_line(error)}") from None
    log.info("jobs run on the Ray cluster at %s (%d node(s)), each asking for %g CPU(s) and %g GPU(s)", address,
             len(ray.nodes()), config.ray_num_cpus, config.ray_num_gpus)
    return RayDispatcher(config, ray)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
