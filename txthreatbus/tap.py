"""
``twistd zmq-app``: the command-line options, and the wiring of the bus.

``bus_service(config)`` builds the whole bus as one ``MultiService`` (logging,
backbone, bus core, zmq-app, metrics), so that it composes into any Twisted
application; ``makeService`` is what twistd calls.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import Optional

from twisted.application.service import MultiService
from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from txthreatbus import config as configuration
from txthreatbus.apps.zmq_app import ZmqAppService
from txthreatbus.apps.zmq_app.curve import CurveKeyError
from txthreatbus.apps.zmq_app.sockets import BindError
from txthreatbus.backbones.inmem import InMemoryBackbone
from txthreatbus.backbones.rabbitmq import RabbitMQBackbone
from txthreatbus.bus import Bus
from txthreatbus.logs import LoggingService
from txthreatbus.metrics import Metrics, metrics_service
from txthreatbus.services import BusService
from txthreatbus.status import Status


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run Threat Bus with the zmq-app plugin. Without --config it runs on "
        "defaults: in-memory backbone, 127.0.0.1:13370 (manage), 13371 (pub), 13372 (sub)."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "a Threat Bus config.yaml (logging, plugins, metrics); THREATBUS_* environment "
            "variables override its keys",
        ],
    ]

    def postOptions(self):
        path = self["config"]
        try:
            self["config"] = configuration.load(path, os.environ)
        except configuration.ConfigError as e:
            raise usage.UsageError(str(e)) from None


def _backbone(config, metrics, reactor, on_fatal=None):
    if isinstance(config, configuration.RabbitMQConfig):
        return RabbitMQBackbone(config, metrics, reactor, on_fatal=on_fatal)
    return InMemoryBackbone()


class TwistdBus(BusService):
    """
    The bus as twistd runs it: a failure to start (a port in use, a key or
    log file that cannot be read) ends twistd with one clear line and exit
    status 1, not a traceback, and removes the pid file twistd wrote (twistd
    itself would leave it). twistd starts services synchronously.

    @param pidfile: twistd's pid file, if any.
    """

    def __init__(self, pidfile: Optional[str] = None):
        super().__init__()
        self._pidfile = pidfile

    def privilegedStartService(self):
        with self._exit_on_startup_error():
            super().privilegedStartService()

    def startService(self):
        with self._exit_on_startup_error():
            super().startService()
        # What start-up made lives as long as the process: keep it out of
        # the cyclic garbage collector's full passes, which would otherwise
        # scan it all and stall the reactor for milliseconds.
        gc.freeze()

    @contextmanager
    def _exit_on_startup_error(self):
        try:
            yield
        except (BindError, CurveKeyError, OSError) as e:
            self._remove_pidfile()
            raise SystemExit(f"txthreatbus cannot start: {e}") from None

    def fatal(self, failure) -> None:
        """
        The bus cannot work (its backbone's broker was never reached): stop,
        and end twistd with exit status 1 once stopped, so that a
        supervisor sees a failure (systemd's ``Restart=on-failure``).
        """
        from twisted.internet import reactor

        self._remove_pidfile()
        # after every service has stopped and logged, before twistd would
        # end with status 0
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        try:
            reactor.stop()
        except ReactorNotRunning:  # pragma: no cover - a backbone fails only once it runs
            os._exit(1)

    def _remove_pidfile(self) -> None:
        """Remove the pid file if it is this process's."""
        if not self._pidfile:
            return
        try:
            with open(self._pidfile) as f:
                ours = f.read().strip() == str(os.getpid())
            if ours:
                os.remove(self._pidfile)
        except OSError:
            pass


def bus_service(config: configuration.Config, reactor=None, top=None, sockets=None) -> MultiService:
    """
    The bus that ``config`` describes, as one service tree: built into
    ``top``, a new ``BusService`` by default. ``sockets`` makes each app
    plugin's ``IServerSockets`` when called with no arguments: ZeroMQ's by
    default.
    """
    if reactor is None:
        from twisted.internet import reactor
    if top is None:
        top = BusService()
    top.setName("txthreatbus")
    LoggingService(config.logging).setServiceParent(top)
    metrics = Metrics()
    backbone = _backbone(config.backbone, metrics, reactor, getattr(top, "fatal", None))
    backbone.setServiceParent(top)
    snapshot_timeout = max(app.snapshot_timeout for app in config.apps.values())
    bus = Bus(backbone, reactor, metrics, snapshot_timeout=snapshot_timeout)
    bus.setName("bus")
    bus.setServiceParent(top)
    backbone.attach(bus.deliver)
    store, apps = None, []
    if config.store is not None:
        # SQLAlchemy loads only where there is a store
        from txthreatbus.store import Database, StoreService

        store = StoreService(
            Database(config.store.url), bus, reactor, retention=config.store.retention_days * 86400
        )
        store.setServiceParent(top)
        bus.add_app(store)
    for name, app_config in config.apps.items():
        app = ZmqAppService(app_config, bus, reactor, None if sockets is None else sockets())
        app.setName(name)
        app.setServiceParent(top)
        bus.add_app(app)
        apps.append(app)
    if config.metrics is not None:
        status = Status(reactor, bus, backbone, apps, store)
        web = metrics_service(metrics, config.metrics.host, config.metrics.port, reactor, status)
        web.setName("metrics")
        web.setServiceParent(top)
    return top


def makeService(options: Options) -> MultiService:
    parent = getattr(options, "parent", None)  # twistd's own options
    pidfile = parent.get("pidfile") if parent is not None else None
    return bus_service(options["config"], top=TwistdBus(pidfile and os.path.abspath(pidfile)))
