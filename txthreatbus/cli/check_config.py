"""
``txthreatbus check-config FILE``: load a config as ``twistd zmq-app``
would, and summarise it, or name what is wrong.
"""

from __future__ import annotations

import os
import sys
from typing import List

from txthreatbus import config as configuration
from txthreatbus.apps.zmq_app.curve import CurveKeyError, load_keys
from txthreatbus.cli.rendering import error


def summarize(config: configuration.Config) -> List[str]:
    """What a config sets up, in a few lines for people."""
    backbone = config.backbone
    if isinstance(backbone, configuration.RabbitMQConfig):
        backbone_text = (
            f"rabbitmq {backbone.username}@{backbone.host}:{backbone.port} vhost {backbone.vhost}"
        )
    else:
        backbone_text = "inmem (in-memory, one instance)"
    if config.metrics is None:
        metrics = "off"
    else:
        host = config.metrics.host
        host = f"[{host}]" if ":" in host else host
        metrics = f"http://{host}:{config.metrics.port}/metrics"
    logging = config.logging
    log_file = f"{logging.filename} at {logging.file_verbosity}" if logging.file else "off"
    console = logging.console_verbosity if logging.console else "off"
    lines = [f"  backbone: {backbone_text}"]
    for name, app in config.apps.items():
        advertised = f", advertised as {app.advertise_host}" if app.advertise_host else ""
        expiry = (
            f"after {app.subscription_timeout:g} s without heartbeat"
            if app.subscription_timeout
            else "never"
        )
        lines += [
            f"  {name + ':':<9} {app.host}{advertised}: manage {app.manage}, pub {app.pub}, sub {app.sub}"
            + ("" if app.curve is None else ", CURVE encryption"),
            f"            subscriptions expire {expiry}; snapshots time out after {app.snapshot_timeout:g} s",
        ]
    if config.store is None:
        store = "off (snapshots are answered by apps only)"
    else:
        kept = f"{config.store.retention_days:g} days" if config.store.retention_days else "everything"
        store = f"{configuration.safe_url(config.store.url)}, keeping {kept}"
    return lines + [
        f"  store:    {store}",
        f"  metrics:  {metrics}",
        f"  logging:  console {console}, file {log_file}",
    ]


async def check_config_command(reactor, args) -> int:
    try:
        config = configuration.load(args.config_file, os.environ)
        for app in config.apps.values():
            if app.curve is not None:
                # as start-up will: a missing or bad key file is an error now
                load_keys(app.curve)
    except (configuration.ConfigError, CurveKeyError) as e:
        error("check-config", str(e))
        return 1
    sys.stdout.write(f"config OK: {args.config_file}\n" + "\n".join(summarize(config)) + "\n")
    return 0
