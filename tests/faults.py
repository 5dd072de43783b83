"""
Fault scenarios with real processes, shared by tests/test_broker_faults.py
and bench/faults.py (issue 14, point 3).

A scenario runs two instances, A and B (``twistd -n zmq-app``, each on free
ports), with the rabbitmq backbone on a RabbitMQ node of their own
(tests/rabbitmq_node.py) and durable queues that outlive them (``durable:
true, auto_delete: false, lazy: true``); a subscriber app to
``threatbus/intel`` at A and one at B, and a publisher app at A sending Intel
at a steady rate. The apps are txthreatbus.client ``Client``s, which
heartbeat and subscribe again when the bus forgot them, as Threat Bus apps
do (here every 0.5 s, so that they notice a restart quickly). Once every
subscriber sees the probes come through, the publisher sends N Intel; when a
quarter is sent, the fault happens (the publishing goes on meanwhile):

- ``broker-kill``: the node SIGKILLed and started again (same data);
- ``broker-stop``: ``rabbitmqctl stop_app``, ``outage`` seconds, ``start_app``;
- ``broker-pause``: the node's VM SIGSTOPped for ``outage`` seconds, SIGCONT;
- ``instance-kill``: B SIGKILLed and started again;
- ``instance-term``: B SIGTERMed, once it has exited started again.

Then each subscriber's figures: received (distinct), missing, duplicated.
``sigterm_while_hung`` measures how long SIGTERM takes to end an instance
while the broker is SIGSTOPped.

Everything runs on a running reactor (trial's, or ``task.react``); the
node's blocking calls run in threads. Every wait has a deadline, and
``Rig.down`` always kills what it started.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from datetime import datetime
from typing import Callable, Dict, List, Optional

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.rabbitmq_node import RabbitMQNode
from tests.support import free_ports
from tests.test_tap import REPO_ROOT, TWISTD, ProcessOutput
from txthreatbus.client import Client
from txthreatbus.model import CLASSES, Intel, IntelData, IntelType, Operation

#: Seconds an instance may take to start (to listen on its manage port) or to stop.
INSTANCE_DEADLINE = 60.0
#: Seconds for the first probe to reach every subscriber.
PROBE_DEADLINE = 60.0
#: The apps' heartbeat interval and management request timeout (seconds).
HEARTBEAT = 0.5
REQUEST_TIMEOUT = 1.0
#: What SIGTERM may take, the broker hung (README: stopping waits up to 5 s).
TERM_TARGET = 5.0


class ScenarioError(RuntimeError):
    """The set-up failed (not a target missed): an instance or the node did not start."""


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` every ``interval`` until true; ScenarioError after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise ScenarioError(f"timed out after {timeout:g} s waiting for {what}")
        await sleep(interval)


def in_thread(f, *args, **kwargs) -> Deferred:
    return deferToThread(f, *args, **kwargs)


# --- the instances


class TimedOutput(ProcessOutput):
    """ProcessOutput that also notes when each chunk of output arrived."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def outReceived(self, data):
        super().outReceived(data)
        self.chunks.append((time.monotonic(), data))

    errReceived = outReceived

    def when(self, text: str) -> List[float]:
        """When lines holding ``text`` arrived (monotonic times)."""
        return [t for t, data in self.chunks for line in data.decode("utf-8", "replace").splitlines()
                if text in line]


