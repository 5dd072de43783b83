"""The zmq-app plugin: any app joins the bus over ZeroMQ (see PROTOCOL.md)."""

from txthreatbus.apps.zmq_app.service import ZmqAppService

__all__ = ["ZmqAppService"]
