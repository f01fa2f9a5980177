"""``ctfm pacs``: check, search, fetch from and send to a PACS over DICOMweb or DIMSE, and deliver an outbox.

Actions: ``echo URL``, ``find URL [--study UID] [--modality M] [--series UID]``, ``fetch URL --study UID --series UID
--out DIR [--move-port N]``, ``send URL FILE_OR_FOLDER... [--outbox DIR] [--force]``, ``outbox DIR [--send [URL]]
[--force] [--due]``.  URL is ``http(s)://HOST:PORT/dicom-web``, ``dicom://CALLED_AET@HOST:PORT`` or
``dicom-tls://CALLED_AET@HOST:PORT``; ``--tls-ca``, ``--tls-cert``/``--tls-key`` and ``--token-file`` go with TLS
addresses and a DICOMweb bearer token.

Exit codes: 0 everything done (every file stored or already there); 1 the PACS could not be reached or refused
something (the message names the PACS, and says where the files not stored are kept); 2 usage; 3 a file to send is
not DICOM (the message names it).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctfm_engine.errors import InputError, UsageError

if TYPE_CHECKING:
    from ctfm_engine.dicom.outbox import Delivery
    from ctfm_engine.dicom.pacs import PacsClient, RetryPolicy, StoreReport

# pydicom, pynetdicom and dicomweb-client load when a pacs action runs, not with every `ctfm` command.
log = logging.getLogger("ctfm")

URL_HELP = ("http(s)://HOST:PORT/dicom-web (DICOMweb), dicom://CALLED_AET@HOST:PORT (DIMSE) or "
            "dicom-tls://CALLED_AET@HOST:PORT (DIMSE over TLS)")
MAX_RETRY_DELAY_S = 8.0


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    """Add ``ctfm pacs`` and its actions to the ``ctfm`` subcommands."""
    pacs = commands.add_parser("pacs", help="send results to a PACS and fetch series from it (DICOMweb or DIMSE)")
    actions = pacs.add_subparsers(dest="pacs_command", required=True, metavar="ACTION")
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--aet", metavar="TITLE", help="our own (calling) AE title for DIMSE (default CTFM)")
    connection.add_argument("--timeout", type=float, default=30.0, metavar="S",
                            help="seconds to wait for a connection and for each answer (30)")
    connection.add_argument("--retries", type=int, default=3, metavar="N",
                            help="retries after a transient failure (connection refused, timeout, HTTP 5xx/429, "
                            "association aborted), with exponential back-off (3); refusals are never retried")
    connection.add_argument("--retry-delay", type=float, default=0.5, metavar="S",
                            help=f"first back-off wait in s (0.5), doubled each retry up to {MAX_RETRY_DELAY_S:g}")
    connection.add_argument("--tls-ca", type=Path, metavar="PEM",
                            help="https:// or dicom-tls://: CA certificates that verify the PACS (default: the "
                            "system's)")
    connection.add_argument("--tls-cert", type=Path, metavar="PEM",
                            help="https:// or dicom-tls://: our own certificate, for a PACS that asks for one")
    connection.add_argument("--tls-key", type=Path, metavar="PEM", help="... and its private key")
    connection.add_argument("--token-file", type=Path, metavar="FILE",
                            help="DICOMweb: a file holding a bearer token to send (Authorization: Bearer)")

    echo = actions.add_parser("echo", parents=[common, connection],
                              help="check that a PACS answers (C-ECHO, or a QIDO-RS search for DICOMweb)")
    echo.add_argument("url", metavar="URL", help=URL_HELP)

    find = actions.add_parser("find", parents=[common, connection],
                              help="list the series a PACS holds (QIDO-RS or C-FIND), without patient data")
    find.add_argument("url", metavar="URL", help=URL_HELP)
    find.add_argument("--study", metavar="UID", help="only this StudyInstanceUID")
    find.add_argument("--modality", metavar="M", help="only this modality, e.g. CT or SEG")
    find.add_argument("--series", metavar="UID", help="only this SeriesInstanceUID")

    fetch = actions.add_parser("fetch", parents=[common, connection],
                               help="retrieve one series into a folder (WADO-RS, C-GET or C-MOVE); all or nothing")
    fetch.add_argument("url", metavar="URL", help=URL_HELP)
    fetch.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID of the series")
    fetch.add_argument("--series", required=True, metavar="UID", help="SeriesInstanceUID")
    fetch.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="folder for the <SOPInstanceUID>.dcm files (they appear once the whole series is in)")
    fetch.add_argument("--move-port", type=int, metavar="PORT",
                       help="DIMSE: fetch by C-MOVE to a storage SCP on this port instead of C-GET (the PACS must "
                       "know --aet at this host and port)")

    send = actions.add_parser("send", parents=[common, connection],
                              help="store DICOM result files (STOW-RS or C-STORE); files the PACS holds are skipped")
    send.add_argument("url", metavar="URL", help=URL_HELP)
    send.add_argument("inputs", nargs="+", metavar="FILE_OR_FOLDER", help="DICOM files, or folders searched for them")
    send.add_argument("--outbox", type=Path, metavar="DIR",
                      help="record the files in this outbox first: what is not stored stays pending there (and "
                      "entries still pending for this PACS are delivered too)")
    send.add_argument("--force", action="store_true",
                      help="send even the instances the PACS holds already (it keeps one copy of each)")

    outbox = actions.add_parser("outbox", parents=[common, connection],
                                help="list an outbox, or deliver what is pending in it (--send)")
    outbox.add_argument("folder", type=Path, metavar="DIR", help="the outbox folder (holding outbox.json)")
    outbox.add_argument("--send", nargs="?", const="", metavar="URL",
                        help="deliver the pending entries: to each one's recorded PACS, or only those recorded for "
                        "URL (give it to add credentials, which an outbox never stores)")
    outbox.add_argument("--force", action="store_true",
                        help="with --send: also re-send sent and refused entries")
    outbox.add_argument("--due", action="store_true",
                        help="with --send: only entries whose back-off time has come (for schedulers)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one ``ctfm pacs`` action; the ``--json`` document.

    Raises
    ------
    UsageError
        A bad address or option value.
    InputError
        A file to send is not DICOM or lacks its UIDs, or a folder is not an outbox.
    PacsError
        The PACS could not be reached or refused; ``document`` holds the report so far.
    """
    from ctfm_engine.dicom.pacs import DEFAULT_CALLING_AET

    _keep_protocol_logs_quiet(args.verbose)
    args.aet = args.aet or DEFAULT_CALLING_AET
    retry = _retry_policy(args)
    if args.pacs_command == "outbox":
        return _run_outbox(args, retry)
    pacs = _open(args, args.url, retry)
    if args.pacs_command == "echo":
        seconds = pacs.echo()
        return {"command": "pacs echo", "pacs": pacs.destination, "protocol": pacs.address.protocol,
                "seconds": round(seconds, 3)}
    if args.pacs_command == "find":
        series = pacs.find_series(study_uid=args.study, modality=args.modality, series_uid=args.series)
        return {"command": "pacs find", "pacs": pacs.destination,
                "query": {"study_instance_uid": args.study, "modality": args.modality,
                          "series_instance_uid": args.series},
                "series": [item.as_dict() for item in series]}
    if args.pacs_command == "fetch":
        return _fetch(args, pacs)
    return _send(args, pacs)