class Instance:
    """
    One ``twistd -n zmq-app`` instance on the node: its config (free ports,
    kept across restarts), its process, and everything it printed, every
    run of it in ``log_path``.
    """

    def __init__(
        self,
        name: str,
        node: RabbitMQNode,
        tag: str,
        workdir: str,
        backbone: Optional[dict] = None,
        port: Optional[int] = None,
        host: str = "127.0.0.1",
    ):
        self.name = name
        self.host = host
        self.node = node
        self.tag = tag
        self.workdir = workdir
        self.suffix = f"{tag}-{name.lower()}"
        self.manage, self.pub, self.sub = free_ports(3)
        self.port = port if port is not None else node.amqp_port
        self.backbone = dict(backbone or {})
        self.process: Optional[ProcessOutput] = None
        self.runs: List[ProcessOutput] = []
        self.config_path = os.path.join(workdir, f"{self.suffix}.yaml")
        self.log_path = os.path.join(workdir, f"{self.suffix}.log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.manage}"

    def config(self, grace: float) -> dict:
        rabbitmq = {
            "host": self.host,
            "port": self.port,
            "username": self.node.username,
            "password": self.node.password,
            "vhost": self.node.vhost,
            "naming_join_pattern": f".{self.tag}.",
            "queue": {
                "name_suffix": self.suffix,
                "durable": True,
                "auto_delete": False,
                "lazy": True,
                "exclusive": False,
            },
            "resubscribe_grace": grace,
            **self.backbone,
        }
        return {
            "store": False,
            "logging": {"console": True, "console_verbosity": "INFO", "file": False},
            "plugins": {
                "backbones": {"rabbitmq": rabbitmq},
                "apps": {
                    "zmq-app": {"host": "127.0.0.1", "manage": self.manage, "pub": self.pub, "sub": self.sub}
                },
            },
        }

    @property
    def running(self) -> bool:
        return self.process is not None and not self.process.done

    def spawn(self, grace: float) -> ProcessOutput:
        """Start the process (config written anew with ``grace``); returns at once."""
        if self.running:
            raise ScenarioError(f"instance {self.name} runs already")
        with open(self.config_path, "w") as f:
            json.dump(self.config(grace), f, indent=1)  # JSON is YAML
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        process = TimedOutput()
        process.started = time.monotonic()
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", "", "zmq-app", "--config", self.config_path]
        reactor.spawnProcess(process, sys.executable, argv, env=env, path=self.workdir)
        self.process = process
        self.runs.append(process)
        return process

    async def start(self, grace: float) -> float:
        """Start, and wait until it listens on its manage port; the seconds it took."""
        process = self.spawn(grace)
        listening = f"manage endpoint listening on 127.0.0.1:{self.manage}"
        await until(
            lambda: process.done or listening in process.text(),
            INSTANCE_DEADLINE,
            f"instance {self.name} to listen on {self.manage}",
        )
        if process.done:
            raise ScenarioError(f"instance {self.name} exited while starting:\n{tail(process.text())}")
        return time.monotonic() - process.started

    def signal(self, name: str) -> None:
        if self.running:
            self.process.transport.signalProcess(name)

    async def ended(self, timeout: float) -> Optional[float]:
        """Wait up to ``timeout`` s for the process to end: the seconds since it was signalled, or None."""
        process = self.process
        t0 = time.monotonic()
        try:
            await until(lambda: process.done, timeout, f"instance {self.name} to end")
        except ScenarioError:
            return None
        return time.monotonic() - t0

    async def stop(self, timeout: float = INSTANCE_DEADLINE) -> Optional[float]:
        """SIGTERM; SIGKILL after ``timeout`` s. The seconds SIGTERM took, or None."""
        if not self.running:
            return 0.0
        self.signal("TERM")
        took = await self.ended(timeout)
        if took is None:
            await self.kill()
        return took

    async def kill(self) -> None:
        if self.running:
            await self.process.kill()

    def text(self) -> str:
        """What every run printed."""
        return "".join(f"--- run {i + 1}\n" + p.text() for i, p in enumerate(self.runs))

    def save_log(self) -> None:
        with open(self.log_path, "w") as f:
            f.write(self.text())

    def when(self, text: str) -> List[float]:
        """When lines holding ``text`` were printed, over every run (monotonic times)."""
        return [t for p in self.runs for t in p.when(text)]

    def notable(self) -> List[str]:
        """The lines of the backbone's and of trouble (warnings up), for reports."""
        keys = ("RabbitMQ", "rabbitmq", "backbone", "critical", "CRITICAL", "error", "Traceback",
                "Unhandled", "unrouted", "--- run")
        return [line for line in self.text().splitlines() if any(k in line for k in keys)]


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


# --- the apps


class Subscriber:
    """What one subscriber app received: each Intel of the run once, and how often twice."""

    def __init__(self, name: str, prefix: str, n: int):
        self.name = name
        self.prefix = prefix
        self.n = n
        self.seen = bytearray(n)
        self.received = 0
        self.duplicated = 0
        self.probes = 0
        self.other = 0
        self.last = None
        self.subscription = None

    def __call__(self, message) -> None:
        if not isinstance(message, Intel) or not message.id.startswith(self.prefix):
            self.other += 1
            return
        rest = message.id[len(self.prefix):]
        if rest.startswith("probe"):
            self.probes += 1
            return
        i = int(rest)
        self.last = time.monotonic()
        if self.seen[i]:
            self.duplicated += 1
            return
        self.seen[i] = 1
        self.received += 1

    @property
    def complete(self) -> bool:
        return self.received == self.n

    def missing_ranges(self) -> List[tuple]:
        """The missing sequence numbers, as (first, last) ranges."""
        ranges, start = [], None
        for i, got in enumerate(self.seen):
            if not got and start is None:
                start = i
            elif got and start is not None:
                ranges.append((start, i - 1))
                start = None
        if start is not None:
            ranges.append((start, self.n - 1))
        return ranges

    def counts(self) -> "Counts":
        return Counts(
            self.received, self.n - self.received, self.duplicated,
            self.subscription.resubscriptions if self.subscription else 0, self.missing_ranges(),
        )


@attrs.frozen
class Counts:
    received: int
    missing: int
    duplicated: int
    resubscriptions: int
    missing_ranges: list

    def row(self) -> str:
        return f"{self.received}/{self.missing}/{self.duplicated}"


def intel(id: str) -> Intel:
    return Intel(
        ts=datetime(2020, 11, 26, 14, 46, 52),
        id=id,
        data=IntelData(indicator=(f"evil-{id}.example.com",), intel_type=IntelType.DOMAIN),
        operation=Operation.ADD,
    )


def client(endpoint: str) -> Client:
    c = Client(
        endpoint,
        heartbeat_interval=HEARTBEAT,
        request_timeout=REQUEST_TIMEOUT,
        backoff_initial=0.25,
        backoff_max=1.0,
        linger=1.0,
    )
    c.startService()
    return c


# --- one run


@attrs.define
class Timeline:
    """Events of a run, in seconds since the first Intel was sent."""

    t0: float = 0.0
    events: list = attrs.Factory(list)

    def mark(self, what: str, at: Optional[float] = None) -> None:
        """Note ``what`` as it happens, or as it happened at monotonic time ``at``."""
        self.events.append((round((time.monotonic() if at is None else at) - self.t0, 2), what))
        self.events.sort(key=lambda e: e[0])

    def __str__(self):
        return "; ".join(f"{t:g} s {what}" for t, what in self.events)


class Rig:
    """
    One run's instances and apps on ``node``, names of its own on the broker
    (``tag``). ``up()`` starts them and waits for the probes; ``down()``
    stops everything (and kills what does not stop).
    """

    def __init__(
        self,
        node: RabbitMQNode,
        workdir: str,
        n: int,
        backbone: Optional[dict] = None,
        port: Optional[int] = None,
        host: str = "127.0.0.1",
    ):
        self.node = node
        self.tag = "f" + secrets.token_hex(4)
        self.workdir = os.path.join(workdir, self.tag)
        os.makedirs(self.workdir)
        self.n = n
        self.a = Instance("A", node, self.tag, self.workdir, backbone, port, host)
        self.b = Instance("B", node, self.tag, self.workdir, backbone, port, host)
        self.prefix = f"{self.tag}-"
        self.subscribers = {"A": Subscriber("A", self.prefix, n), "B": Subscriber("B", self.prefix, n)}
        self.clients: List[Client] = []
        self.publisher = None
        self.timeline = Timeline()
        self.sent = 0
        self.send_times: List[float] = []

    @property
    def instances(self) -> Dict[str, Instance]:
        return {"A": self.a, "B": self.b}

    async def up(self) -> None:
        for d in [ensureDeferred(i.start(grace=0)) for i in (self.a, self.b)]:
            await d
        for name, instance in self.instances.items():
            c = client(instance.endpoint)
            self.clients.append(c)
            sub = self.subscribers[name]
            sub.subscription = await c.subscribe("threatbus/intel", callback=sub)
        c = client(self.a.endpoint)
        self.clients.append(c)
        self.publisher = await c.subscribe("threatbus/sighting")
        await self.publisher.connected("threatbus/intel").addTimeout(PROBE_DEADLINE, reactor)
        k = 0
        end = time.monotonic() + PROBE_DEADLINE
        while not all(s.probes for s in self.subscribers.values()):
            if time.monotonic() > end:
                late = [s.name for s in self.subscribers.values() if not s.probes]
                raise ScenarioError(f"no probe reached the subscriber(s) at {late} within {PROBE_DEADLINE:g} s")
            self.publisher.publish_intel(intel(f"{self.prefix}probe{k}"))
            k += 1
            await sleep(0.2)
        await sleep(1.0)  # late probes drain

    async def send(self, rate: float, fault=None, fault_at: float = 0.25) -> None:
        """
        Send the run's N Intel at ``rate``/s; once ``fault_at`` of them are
        sent, run ``fault(rig)`` (a coroutine function) beside; return once
        both are done.
        """
        self.timeline.t0 = t0 = time.monotonic()
        fault_done = None
        tick = 0.01
        i = 0
        while i < self.n:
            due = min(self.n, int((time.monotonic() - t0) * rate) + 1)
            while i < due:
                self.publisher.publish_intel(intel(f"{self.prefix}{i}"))
                self.send_times.append(time.monotonic() - t0)
                i += 1
                self.sent = i
                if fault is not None and fault_done is None and i >= self.n * fault_at:
                    self.timeline.mark(f"fault starts ({i} sent)")
                    fault_done = ensureDeferred(fault(self))
            await sleep(tick)
        self.timeline.mark(f"all {self.n} sent")
        if fault_done is not None:
            await fault_done

    async def collect(self, idle: float, deadline: float, settle: float = 2.0) -> Dict[str, Counts]:
        """
        Wait until every subscriber has all N, or nothing new arrived for
        ``idle`` s (at most ``deadline`` s); then ``settle`` s more for late
        duplicates. Each subscriber's counts.
        """
        end = time.monotonic() + deadline
        subs = list(self.subscribers.values())
        since = time.monotonic()
        progress = -1
        while not all(s.complete for s in subs) and time.monotonic() < end:
            now = sum(s.received + s.duplicated for s in subs)
            if now != progress:
                progress, since = now, time.monotonic()
            elif time.monotonic() - since > idle:
                break
            await sleep(0.1)
        self.timeline.mark("deliveries ended" if all(s.complete for s in subs) else "gave up waiting")
        await sleep(settle)
        return {name: s.counts() for name, s in self.subscribers.items()}

    def seconds_of(self, seq: int) -> Optional[float]:
        """When Intel ``seq`` was sent, in seconds since the first."""
        return round(self.send_times[seq], 2) if 0 <= seq < len(self.send_times) else None

    async def down(self) -> None:
        """Stop the apps and the instances (SIGTERM, SIGKILL after a deadline); keep their logs."""
        for c in self.clients:
            try:
                await c.stopService().addTimeout(10, reactor)
            except Exception:
                pass
        self.clients = []
        for d in [ensureDeferred(i.stop(timeout=15)) for i in (self.a, self.b)]:
            try:
                await d
            except Exception:
                pass
        for i in (self.a, self.b):
            await i.kill()
            i.save_log()


# --- the faults


def timed(f, *args):
    """In a thread: ``f(*args)``, and the monotonic time it returned at."""

    def call():
        result = f(*args)
        return result, time.monotonic()

    return in_thread(call)


async def broker_kill(rig: Rig, outage: float, grace: float) -> None:
    """SIGKILL the node, and start it again at once on the same data (it is away while it starts)."""
    _, at = await timed(rig.node.kill)
    rig.timeline.mark("broker killed", at)
    took, at = await timed(rig.node.start)
    rig.timeline.mark(f"broker up again (its start took {took:.1f} s)", at)


async def broker_stop(rig: Rig, outage: float, grace: float) -> None:
    """rabbitmqctl stop_app; ``outage`` s; start_app."""
    _, at = await timed(rig.node.stop_app)
    rig.timeline.mark("broker stopped (stop_app)", at)
    await sleep(outage)
    took, at = await timed(rig.node.start_app)
    rig.timeline.mark(f"broker started (start_app took {took:.1f} s)", at)


async def broker_pause(rig: Rig, outage: float, grace: float) -> None:
    """SIGSTOP the node's VM for ``outage`` s, then SIGCONT."""
    _, at = await timed(rig.node.pause)
    rig.timeline.mark("broker SIGSTOPped", at)
    await sleep(outage)
    _, at = await timed(rig.node.resume)
    rig.timeline.mark("broker SIGCONTinued", at)


async def _restart_b(rig: Rig, grace: float) -> None:
    took = await rig.b.start(grace=grace)
    rig.timeline.mark(f"B listening again ({took:.1f} s after its start; resubscribe_grace {grace:g} s)")


async def instance_kill(rig: Rig, outage: float, grace: float) -> None:
    """SIGKILL instance B, and start it again at once (with ``grace``)."""
    await rig.b.kill()
    rig.timeline.mark("B killed")
    await _restart_b(rig, grace)


async def instance_term(rig: Rig, outage: float, grace: float) -> None:
    """SIGTERM instance B; once it has ended, start it again (with ``grace``)."""
    rig.b.signal("TERM")
    took = await rig.b.ended(INSTANCE_DEADLINE)
    if took is None:
        await rig.b.kill()
        rig.timeline.mark(f"B did not end within {INSTANCE_DEADLINE:g} s of SIGTERM: killed")
    else:
        rig.timeline.mark(f"B ended {took:.1f} s after SIGTERM")
    await _restart_b(rig, grace)


@attrs.frozen
class Scenario:
    name: str
    title: str
    #: ``fault(rig, outage, grace)``: a coroutine function
    fault: Callable
    #: duplicates tolerated at B (README: after a crash, what was handed on
    #: but not yet acknowledged comes again once)
    b_duplicates_allowed: bool = False


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("broker-kill", "broker SIGKILL + restart", broker_kill),
        Scenario("broker-stop", "broker stopped (stop_app), then started", broker_stop),
        Scenario("broker-pause", "broker SIGSTOP, then SIGCONT", broker_pause),
        Scenario("instance-kill", "instance B SIGKILL + restart", instance_kill, b_duplicates_allowed=True),
        Scenario("instance-term", "instance B SIGTERM + restart", instance_term),
    )
}


