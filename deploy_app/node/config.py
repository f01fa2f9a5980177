"""The node's settings: a TOML file (``--config``) whose keys are the settings' names, overridden by the command line.

Example (every key but the first four is optional; the defaults are those of :class:`NodeConfig`)::

    ae_title = "CTFM"
    port = 11112
    spool = "/var/lib/ctfm-node"
    pacs = "dicom://ORTHANC@pacs.example.org:4242"
    allow_ae = ["ORTHANC", "CT_SCANNER_1"]
    quiet_seconds = 30
    workers = 1
    spool_quota_mb = 50000
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from ctfm_engine.errors import UsageError

SEG_ENCODINGS = ("binary", "binary-j2k", "labelmap", "labelmap-rle", "labelmap-jpegls")
REQUIRED = ("ae_title", "port", "spool", "pacs")


@dataclass(frozen=True)
class NodeConfig:
    """Everything the node needs.

    Receiving: ``ae_title`` and ``port`` it listens on (every interface, or ``host``); ``allow_ae`` the calling AE
    titles it accepts (empty: any, which the log warns about) and ``allow_hosts`` the addresses or networks
    (``10.1.2.3``, ``10.1.0.0/16``) they may call from (empty: any; STOW-RS requests too); at most
    ``max_associations`` at once (more are rejected as transient, "local limit exceeded"); with ``health_port``,
    ``GET /health`` on that port answers 200 or 503 (see ``deploy_app.node.health``); a study is complete
    ``quiet_seconds`` after its last instance arrived, or, with ``queue_on_release``, as soon as the association
    that sent it is released normally. Backpressure: no new instance is accepted (associations rejected as
    transient, C-STORE answered 0xA700) while the spool holds ``spool_quota_mb`` or its file system has less than
    ``min_free_mb`` free.
    Processing: ``workers`` studies at a time, each by the deploy app with ``model``, ``encoding``,
    ``triage_model``, ``rules``, ``device`` and ``measurements_sr``; a run that takes longer than
    ``job_timeout_minutes`` is stopped; a failed run is tried ``max_attempts`` times in all, ``retry_seconds`` apart
    (doubled each time).  Delivery: to ``pacs`` (a DICOMweb base URL or
    ``dicom://AET@HOST:PORT``; our calling AE title is ``ae_title``); a PACS that is down is tried again after
    ``delivery_retry_seconds`` (doubled each time, at most an hour).  Retention: the spool copy of a study and its
    results are removed ``retention_hours`` after delivery or refusal (None: kept).  The log file rotates at
    ``log_max_mb``, keeping ``log_backups`` old files.
    TLS: with ``tls_cert`` and ``tls_key`` (PEM files) the DICOM listener speaks DICOM over TLS (PS3.15 B.1) only;
    with ``tls_ca`` as well, senders must present a certificate signed by that CA; ``health_tls`` serves the health
    port over HTTPS with the same certificate.  Write-back: a ``dicom-tls://AET@HOST:PORT`` or ``https://`` PACS is
    verified against ``pacs_tls_ca`` (default: the system's CAs), and the node presents ``pacs_tls_cert`` and
    ``pacs_tls_key`` when given; ``pacs_token_file`` holds a bearer token sent to a DICOMweb PACS (basic
    authentication goes in the URL: ``https://user:password@host/dicom-web``).
    STOW-RS intake: with ``stow_port``, DICOMweb stores (``POST /studies``) are taken on that port like C-STOREs
    (HTTPS with ``tls_cert``; a bearer token from ``stow_token_file`` required when given); see
    ``deploy_app.node.stow``.
    Beyond one machine: with ``ray_address`` (``HOST:PORT`` of an existing Ray cluster, or ``auto``) each job runs as
    a Ray task asking for ``ray_num_cpus`` CPUs and ``ray_num_gpus`` GPUs; the node's queue stays the only record of
    what is done.
    """

    ae_title: str
    port: int
    spool: Path
    pacs: str
    host: str = ""
    health_port: int | None = None
    allow_ae: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    max_associations: int = 10
    quiet_seconds: float = 30.0
    queue_on_release: bool = False
    workers: int = 1
    model: str | None = None
    encoding: str = "binary"
    triage_model: str | None = None
    rules: Path | None = None
    device: str = "cpu"
    measurements_sr: bool = True
    spool_quota_mb: float | None = None
    min_free_mb: float = 500.0
    max_attempts: int = 3
    job_timeout_minutes: float = 60.0
    retry_seconds: float = 60.0
    delivery_retry_seconds: float = 30.0
    pacs_timeout_seconds: float = 30.0
    retention_hours: float | None = None
    log_max_mb: float = 10.0
    log_backups: int = 5
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    health_tls: bool = False
    pacs_tls_ca: Path | None = None
    pacs_tls_cert: Path | None = None
    pacs_tls_key: Path | None = None
    pacs_token_file: Path | None = None
    stow_port: int | None = None
    stow_token_file: Path | None = None
    ray_address: str | None = None
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0

    def __post_init__(self) -> None:
        # The engine's AE-title rule (PS3.5: 1 to 16 printable ASCII characters, no backslash), used by its clients.
        from ctfm_engine.dicom.pacs import ae_title_problem, parse_address

        for title in (self.ae_title, *self.allow_ae):
            problem = ae_title_problem(title)
            if problem:
                raise UsageError(f"AE title {title!r} {problem}; e.g. CTFM")
        for network in self.allow_hosts:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise UsageError(f"allow_hosts {network!r}: not an address or network; e.g. 10.1.2.3 or 10.1.0.0/16"
                                 ) from None
        for name in ("port", "health_port", "stow_port"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 65535:
                raise UsageError(f"{name} {value}: give a port from 1 to 65535 (e.g. 11112)")
        parse_address(self.pacs, calling_aet=self.ae_title)  # a UsageError naming the address when it is not one
        if self.max_associations < 1:
            raise UsageError(f"max_associations {self.max_associations}: give at least 1")
        if self.workers < 1:
            raise UsageError(f"workers {self.workers}: give at least 1")
        if self.encoding not in SEG_ENCODINGS:
            raise UsageError(f"encoding {self.encoding!r}: give one of {', '.join(SEG_ENCODINGS)}")
        if self.max_attempts < 1:
            raise UsageError(f"max_attempts {self.max_attempts}: give at least 1")
        if self.job_timeout_minutes <= 0:
            raise UsageError(f"job_timeout_minutes {self.job_timeout_minutes}: must be positive")
        for name in ("quiet_seconds", "retry_seconds", "delivery_retry_seconds", "min_free_mb", "log_max_mb"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} {getattr(self, name)}: must not be negative")
        if self.pacs_timeout_seconds <= 0:
            raise UsageError(f"pacs_timeout_seconds {self.pacs_timeout_seconds}: must be positive")
        if self.spool_quota_mb is not None and self.spool_quota_mb <= 0:
            raise UsageError(f"spool_quota_mb {self.spool_quota_mb}: must be positive (leave it out for no quota)")
        if self.rules is not None and not Path(self.rules).is_file():
            raise UsageError(f"rules {self.rules}: no such file; give a JSON file of selection rules")
        for name in ("tls_cert", "tls_key", "tls_ca", "pacs_tls_ca", "pacs_tls_cert", "pacs_tls_key",
                     "pacs_token_file", "stow_token_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise UsageError(f"{name} {value}: no such file")
        for cert, key in (("tls_cert", "tls_key"), ("pacs_tls_cert", "pacs_tls_key")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise UsageError(f"{cert} and {key} go together: give both PEM files or neither")
        if self.tls_ca is not None and self.tls_cert is None:
            raise UsageError("tls_ca checks the senders' certificates on a TLS listener: give tls_cert and tls_key too")
        if self.health_tls and (self.tls_cert is None or self.health_port is None):
            raise UsageError("health_tls serves the health port over HTTPS: give health_port, tls_cert and tls_key")
        if self.ray_address is not None and not self.ray_address.strip():
            raise UsageError("ray_address is empty: give HOST:PORT of the Ray cluster's head, or auto")
        if self.ray_num_cpus < 0 or self.ray_num_gpus < 0:
            raise UsageError("ray_num_cpus and ray_num_gpus must not be negative")


def load_config(file: Path | None, overrides: dict[str, Any]) -> NodeConfig:
    """The settings of ``file`` (TOML; relative paths are relative to it) with ``overrides`` (the command line's
    values, None meaning "not given") applied on top.

    Raises
    ------
    UsageError
        The file is missing or not TOML, holds an unknown key or a value of the wrong type, or a required setting
        (ae_title, port, spool, pacs) is given nowhere.
    """
    values: dict[str, Any] = {}
    if file is not None:
        values = _read_toml(Path(file))
        base = Path(file).resolve().parent
        for name in ("spool", "rules", "tls_cert", "tls_key", "tls_ca", "pacs_tls_ca", "pacs_tls_cert",
                     "pacs_tls_key", "pacs_token_file", "stow_token_file"):
            # relative to the file, not to wherever the node is started
            if isinstance(values.get(name), str) and not Path(values[name]).is_absolute():
                values[name] = str(base / values[name])
    values.update({key: value for key, value in overrides.items() if value is not None})
    missing = [name for name in REQUIRED if values.get(name) in (None, "")]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise UsageError(f"no {', '.join(missing)} given: pass {flags} or set them in the --config file")
    known = {item.name: item for item in fields(NodeConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"{file}: unknown setting(s) {', '.join(unknown)}; the settings are {', '.join(known)}")
    try:
        typed = {name: _typed(name, value, known[name].type) for name, value in values.items()}
    except (TypeError, ValueError) as error:
        raise UsageError(f"{file or 'command line'}: {error}") from None
    config = NodeConfig(**typed)
    return replace(config, spool=config.spool.resolve())


def _read_toml(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise UsageError(f"--config {file}: no such file; give a TOML file of node settings")
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {file}: is not valid TOML ({error}); fix the file") from None


def _typed(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the setting ``name`` holds it, or TypeError naming the setting and the expected type."""
    text = str(annotation)
    if value is None:
        if "None" in text:
            return None
        raise TypeError(f"{name} must not be empty")
    text = text.removesuffix(" | None")
    if text.startswith("tuple"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
            raise TypeError(f"{name} must be a list of strings, not {value!r}")
        return tuple(items)
    if text == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false, not {value!r}")
        return value
    if text == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a whole number, not {value!r}")
        return value
    if text.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number, not {value!r}")
        return float(value)
    if text.startswith("Path"):
        if not isinstance(value, str | Path):
            raise TypeError(f"{name} must be a path, not {value!r}")
        return Path(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {value!r}")
    return value