def _fetch(args: argparse.Namespace, pacs: PacsClient) -> dict[str, Any]:
    import time

    started = time.perf_counter()
    files = pacs.fetch_series(args.study, args.series, args.out)
    method = "WADO-RS" if pacs.address.protocol == "dicomweb" else "C-GET" if args.move_port is None else "C-MOVE"
    return {"command": "pacs fetch", "pacs": pacs.destination, "method": method,
            "study_instance_uid": args.study, "series_instance_uid": args.series, "folder": str(args.out),
            "instances": len(files), "files": [path.name for path in files],
            "seconds": round(time.perf_counter() - started, 3)}


def _send(args: argparse.Namespace, pacs: PacsClient) -> dict[str, Any]:
    from ctfm_engine.dicom.outbox import Outbox
    from ctfm_engine.dicom.pacs import PacsError

    if args.outbox is None:
        report = pacs.store(args.inputs, skip_present=not args.force)
        document = {"command": "pacs send", **report.as_dict(), "outbox": None}
        if not report.complete:
            _warn_not_delivered(report)
            raise PacsError(_not_delivered(report) + "; the files are unchanged where they are: send them again "
                            "later, or with --outbox DIR to keep them pending", transient=_transient(report),
                            document=document)
        return document
    outbox = Outbox(args.outbox)
    outbox.add(args.inputs, pacs.address, force=args.force)
    delivery = outbox.send(pacs, skip_present=not args.force)
    document = {"command": "pacs send", **delivery.as_dict(), "outbox": str(args.outbox)}
    if not delivery.report.complete:
        _warn_not_delivered(delivery.report)
        raise PacsError(_not_delivered(delivery.report) + f"; {_kept(args.outbox, delivery)}",
                        transient=_transient(delivery.report), document=document)
    return document


