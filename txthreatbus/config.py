"""
Configuration: YAML in the Threat Bus layout, loaded into frozen attrs values.

An existing Threat Bus ``config.yaml`` works unchanged::

    logging: {console: true, console_verbosity: INFO, file: false, ...}
    plugins:
      backbones:
        inmem: {}            # or rabbitmq: {host: ..., queue: {...}}
      apps:
        zmq-app: {host: 127.0.0.1, manage: 13370, pub: 13371, sub: 13372}
    metrics: {host: 127.0.0.1, port: 9100}   # optional

Every key has a default, and ``THREATBUS_*`` environment variables override
keys (``with_environment``). Anything wrong (a missing file, bad YAML, an
unknown key or plugin, a wrong type, a port out of range) raises
``ConfigError`` with one line that names the key.
"""

from __future__ import annotations

import copy
from typing import Mapping, Optional, Union

import attrs
import yaml

LEVELS = ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration that cannot be used; the text names the key."""


# --- validators with messages a user can act on


def _check(ok, expected):
    def validator(instance, attribute, value):
        if not ok(value):
            raise ValueError(f"must be {expected}, not {value!r}")

    return validator


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


boolean = _check(lambda v: isinstance(v, bool), "true or false")
string = _check(lambda v: isinstance(v, str) and v != "", "a non-empty string")
optional_string = _check(lambda v: v is None or isinstance(v, str) and v != "", "a string")
port = _check(lambda v: _is_int(v) and 1 <= v <= 65535, "a port number from 1 to 65535")
listen_port = _check(
    lambda v: _is_int(v) and 0 <= v <= 65535, "a port number from 1 to 65535 (0: any free port)"
)
positive_int = _check(lambda v: _is_int(v) and v > 0, "a whole number > 0")
optional_positive_int = _check(lambda v: v is None or _is_int(v) and v > 0, "a whole number > 0")
non_negative_int = _check(lambda v: _is_int(v) and v >= 0, "a whole number >= 0")
positive_number = _check(lambda v: _is_number(v) and v > 0, "a number > 0")
non_negative_number = _check(lambda v: _is_number(v) and v >= 0, "a number >= 0")
level = _check(lambda v: isinstance(v, str) and v.upper() in LEVELS, "one of " + ", ".join(LEVELS))


def section(cls):
    """A field holding the nested section ``cls``, defaulted from ``{}``."""
    return attrs.field(factory=cls, metadata={"section": cls})


# --- the sections


@attrs.frozen
class LoggingConfig:
    console: bool = attrs.field(default=True, validator=boolean)
    console_verbosity: str = attrs.field(default="INFO", validator=level)
    file: bool = attrs.field(default=False, validator=boolean)
    file_verbosity: str = attrs.field(default="DEBUG", validator=level)
    filename: str = attrs.field(default="threatbus.log", validator=string)


@attrs.frozen
class InMemConfig:
    """The in-memory backbone has nothing to configure."""


@attrs.frozen
class QueueConfig:
    name_suffix: Optional[str] = attrs.field(default=None, validator=optional_string)
    durable: bool = attrs.field(default=True, validator=boolean)
    auto_delete: bool = attrs.field(default=False, validator=boolean)
    lazy: bool = attrs.field(default=True, validator=boolean)
    exclusive: bool = attrs.field(default=False, validator=boolean)
    max_items: int = attrs.field(default=0, validator=non_negative_int)


@attrs.frozen
class TlsConfig:
    #: PEM file of the CAs that sign the broker's certificate; none: the system's.
    ca_file: Optional[str] = attrs.field(default=None, validator=optional_string)
    #: PEM files of a client certificate and its key, for brokers that ask for one.
    cert_file: Optional[str] = attrs.field(default=None, validator=optional_string)
    key_file: Optional[str] = attrs.field(default=None, validator=optional_string)

    def __attrs_post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file go together")


@attrs.frozen
class RabbitMQConfig:
    host: str = attrs.field(default="localhost", validator=string)
    port: int = attrs.field(default=5672, validator=port)
    username: str = attrs.field(default="guest", validator=string)
    password: str = attrs.field(default="guest", validator=string)
    vhost: str = attrs.field(default="/", validator=string)
    naming_join_pattern: str = attrs.field(default=".", validator=string)
    queue: QueueConfig = section(QueueConfig)
    prefetch: int = attrs.field(default=1000, validator=positive_int)
    buffer_bytes: int = attrs.field(default=64 << 20, validator=positive_int)  # 64 MiB
    dedup_window: int = attrs.field(default=100_000, validator=positive_int)
    reconnect_max_delay: float = attrs.field(default=30.0, validator=positive_number)
    #: Seconds after start before consuming: apps of a restarted instance
    #: subscribe again first (they notice within a heartbeat, 5 s), so that
    #: what waited in its queue reaches them. 0: consume at once.
    resubscribe_grace: float = attrs.field(default=10.0, validator=non_negative_number)
    #: Whether a broker that cannot be reached at start is waited for (with
    #: backoff, each try logged) rather than a reason to stop.
    wait_for_broker: bool = attrs.field(default=False, validator=boolean)
    #: Bytes of messages of one type published in one reactor turn that go to
    #: the broker as one AMQP message (a batch); 0: one AMQP message each, as
    #: Threat Bus 2020.11.26 reads them (for a broker shared with it).
    batch_bytes: int = attrs.field(default=256 << 10, validator=non_negative_int)
    #: Whether the exchanges survive a broker restart, and with them the
    #: bindings of durable queues: without it, what is published after a
    #: restart reaches an instance only once it has bound its queues again.
    #: false: transient, as Threat Bus 2020.11.26 declares them (for a
    #: broker shared with it).
    durable_exchanges: bool = attrs.field(default=True, validator=boolean)
    #: TLS to the broker (amqps): ``ssl: {ca_file, cert_file, key_file}``.
    ssl: Optional[TlsConfig] = attrs.field(default=None, metadata={"section": TlsConfig})


@attrs.frozen
class CurveConfig:
    server_secret_key_file: str = attrs.field(default=None, validator=string)
    authorized_clients_dir: str = attrs.field(default=None, validator=string)


@attrs.frozen
class ZmqAppConfig:
    host: str = attrs.field(default="127.0.0.1", validator=string)
    manage: int = attrs.field(default=13370, validator=listen_port)
    pub: int = attrs.field(default=13371, validator=listen_port)
    sub: int = attrs.field(default=13372, validator=listen_port)
    advertise_host: Optional[str] = attrs.field(default=None, validator=optional_string)
    snapshot_timeout: float = attrs.field(default=3600.0, validator=positive_number)
    subscription_timeout: float = attrs.field(default=0.0, validator=non_negative_number)
    buffer_bytes: int = attrs.field(default=8 << 20, validator=positive_int)
    max_buffered_bytes: int = attrs.field(default=128 << 20, validator=positive_int)
    max_message_size: int = attrs.field(default=1 << 20, validator=positive_int)
    max_subscriptions: int = attrs.field(default=10_000, validator=positive_int)
    #: None: a quarter of max_subscriptions
    max_subscriptions_per_peer: Optional[int] = attrs.field(
            default=None, validator=optional_positive_int
    )
    curve: Optional[CurveConfig] = attrs.field(default=None, metadata={"section": CurveConfig})


STORE_SCHEMES = ("sqlite", "postgresql", "postgres")
store_url = _check(
    lambda v: isinstance(v, str) and v.partition("://")[0].partition("+")[0] in STORE_SCHEMES and "://" in v,
    "a database URL: sqlite:///PATH (relative to the working directory; sqlite:////PATH "
    "absolute) or postgresql://USER@HOST/DATABASE",
)


def safe_url(url: str) -> str:
    """A database ``url`` fit for logs: without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


