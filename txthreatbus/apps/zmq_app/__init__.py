"""The zmq-app plugin: any app joins the bus over ZeroMQ (see docs/protocol.md)."""

from txthreatbus.apps.zmq_app.service import ZmqAppService

__all__ = ["ZmqAppService"]