def _run_outbox(args: argparse.Namespace, retry: RetryPolicy) -> dict[str, Any]:
    from ctfm_engine.dicom.outbox import EntryState, Outbox
    from ctfm_engine.dicom.pacs import PacsError, parse_address

    outbox = Outbox(args.folder)
    if not outbox.exists():
        raise InputError(f"{args.folder}: is not an outbox (it holds no outbox.json); give the folder that "
                         "`ctfm pacs send --outbox` wrote")
    if args.send is None and (args.force or args.due):
        raise UsageError("--force and --due go with --send")
    deliveries: list[Delivery] = []
    if args.send is not None:
        if args.send:
            destinations = [parse_address(args.send, calling_aet=args.aet).display]
        else:
            destinations = sorted({entry.destination for entry in outbox.entries()
                                   if args.force or entry.state is EntryState.PENDING})
        for destination in destinations:
            pacs = _open(args, args.send or destination, retry)
            if args.force:
                outbox.requeue(destination)
            deliveries.append(outbox.send(pacs, skip_present=not args.force, only_due=args.due))
    entries = outbox.entries()
    document = {
        "command": "pacs outbox",
        "outbox": str(args.folder),
        "counts": {state.value: sum(entry.state is state for entry in entries) for state in EntryState},
        "entries": [entry.as_dict() for entry in entries],
        "deliveries": [delivery.as_dict() for delivery in deliveries],
    }
    failed = [delivery for delivery in deliveries if not delivery.report.complete]
    for delivery in failed:
        _warn_not_delivered(delivery.report)
    if failed:
        raise PacsError(f"outbox {args.folder}: {_not_delivered(failed[0].report)}; {_kept(args.folder, failed[0])}",
                        transient=_transient(failed[0].report), document=document)
    unreadable = [entry for delivery in deliveries for entry in delivery.unreadable]
    if unreadable:
        raise InputError(f"outbox {args.folder}: {len(unreadable)} entry(ies) could not be sent, e.g. "
                         f"{unreadable[0].last_error}")
    return document


