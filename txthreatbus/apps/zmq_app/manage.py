"""
The management endpoint: subscribe, unsubscribe and heartbeat, JSON over
request-reply, with exactly the replies of docs/protocol.md.

``ManagementHandler.handle`` turns any request frames into a reply dict and
never raises, and ``answer`` gives that reply's JSON; ``ManageConnection``
puts it on a REP socket, which answers each request before it reads the
next (libzmq itself discards what is not a request at all: a message
without the empty delimiter frame of REQ).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Callable, Optional, Sequence, Tuple, Union

import zmq
from twisted.logger import Logger

from txthreatbus import codec, logs
from txthreatbus.bus import snapshot_types
from txthreatbus.connections import BatchedReadConnection
from txthreatbus.model import is_stix_topic

log = Logger(observer=logs.publisher)

SUCCESS = {"status": "success"}
ERROR = {"status": "error"}
UNKNOWN = {"status": "unknown request"}

_ACTIONS = ("subscribe", "unsubscribe", "heartbeat")

#: The replies that never change, encoded once (by identity: they are
#: returned as they are).
_ENCODED = {id(reply): json.dumps(reply).encode() for reply in (SUCCESS, ERROR, UNKNOWN)}


def encode(reply: dict) -> bytes:
    """The JSON of ``reply``."""
    encoded = _ENCODED.get(id(reply))
    return encoded if encoded is not None else json.dumps(reply).encode()


# Plain ints: combining pyzmq's flag enums costs a Python call each time.
_NOBLOCK = int(zmq.NOBLOCK)


def snapshot_days(value) -> Optional[int]:
    """The whole number of days >= 0 in ``value`` (an int, or an int string)."""
    if value is None:
        return 0
    if isinstance(value, str):
        value = value.strip()
        # int() of over 4,300 digits raises: more than 9 is too many anyway
        if not value.isdigit() or not value.isascii() or len(value) > 9:
            return None
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    # timedelta's limit: larger is no sensible snapshot either
    return value if value <= 999_999_999 else None


#: Topics a subscription may name at most (a list of them, as 2022 apps may send).
MAX_TOPICS = 16


def subscription_topics(topic) -> Optional[Tuple[str, ...]]:
    """
    The bus topics that the ``topic`` of a subscribe request names, or None
    if it names none the bus serves: a topic, ``stix2/`` as ``stix2``, or a
    list of STIX-2 topics (only Threat Bus 2021 and later sends lists).
    """
    if isinstance(topic, str):
        return _topic(topic)
    if not isinstance(topic, list) or len(topic) > MAX_TOPICS:
        return None
    topics = []
    for each in topic:
        if not isinstance(each, str):
            return None
        each = each[:-1] if each.endswith("/") else each
        if not is_stix_topic(each) or not snapshot_types(each):
            return None
        if each not in topics:
            topics.append(each)
    return tuple(topics)


#: The topics found served, as ``_topic`` gives them: apps name the same few
#: again and again. Only those are kept, a handful (the topics the bus
#: serves and their ancestors): what a peer makes up is never held.
_SERVED: dict = {}


def _topic(topic: str) -> Optional[Tuple[str, ...]]:
    topics = _SERVED.get(topic)
    if topics is None:
        bare = topic[:-1] if topic.endswith("/") else topic
        if not snapshot_types(bare):
            return None
        topics = _SERVED[topic] = (bare,)
    return topics


#: Where a request came from: its network address, or a callable that gives it.
Peer = Union[str, Callable[[], str]]


class ManagementHandler:
    """
    Answers management requests for the subscriptions of one zmq-app.

    @param endpoints: the endpoint fields of a subscribe reply.
    """

    def __init__(self, subscriptions, endpoints: dict, metrics, clock):
        self._subscriptions = subscriptions
        self._endpoints = endpoints
        self._metrics = metrics
        self._throttle = logs.Throttle(clock)
        # A subscribe reply is this with its P2P topic (32 letters) between
        # the quotes of the first "": json.dumps would write just that.
        template = json.dumps(self._subscribed("")).encode()
        self._head, self._tail = template.split(b'""', 1)

    def _subscribed(self, p2p: str) -> dict:
        return {"topic": p2p, **self._endpoints, "status": "success"}

    def answer(self, frames: Sequence[bytes], peer: Peer = "") -> bytes:
        """The JSON of the reply to a request of ``frames`` from ``peer``."""
        reply = self.handle(frames, peer)
        wire = _ENCODED.get(id(reply))
        if wire is None:  # a subscribe's: every other reply is a constant
            wire = b'%s"%s"%s' % (self._head, reply["topic"].encode("ascii"), self._tail)
        return wire

    def handle(self, frames: Sequence[bytes], peer: Peer = "") -> dict:
        """
        The reply to a request of ``frames`` from network address ``peer``:
        a string, or a callable that gives it (called only for a subscribe,
        the one request that needs it).
        """
        if len(frames) != 1:
            return self._error("a request of {n} frames", n=len(frames))
        try:
            request = codec.loads(frames[0])
        except codec.DecodeError as e:
            return self._error("a request that is not JSON: {e}", e=str(e))
        if not isinstance(request, dict):
            return self._error("a request that is not a JSON object")
        action, topic = request.get("action"), request.get("topic")
        # a missing or empty topic (``""``, ``[]``) is no request, as both
        # generations of Threat Bus have it
        if action not in _ACTIONS or topic is None or topic == "" or topic == []:
            self._metrics.drop("manage_unknown_request")
            self._throttle(
                "unknown", log.debug, "Unknown management request {request!r}", request=request
            )
            return UNKNOWN
        if action == "subscribe":
            return self._subscribe(topic, request.get("snapshot"), peer if type(peer) is str else peer())
        if not isinstance(topic, str):
            return self._error("a topic that is not a string: {topic!r}", topic=topic)
        if action == "heartbeat":
            ok = self._subscriptions.heartbeat(topic)
        else:
            ok = self._subscriptions.unsubscribe(topic)
        return SUCCESS if ok else ERROR

    def _subscribe(self, topic, snapshot, peer: str) -> dict:
        days = snapshot_days(snapshot)
        if days is None:
            return self._error("a snapshot that is not a number of days: {s!r}", s=snapshot)
        topics = subscription_topics(topic)
        if topics is None:
            return self._error("a subscription to unknown topic {topic!r}", topic=topic)
        refusal = self._subscriptions.refusal(peer)
        if refusal is not None:
            self._throttle(
                refusal,
                log.warn,
                "Refused a subscription to {topic} from {peer}: {limit} reached",
                topic=topic,
                peer=peer,
                limit=refusal,
            )
            self._metrics.drop(refusal)
            return ERROR
        sub = self._subscriptions.subscribe(topics, timedelta(days=days), peer)
        return self._subscribed(sub.p2p)

    def _error(self, what: str, **fields) -> dict:
        self._metrics.drop("manage_error")
        self._throttle(what, log.info, "Answered error to " + what, **fields)
        return ERROR


def peer_address(frame) -> str:
    """The network address that ``frame`` came from ("" if it has none)."""
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return ""


class ManageConnection(BatchedReadConnection):
    """
    The management endpoint's REP socket, answering each request with
    ``answer(frames, peer)`` as it reads it. A REP drops, never blocks, a
    reply that an app's full queue cannot take.
    """

    socketType = zmq.REP

    def __init__(self, factory, answer, max_message_size: int):
        self._answer = answer
        BatchedReadConnection.__init__(self, factory)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_size)

    def messageReceived(self, message):
        try:
            reply = self._answer(message, self._peer)
        except Exception:
            # a REP reads the next request only once this one is answered
            log.failure("Answering a management request failed")
            reply = encode(ERROR)
        self.socket.send(reply, _NOBLOCK)

    def _peer(self) -> str:
        return peer_address(self.frame)