@attrs.define
class Result:
    scenario: Scenario
    counts: Dict[str, Counts]
    timeline: Timeline
    seconds: float
    #: the missing ranges with the seconds they were sent at, for people
    notes: List[str]
    logs: Dict[str, List[str]]

    def failures(self) -> List[str]:
        """The targets missed: nothing missing anywhere; no duplicates but where tolerated."""
        out = []
        for name, c in self.counts.items():
            if c.missing:
                out.append(f"{self.scenario.name}: {c.missing} missing at {name}")
            if c.duplicated and not (name == "B" and self.scenario.b_duplicates_allowed):
                out.append(f"{self.scenario.name}: {c.duplicated} duplicated at {name}")
        return out

    def report(self) -> str:
        lines = [f"{self.scenario.title}: " + ", ".join(
            f"{name} {c.received} received, {c.missing} missing, {c.duplicated} duplicated"
            f" ({c.resubscriptions} resubscriptions)" for name, c in self.counts.items())]
        lines.append(f"  timeline: {self.timeline}")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


async def run_scenario(
    node: RabbitMQNode,
    workdir: str,
    scenario: Scenario,
    n: int,
    rate: float,
    outage: float,
    grace: float,
    idle: float = 15.0,
    backbone: Optional[dict] = None,
) -> Result:
    """
    One run of ``scenario`` with fresh instances (and queue names) on a
    running ``node``: its counts and timeline. ScenarioError if the set-up
    fails. The node is running again at the end.
    """
    rig = Rig(node, workdir, n, backbone)
    t0 = time.monotonic()
    try:
        await rig.up()
        await rig.send(rate, lambda r: scenario.fault(r, outage, grace))
        deadline = n / rate + outage + grace + 180
        counts = await rig.collect(idle=max(idle, grace + 10), deadline=deadline)
    finally:
        if node.paused:
            await in_thread(node.resume)
        await rig.down()
    for name, instance in rig.instances.items():
        for at in instance.when("Reconnected to RabbitMQ"):
            rig.timeline.mark(f"{name} reconnected", at)
    notes = []
    for name, c in counts.items():
        for first, last in c.missing_ranges[:5]:
            notes.append(
                f"missing at {name}: #{first}-#{last}, sent {rig.seconds_of(first)}-{rig.seconds_of(last)} s"
            )
        if len(c.missing_ranges) > 5:
            notes.append(f"missing at {name}: {len(c.missing_ranges) - 5} more ranges")
    return Result(
        scenario, counts, rig.timeline, round(time.monotonic() - t0, 1), notes,
        {name: i.notable() for name, i in rig.instances.items()},
    )


