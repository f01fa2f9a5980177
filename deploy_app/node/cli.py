"""The node's command line: ``python -m deploy_app serve ...``, ``status --spool DIR`` and ``requeue``.

    serve --ae-title AET --port N --spool DIR --pacs URL [--allow-ae AET...] [--quiet-seconds S] [--config FILE]
          [--model M] [--workers N] [--health-port N] [--tls-cert PEM --tls-key PEM [--tls-ca PEM]]
          [--stow-port N] [--ray-address HOST:PORT]
    status --spool DIR [--json]
    requeue --spool DIR (JOB... | --failed)

``serve`` runs until SIGTERM or SIGINT; its flags override the ``--config`` file (TOML; its keys are the settings
of ``deploy_app.node.config.NodeConfig``: the flags' names with underscores, and more).  ``requeue`` tells the node
(running or not) to try again jobs that cannot go on by themselves: a failed or refused job runs again once its
cause is fixed (a model, a rule, a setting), one whose results the PACS refused is delivered again, one waiting for
the PACS is tried at once.  Exit codes: 0 stopped normally (serve), reported (status) or requeued (requeue); 2 usage
(a bad setting, the port taken, another node on the spool, a job that cannot be requeued); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctfm_engine.errors import guarded

log = logging.getLogger("deploy_app.node")

URL_HELP = "http(s)://HOST:PORT/dicom-web (DICOMweb) or dicom://CALLED_AET@HOST:PORT (DIMSE), as `ctfm pacs` takes"


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the DICOM node: receive studies, process them, send results back")
    serve.add_argument("--ae-title", metavar="AET", help="the AE title the node answers to")
    serve.add_argument("--port", type=int, metavar="N", help="the DICOM port it listens on")
    serve.add_argument("--spool", type=Path, metavar="DIR", help="its spool folder: instances, queue, results, logs")
    serve.add_argument("--pacs", metavar="URL", help=f"where results go: {URL_HELP}")
    serve.add_argument("--allow-ae", nargs="+", metavar="AET",
                       help="calling AE titles allowed to store (default: any, with a warning)")
    serve.add_argument("--allow-host", nargs="+", metavar="NET",
                       help="addresses or networks (10.1.0.0/16) senders may call from (default: any)")
    serve.add_argument("--quiet-seconds", type=float, metavar="S",
                       help="a study is complete when no instance of it arrived for S seconds (30)")
    serve.add_argument("--config", type=Path, metavar="FILE", help="a TOML file of settings; flags override it")
    serve.add_argument("--model", metavar="M", help="the segmentation model (as the deploy app's -m)")
    serve.add_argument("--workers", type=int, metavar="N", help="studies processed at a time (1)")
    serve.add_argument("--health-port", type=int, metavar="N", help="serve GET /health and /metrics on this port")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="listen with DICOM TLS: the node's certificate")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="... and its private key")
    serve.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="... and require senders' certificates signed by this CA")
    serve.add_argument("--stow-port", type=int, metavar="N",
                       help="also take studies by DICOMweb STOW-RS (POST /studies) on this port")
    serve.add_argument("--ray-address", metavar="HOST:PORT",
                       help="run each job as a task on this Ray cluster (or 'auto') instead of local workers")


def run_serve(options: argparse.Namespace) -> int:
    from deploy_app.node.config import load_config
    from deploy_app.node.service import Node

    def serve() -> None:
        overrides = {"ae_title": options.ae_title, "port": options.port, "spool": options.spool,
                     "pacs": options.pacs, "allow_ae": options.allow_ae, "allow_hosts": options.allow_host,
                     "quiet_seconds": options.quiet_seconds,
                     "model": options.model, "workers": options.workers, "health_port": options.health_port,
                     "tls_cert": options.tls_cert, "tls_key": options.tls_key, "tls_ca": options.tls_ca,
                     "stow_port": options.stow_port, "ray_address": options.ray_address}
        Node(load_config(options.config, overrides)).serve()

    code, _ = guarded(serve, _report, log=log)
    return code


def add_status_parser(commands: Any) -> None:
    status = commands.add_parser("status", help="the node's queue by state, last errors and throughput")
    status.add_argument("--spool", type=Path, required=True, metavar="DIR", help="the node's spool folder")
    status.add_argument("--json", action="store_true", help="print one JSON document")


def run_status(options: argparse.Namespace) -> int:
    from deploy_app.node.status import human_lines, node_status

    code, document = guarded(lambda: node_status(options.spool), _report, log=log)
    if document is not None:
        print(json.dumps(document, indent=1) if options.json else "\n".join(human_lines(document)))
    return code


def add_requeue_parser(commands: Any) -> None:
    requeue = commands.add_parser("requeue", help="try failed or refused jobs again (after fixing their cause)")
    requeue.add_argument("--spool", type=Path, required=True, metavar="DIR", help="the node's spool folder")
    requeue.add_argument("jobs", type=int, nargs="*", metavar="JOB", help="job numbers, as `status` lists them")
    requeue.add_argument("--failed", action="store_true", help="every failed job")


def run_requeue(options: argparse.Namespace) -> int:
    from deploy_app.node.status import requeue_jobs

    def requeue() -> list[str]:
        return requeue_jobs(options.spool, options.jobs, every_failed=options.failed)

    code, lines = guarded(requeue, _report, log=log)
    for line in lines or []:
        print(line)
    return code


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy_app", description="the CT-FM DICOM node")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(commands)
    add_status_parser(commands)
    add_requeue_parser(commands)
    options = parser.parse_args(list(argv))
    return {"serve": run_serve, "status": run_status, "requeue": run_requeue}[options.command](options)


def _report(code: int, message: str, error: BaseException) -> None:
    print(f"deploy_app: error: {message}", file=sys.stderr)
