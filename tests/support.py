"""
Test support: a running bus on ephemeral ports, and pyzmq apps that talk to
it without blocking the reactor (non-blocking calls, polled with deadlines).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import attrs
import zmq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

from txthreatbus.config import Config, ZmqAppConfig
from txthreatbus.tap import bus_service

#: Seconds any single wait in a socket-level test may take.
DEADLINE = 10.0


class Timeout(AssertionError):
    """A condition did not come true before its deadline."""


async def wait_for(predicate, timeout: float = DEADLINE, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value, and return that value."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise Timeout(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, 0.002, lambda: None)


async def settle(seconds: float) -> None:
    """Let the reactor run for ``seconds`` (to show that nothing arrives)."""
    await deferLater(reactor, seconds, lambda: None)


_reachable: dict = {}



def free_ports(n: int) -> list:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago (bound, then closed)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()

def require_service(testcase, address, what: str) -> None:
    """
    Skip ``testcase`` unless ``address`` (host, port) takes connections,
    saying that ``what`` is missing there; in CI (``CI=true``) fail instead:
    CI must run every test.
    """
    if address not in _reachable:
        try:
            socket.create_connection(address, 2).close()
            _reachable[address] = True
        except OSError:
            _reachable[address] = False
    if _reachable[address]:
        return
    reason = f"no {what} on {address[0]}:{address[1]}"
    if os.environ.get("CI") == "true":
        testcase.fail(reason + ", and CI=true: CI must run these tests")
    raise SkipTest(reason)


#: The test PostgreSQL database (trust auth), on every developer and CI machine.
POSTGRESQL = "postgresql://postgres@127.0.0.1:5432/test"


def postgresql_schema(testcase):
    """
    A fresh schema in the test PostgreSQL database, dropped at the end of
    the test (ask for it before starting buses, so that it is dropped after
    they stopped), or SkipTest: the store URL that uses it, its name, and an
    engine to look at it.
    """
    import sqlalchemy as sa
    from twisted.internet.threads import deferToThread

    from txthreatbus.store.database import engine_url

    require_service(testcase, ("127.0.0.1", 5432), "PostgreSQL (user postgres, trust auth, database test)")
    schema = "txtb_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(engine_url(POSTGRESQL))
    with engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))

    def drop():
        with engine.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()

    testcase.addCleanup(deferToThread, drop)
    return f"{POSTGRESQL}?options=-csearch_path%3D{schema}", schema, engine


def start_bus(testcase, config: Config = None, **zmq_app):
    """
    Start a whole bus (as ``twistd zmq-app`` would) on ephemeral ports and
    stop it at the end of the test. Returns its top service.
    """
    if config is None:
        config = Config(apps={"zmq-app": ZmqAppConfig(**{"manage": 0, "pub": 0, "sub": 0, **zmq_app})}, store=None)
    top = bus_service(config, reactor)
    top.startService()
    testcase.addCleanup(top.stopService)
    return top


def zmq_app_of(top):
    return top.getServiceNamed("zmq-app")


class Context:
    """A pyzmq context closed at the end of the test."""

    def __init__(self, testcase):
        self.ctx = zmq.Context()
        testcase.addCleanup(self.ctx.destroy, 0)

    def socket(self, kind, connect: str = None):
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if connect:
            s.connect(connect)
        return s


async def request(sock, payload, timeout: float = DEADLINE):
    """Send ``payload`` (a JSON value, or raw bytes/frames) and await the JSON reply."""
    if isinstance(payload, list):
        sock.send_multipart(payload)
    elif isinstance(payload, bytes):
        sock.send(payload)
    else:
        sock.send(json.dumps(payload).encode())
    frames = await receive(sock, 1, timeout)
    return json.loads(frames[0])


async def receive(sock, n: int, timeout: float = DEADLINE) -> list:
    """Await ``n`` messages on ``sock`` (single-frame ones as bytes)."""
    got = []

    def more():
        while len(got) < n:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            got.append(frames[0] if len(frames) == 1 else frames)
        return True

    try:
        await wait_for(more, timeout, f"{n} messages")
    except Timeout:
        raise Timeout(f"timed out after {timeout} s waiting for {n} messages: got {len(got)}") from None
    return got


def drain(sock) -> list:
    """Whatever ``sock`` has received so far, without waiting."""
    got = []
    while True:
        try:
            got.append(sock.recv(zmq.NOBLOCK))
        except zmq.Again:
            return got


@attrs.define
class App:
    """An app as Threat Bus apps are written: REQ to manage, SUB, PUB."""

    manage: object
    sub: object = None
    pub: object = None
    p2p: str = None
    reply: dict = None
    endpoints: dict = None

    @classmethod
    def on(cls, ctx: Context, top):
        port = zmq_app_of(top).ports["manage"]
        return cls(manage=ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{port}"))

    async def subscribe(self, ctx: Context, topic, snapshot=0, connect_sub: bool = True):
        """
        Subscribe to ``topic`` and connect, as an app of the topic's
        generation does: a 2020 app to the endpoints the reply names, a
        STIX-2 one (``stix2...`` or a list) to the reply's ports on the
        manage host.
        """
        self.reply = await request(self.manage, {"action": "subscribe", "topic": topic, "snapshot": snapshot})
        assert self.reply["status"] == "success", self.reply
        self.p2p = self.reply["topic"]
        if isinstance(topic, list) or topic.startswith("stix2"):
            self.endpoints = {key: f"127.0.0.1:{self.reply[key + '_port']}" for key in ("pub", "sub")}
        else:
            self.endpoints = {key: self.reply[key + "_endpoint"] for key in ("pub", "sub")}
        self.pub = ctx.socket(zmq.PUB)
        # a burst must not meet the PUB socket's own high-water mark (1,000)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.connect("tcp://" + self.endpoints["sub"])
        if connect_sub:
            self.connect_sub(ctx)
        return self.reply

    def connect_sub(self, ctx: Context):
        self.sub = ctx.socket(zmq.SUB, "tcp://" + self.endpoints["pub"])
        self.sub.setsockopt_string(zmq.SUBSCRIBE, self.p2p)

    async def wait_connected(self, top):
        """Wait until the bus has seen this app's SUB subscribe."""
        sub = zmq_app_of(top).subscriptions.get(self.p2p)
        await wait_for(lambda: sub.ready, what=f"{self.p2p} to be connected")

    async def heartbeat(self):
        return await request(self.manage, {"action": "heartbeat", "topic": self.p2p})

    async def unsubscribe(self):
        return await request(self.manage, {"action": "unsubscribe", "topic": self.p2p})

    def publish(self, topic: str, body) -> None:
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        self.pub.send(topic.encode() + b" " + body)

    async def receive(self, n: int, timeout: float = DEADLINE):
        """The next ``n`` messages as (suffix, JSON value) pairs."""
        frames = await receive(self.sub, n, timeout)
        return [self.parse(f) for f in frames]

    def parse(self, frame: bytes):
        head, _, body = frame.partition(b" ")
        assert head.startswith(self.p2p.encode()), frame
        return head[len(self.p2p):].decode(), json.loads(body)


async def connected_apps(ctx: Context, top, *topics) -> list:
    """Subscribed, connected apps on ``top``, one per topic (a topic or a list of them)."""
    apps = []
    for topic in topics:
        app = App.on(ctx, top)
        await app.subscribe(ctx, topic)
        await app.wait_connected(top)
        apps.append(app)
    return apps


async def publish_until_seen(publisher: App, topic: str, body, receivers, timeout=DEADLINE):
    """
    Publish probes until every receiver got one: a PUB socket drops what it
    sends before its connection is up (ZeroMQ's slow joiner), so tests
    first make sure the app-to-bus path is live. Returns nothing; the probes
    are drained from the receivers.
    """
    seen = set()

    def all_seen():
        publisher.publish(topic, body)
        seen.update(i for i, r in enumerate(receivers) if drain(r.sub))
        return len(seen) == len(receivers)

    await wait_for(all_seen, timeout, "the publisher's connection")
    await settle(0.05)
    for r in receivers:
        drain(r.sub)