async def sigterm_while_hung(node: RabbitMQNode, workdir: str, rate: float = 250.0,
                             backbone: Optional[dict] = None) -> Dict[str, Optional[float]]:
    """
    With traffic flowing, SIGSTOP the broker, let A gather 1 s of
    unconfirmed messages, then SIGTERM both instances: the seconds each took
    to end (None: not within INSTANCE_DEADLINE, then killed). A has
    outgoing messages waiting for confirms; B has none.
    """
    rig = Rig(node, workdir, n=int(rate * 600), backbone=backbone)
    took = {}
    try:
        await rig.up()
        sending = ensureDeferred(rig.send(rate))
        sending.addErrback(lambda f: None)  # ends when A is gone (its errors are no matter)
        await sleep(1.0)
        await in_thread(node.pause)
        await sleep(1.0)
        for instance in (rig.a, rig.b):
            instance.signal("TERM")
        ends = {name: ensureDeferred(i.ended(INSTANCE_DEADLINE)) for name, i in rig.instances.items()}
        for name, d in ends.items():
            took[name] = await d
        sending.cancel()
    finally:
        rig.n = 0  # the sender stops
        if node.paused:
            await in_thread(node.resume)
        await rig.down()
    return took


async def delete_names(node: RabbitMQNode, tag: str, suffixes) -> None:
    """Delete a run's queues and exchanges from ``node`` (pika, in a thread)."""

    def delete():
        import pika

        connection = pika.BlockingConnection(
            pika.ConnectionParameters(node.host, node.amqp_port, node.vhost,
                                      pika.PlainCredentials(node.username, node.password))
        )
        try:
            channel = connection.channel()
            join = f".{tag}."
            for kind in (cls.kind for cls in CLASSES):
                for suffix in suffixes:
                    channel.queue_delete(join.join(("threatbus", kind, suffix)))
                channel.exchange_delete(join.join(("threatbus", kind)))
        finally:
            connection.close()

    await in_thread(delete)