@attrs.frozen
class StoreConfig:
    url: str = attrs.field(default="sqlite:///txthreatbus.sqlite", validator=store_url)
    #: Days records are kept; 0 keeps them all.
    retention_days: float = attrs.field(default=0, validator=non_negative_number)


@attrs.frozen
class MetricsConfig:
    host: str = attrs.field(default="127.0.0.1", validator=string)
    port: int = attrs.field(default=9100, validator=listen_port)


Backbone = Union[InMemConfig, RabbitMQConfig]
BACKBONES = {"inmem": InMemConfig, "rabbitmq": RabbitMQConfig}
#: The app plugins, by config key: ``zmq-app`` as Threat Bus 2020 names it,
#: ``zmq`` as 2021 and later do. Both serve apps of both generations; given
#: both, the bus runs both, each on its own ports.
APPS = {"zmq-app": ZmqAppConfig, "zmq": ZmqAppConfig}


@attrs.frozen
class Config:
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    backbone: Backbone = attrs.field(factory=InMemConfig)
    #: The app plugins by config key, in the order of the file.
    apps: Mapping[str, ZmqAppConfig] = attrs.field(factory=lambda: {"zmq-app": ZmqAppConfig()})
    metrics: Optional[MetricsConfig] = None
    #: None: no store (``store: false``), as Threat Bus has none.
    store: Optional[StoreConfig] = attrs.field(factory=StoreConfig)

    @property
    def zmq_app(self) -> ZmqAppConfig:
        """The first app plugin's config: where the command line tools connect by default."""
        return next(iter(self.apps.values()))


# --- loading