def human_lines(document: dict[str, Any]) -> list[str]:
    """The lines ``ctfm pacs`` prints without ``--json``."""
    from ctfm_engine.dicom.outbox import EntryState

    command = document["command"]
    if command == "pacs echo":
        return [f"{document['pacs']} answers ({document['protocol']}, {1000 * document['seconds']:.0f} ms)"]
    if command == "pacs find":
        lines = [f"{item['modality']:<4} series {item['series_number'] if item['series_number'] is not None else '-'}"
                 f"  {item['instances'] if item['instances'] is not None else '?'} instance(s)  "
                 f"{item['series_instance_uid']}  (study {item['study_instance_uid']})"
                 + (f"  {item['series_description']}" if item["series_description"] else "")
                 for item in document["series"]]
        return lines + [f"{len(document['series'])} series on {document['pacs']}"]
    if command == "pacs fetch":
        return [f"{document['instances']} instance(s) of series {document['series_instance_uid']} -> "
                f"{document['folder']} ({document['method']}, {document['seconds']:.1f} s)"]
    if command == "pacs send":
        counts = ", ".join(f"{count} {status}" for status, count in document["counts"].items() if count)
        lines = [f"{item['file']}: {item['status']} ({item['message']})" for item in document["files"]
                 if item["status"] in ("refused", "failed") or item["status"] == "stored" and item["message"]]
        where = f"; outbox {document['outbox']}" if document["outbox"] else ""
        return lines + [f"{document['pacs']}: {counts or 'nothing to send'} ({document['seconds']:.1f} s){where}"]
    counts = ", ".join(f"{count} {state}" for state, count in document["counts"].items() if count)
    lines = [f"{delivery['pacs']}: " + (", ".join(f"{count} {status}" for status, count in delivery["counts"].items()
                                                   if count) or "nothing pending")
             for delivery in document["deliveries"]]
    lines += [f"{entry['state']:<10} {entry['destination']}  {entry['file']}"
              + (f"  ({entry['last_error']})" if entry["last_error"] else "")
              for entry in document["entries"] if entry["state"] != EntryState.SENT.value]
    return lines + [f"{document['outbox']}: {counts or 'empty'}"]


def _open(args: argparse.Namespace, url: str, retry: RetryPolicy) -> PacsClient:
    from ctfm_engine.dicom.pacs import TlsSettings, open_pacs

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise UsageError("--tls-cert and --tls-key go together: give both PEM files or neither")
        tls = TlsSettings(args.tls_ca, args.tls_cert, args.tls_key)
    return open_pacs(url, calling_aet=args.aet, retry=retry, timeout_s=args.timeout,
                     move_port=getattr(args, "move_port", None), tls=tls, bearer_token=_token(args.token_file))


def _token(path: Path | None) -> str | None:
    from ctfm_engine.dicom.pacs import read_bearer_token

    return None if path is None else read_bearer_token(path, "--token-file")


def _retry_policy(args: argparse.Namespace) -> RetryPolicy:
    from ctfm_engine.dicom.pacs import RetryPolicy

    if args.retries < 0:
        raise UsageError(f"--retries {args.retries}: give 0 or more")
    if args.retry_delay < 0:
        raise UsageError(f"--retry-delay {args.retry_delay:g}: give 0 or more seconds")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout:g}: give a positive number of seconds")
    return RetryPolicy(attempts=args.retries + 1, first_delay_s=args.retry_delay,
                       max_delay_s=max(MAX_RETRY_DELAY_S, args.retry_delay))


def _not_delivered(report: StoreReport) -> str:
    missing = report.not_delivered
    kinds = ", ".join(f"{count} {status}" for status, count in report.counts().items()
                      if count and status in ("refused", "failed"))
    return (f"send to {report.destination}: {len(missing)} of {len(report.files)} file(s) not stored ({kinds}; "
            f"{missing[0].path.name}: {missing[0].message})")


def _kept(folder: Path, delivery: Delivery) -> str:
    if delivery.still_pending:
        return (f"{delivery.still_pending} file(s) stay pending in outbox {folder}: run `ctfm pacs outbox {folder} "
                "--send` when the PACS is back")
    return f"the files are unchanged where they are and listed in outbox {folder}"


def _transient(report: StoreReport) -> bool:
    return any(item.status.value == "failed" for item in report.files)


def _warn_not_delivered(report: StoreReport) -> None:
    for item in report.not_delivered:
        log.warning("%s: %s by %s: %s", item.path, item.status.value, report.destination, item.message)


def _keep_protocol_logs_quiet(verbose: bool) -> None:
    """pynetdicom logs each PDU at INFO and DIMSE identifiers (with patient data) at DEBUG; dicomweb-client logs
    every request at INFO and HTTP headers (with credentials) at DEBUG.  Our own log says what matters."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if verbose else logging.CRITICAL)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
