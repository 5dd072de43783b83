"""
What goes wrong when a client talks to the bus: ``ClientError`` and its kinds.
"""

from __future__ import annotations


class ClientError(Exception):
    """Threat Bus did not do what the client asked; the text says why."""


class RequestTimeout(ClientError):
    """Threat Bus did not answer a management request in time."""


class RequestFailed(ClientError):
    """Threat Bus answered a management request with an unsuccessful status."""

    def __init__(self, action: str, status):
        super().__init__(f"Threat Bus answered {status!r} to {action}")
        self.action = action
        self.status = status


class ProtocolError(ClientError):
    """Threat Bus answered something that is not a reply of the protocol."""


class ClientStopped(ClientError):
    """The client (or subscription) is stopping or stopped."""