def load(path: Optional[str], environ: Mapping[str, str] = {}) -> Config:
    """
    The configuration in the YAML file ``path`` (None: no file, the
    defaults), with the ``THREATBUS_*`` variables of ``environ`` over it.
    """
    if path is None:
        return from_mapping(with_environment({}, environ))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    try:
        return parse(text, environ)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse(text: str, environ: Mapping[str, str] = {}) -> Config:
    """The configuration in YAML ``text``, with the ``THREATBUS_*`` variables of ``environ`` over it."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        # Some errors (a ReaderError) have no problem and a multi-line text.
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"invalid YAML{where}: {problem}") from None
    # An empty file is all defaults; any other non-mapping is an error.
    document = {} if document is None else _mapping(document, "the top level")
    return from_mapping(with_environment(document, environ))


#: Environment variables over config keys, as Threat Bus 2021 and later read
#: them: THREATBUS_ then the key's path, upper case, joined by __, e.g.
#: THREATBUS_PLUGINS__APPS__ZMQ_APP__HOST for plugins.apps.zmq-app.host.
ENV_PREFIX = "THREATBUS_"
#: Keys spelled with a dash, which a variable name spells with _.
_DASHED = {name.replace("-", "_"): name for name in APPS}


def with_environment(document: dict, environ: Mapping[str, str]) -> dict:
    """
    A copy of ``document`` with each ``THREATBUS_*`` variable of ``environ``
    set at its key's path; values are read as YAML (``13370`` a number,
    ``true`` a boolean, ``0.0.0.0`` a string). The result is checked as a
    config file is.
    """
    document = copy.deepcopy(document)
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [_DASHED.get(part.lower(), part.lower()) for part in name[len(ENV_PREFIX):].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: not a config key's path (KEY__KEY__...)")
        node = document
        for depth, key in enumerate(path[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:depth + 1])} is not a section")
            node = child
        try:
            value = yaml.safe_load(environ[name])
        except yaml.YAMLError:
            value = environ[name]
        node[path[-1]] = value
    return document


def from_mapping(document: dict) -> Config:
    """The configuration in a parsed YAML ``document``."""
    top = _mapping(document, "the top level")
    _no_unknown(top, ("logging", "plugins", "metrics", "store"), "")
    plugins = _mapping(top.get("plugins"), "plugins")
    _no_unknown(plugins, ("backbones", "apps"), "plugins.")
    backbones = _mapping(plugins.get("backbones"), "plugins.backbones")
    _no_unknown(backbones, BACKBONES, "plugins.backbones.", "backbone plugin")
    if len(backbones) > 1:
        raise ConfigError("plugins.backbones: configure one backbone, not " + ", ".join(backbones))
    apps = _mapping(plugins.get("apps"), "plugins.apps")
    _no_unknown(apps, APPS, "plugins.apps.", "app plugin")
    (backbone_name, backbone), = backbones.items() or [("inmem", {})]
    metrics = top.get("metrics")
    config = Config(
        logging=_build(LoggingConfig, top.get("logging"), "logging"),
        backbone=_build(BACKBONES[backbone_name], backbone, "plugins.backbones." + backbone_name),
        apps={
            name: _build(APPS[name], value, "plugins.apps." + name)
            for name, value in (apps.items() or [("zmq-app", {})])
        },
        metrics=None if metrics is None else _build(MetricsConfig, metrics, "metrics"),
        store=_store(top.get("store", True)),
    )
    _distinct_ports(config)
    return config


#: Hosts that mean every interface.
WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")


def _distinct_ports(config: Config) -> None:
    """Refuse two listening endpoints on one port of one host (0, any free port, excepted)."""
    endpoints = [
        (f"plugins.apps.{name}.{key}", app.host, getattr(app, key))
        for name, app in config.apps.items()
        for key in ("manage", "pub", "sub")
    ]
    if config.metrics is not None:
        endpoints.append(("metrics.port", config.metrics.host, config.metrics.port))
    for i, (key, host, port) in enumerate(endpoints):
        for other, other_host, other_port in endpoints[:i]:
            same_host = host == other_host or host in WILDCARD_HOSTS or other_host in WILDCARD_HOSTS
            if port and port == other_port and same_host:
                raise ConfigError(f"{key}: port {port} is {other}'s too; each endpoint needs its own")


def _store(value) -> Optional[StoreConfig]:
    """The store's section: false is no store; true or empty, the defaults."""
    if value is False:
        return None
    if value is True:
        value = None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"store: must be a mapping, or false for no store, not {value!r}")
    return _build(StoreConfig, value, "store")


def _mapping(value, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: must be a mapping, not {value!r}")
    return value


def _no_unknown(mapping: dict, known, prefix: str, what: str = "key") -> None:
    for key in mapping:
        if key not in known:
            raise ConfigError(
                f"{prefix}{key}: unknown {what} (known: {', '.join(sorted(known))})"
            )


def _build(cls, value, path: str):
    mapping = _mapping(value, path)
    fields = attrs.fields_dict(cls)
    _no_unknown(mapping, fields, path + ".")
    kwargs = {}
    for name, v in mapping.items():
        field = fields[name]
        if "section" in field.metadata:
            v = _build(field.metadata["section"], v, f"{path}.{name}")
        elif field.validator is not None:
            try:
                field.validator(None, field, v)
            except ValueError as e:
                raise ConfigError(f"{path}.{name}: {e}") from None
        kwargs[name] = v
    try:
        return cls(**kwargs)
    except ConfigError as e:  # keys that go together
        raise ConfigError(f"{path}: {e}") from None
    except ValueError as e:
        # a required key left at its (invalid) default
        missing = [f.name for f in attrs.fields(cls) if f.name not in mapping]
        raise ConfigError(f"{path}: needs {', '.join(missing)} ({e})") from None
