"""
The real upstream apps, unmodified from PyPI, against a real ``twistd -n
zmq-app``: pyvast-threatbus 2020.11.26 (the Threat Bus 2020 generation) and
vast-threatbus / suricata-threatbus 2022.5.16 (the STIX-2 generation) on one
bus, with fake ``vast`` and ``suricatasc`` commands (tests/upstream/bin) first
on their PATH, so that what the apps do shows in the fakes' call logs and in
the Suricata rules file.

One test runs the bus with both app plugins, ``zmq-app`` for the 2020 apps
and ``zmq`` for the 2022 apps, each on its own ports; the others with
``zmq-app`` alone, serving both generations.

The test itself takes part as an app of each generation (pyzmq, as the
upstream apps do it): a 2020 app subscribed to ``threatbus`` and a 2022 app
subscribed to ``["stix2/indicator", "stix2/sighting"]`` (what upstream's own
test receiver asks for).

Each app needs a venv of its own (their ``threatbus`` requirements conflict).
They are built once with pip (requirements in tests/upstream/requirements)
in ``$XDG_CACHE_HOME/txthreatbus-tests`` (``~/.cache`` by default), in a
temporary folder renamed into place when complete, and reused from then on.
When pip cannot install them (no package index), the tests skip, or fail
where ``CI=true``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import string
import sys
import tempfile
import time
import uuid

import attrs
import zmq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import Context, Timeout, request, settle, wait_for
from tests.test_tap import REPO_ROOT, TWISTD, free_ports

log = Logger()

UPSTREAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstream")
FAKES = os.path.join(UPSTREAM, "bin")

#: Seconds to make an empty venv, and to pip install an app into it.
VENV_DEADLINE = 120.0
PIP_DEADLINE = 420.0
#: Seconds for the bus to bind, and for all apps and peers to act on a probe.
START_DEADLINE = 30.0
READY_DEADLINE = 45.0
#: Seconds for one thing to happen once everything runs.
DEADLINE = 20.0
#: Seconds a process gets to end on SIGTERM before its process group is killed.
STOP_GRACE = 3.0
#: Trial's timeout for each test: a cold cache builds three venvs first.
TEST_TIMEOUT = VENV_DEADLINE + PIP_DEADLINE + 120

#: Run a command as the leader of a new process group (``setsid``), so that
#: cleanup can end it together with everything it started.
SETSID_EXEC = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"

DOMAIN, IPSRC = 11, 1
MATCHER = "threatbus-upstream-test"


@attrs.frozen
class Upstream:
    """One upstream app: its PyPI name and version, and its module with a ``main``."""

    name: str
    version: str
    module: str
    config: str

    @property
    def requirements(self) -> str:
        return os.path.join(UPSTREAM, "requirements", f"{self.name}-{self.version}.txt")


PYVAST_2020 = Upstream(
    "pyvast-threatbus", "2020.11.26", "pyvast_threatbus.pyvast_threatbus", "pyvast-threatbus.yaml"
)
VAST_2022 = Upstream("vast-threatbus", "2022.5.16", "vast_threatbus.vast_threatbus", "vast-threatbus.yaml")
SURICATA_2022 = Upstream(
    "suricata-threatbus", "2022.5.16", "suricata_threatbus.suricata", "suricata-threatbus.yaml"
)


# --- venvs ---------------------------------------------------------------


class Unavailable(Exception):
    """An app's venv cannot be built here (no package index, no venv module)."""


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "txthreatbus-tests")


def venv_path(app: Upstream) -> str:
    """Where ``app``'s venv lives: named by its version, this Python and its requirements."""
    digest = hashlib.sha256()
    with open(app.requirements, "rb") as f:
        digest.update(f.read())
    base = getattr(sys, "_base_executable", None) or sys.executable
    digest.update(os.path.realpath(base).encode())
    python = f"py{sys.version_info[0]}.{sys.version_info[1]}"
    return os.path.join(cache_root(), f"{app.name}-{app.version}-{python}-{digest.hexdigest()[:12]}")


MARKER = "txthreatbus-tests-complete"


def complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER)) and os.path.exists(os.path.join(path, "bin", "python"))


class Collect(ProcessProtocol):
    """A process's output (stdout and stderr in one), and its end."""

    def __init__(self, name: str):
        self.name = name
        self.output = bytearray()
        self.ended = Deferred()
        self.done = False
        self.code = None
        self.signal = None

    def childDataReceived(self, fd, data):
        self.output += data

    def processEnded(self, reason):
        self.done = True
        self.code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(None)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def describe(self) -> str:
        state = "running" if not self.done else f"ended (code {self.code}, signal {self.signal})"
        return f"--- {self.name}, {state}; its last output:\n{self.tail()}"


def spawn(name: str, argv: list, env: dict, cwd: str) -> Collect:
    """Start ``argv`` as the leader of a new process group."""
    process = Collect(name)
    argv = [sys.executable, "-c", SETSID_EXEC, *argv]
    reactor.spawnProcess(process, sys.executable, argv, env=env, path=cwd)
    process.pid = process.transport.pid
    return process


def signal_group(process: Collect, signum) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        # no such group (yet): the process has not called setsid, or it and
        # everything it started are gone
        if not process.done:
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass


async def stop(process: Collect) -> None:
    """SIGTERM to the process's group, SIGKILL to what is left of it after a grace period."""
    if not process.done:
        signal_group(process, signal.SIGTERM)
        try:
            await wait_for(lambda: process.done, STOP_GRACE, f"{process.name} to end")
        except Timeout:
            pass
    # the group outlives its leader while children of it run (fake matchers)
    signal_group(process, signal.SIGKILL)
    if not process.done:
        await wait_for(lambda: process.done, STOP_GRACE, f"{process.name} to die")


async def run(testcase: TestCase, name: str, argv: list, deadline: float):
    """Run ``argv`` to its end within ``deadline`` seconds (else kill it): (exit code, output)."""
    # Without the test run's PYTHONPATH (trial -j sets it to its sys.path):
    # pip would take the packages found there as installed, and leave them
    # out of the venv (seen: idna, PyYAML)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    process = spawn(name, argv, env, tempfile.gettempdir())
    testcase.addCleanup(stop, process)  # should the test end first (trial's timeout)
    try:
        await wait_for(lambda: process.done, deadline, name)
    except Timeout:
        await stop(process)
        return None, process.text() + f"\n[killed after {deadline} s]"
    return process.code, process.text()


async def build_venv(testcase: TestCase, app: Upstream) -> str:
    """``app``'s venv, built unless the cache has it complete. Raises Unavailable."""
    final = venv_path(app)
    if complete(final):
        return final
    root = os.path.dirname(final)
    try:
        os.makedirs(root, exist_ok=True)
        building = tempfile.mkdtemp(prefix=os.path.basename(final) + ".building-", dir=root)
    except OSError as e:
        raise Unavailable(f"cannot write the venv cache {root}: {e}") from None
    started = time.monotonic()
    try:
        code, output = await run(
            testcase, f"venv for {app.name}", [sys.executable, "-m", "venv", building], VENV_DEADLINE
        )
        if code != 0:
            raise Unavailable(
                f"cannot make a venv for {app.name} ({sys.executable} -m venv): {output[-2000:]}"
            )
        pip = [
            os.path.join(building, "bin", "python"), "-m", "pip", "install",
            "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
            "-r", app.requirements,
        ]  # fmt: skip
        code, output = await run(testcase, f"pip install {app.name}", pip, PIP_DEADLINE)
        if code != 0:
            said = [line for line in output.splitlines() if line.strip()][-3:]
            raise Unavailable(
                f"pip cannot install {app.name}=={app.version} (no package index?): {' | '.join(said)}"
            )
        # only a venv whose app imports is complete
        python = os.path.join(building, "bin", "python")
        code, output = await run(testcase, f"import {app.module}", [python, "-c", f"import {app.module}"], VENV_DEADLINE)
        if code != 0:
            raise AssertionError(f"{app.name}'s venv was installed, but its app does not import:\n{output[-2000:]}")
        with open(app.requirements, encoding="utf-8") as f:
            requirements = f.read()
        with open(os.path.join(building, MARKER), "w", encoding="utf-8") as f:
            json.dump({"requirements": requirements}, f)
        # a venv works from anywhere when started as <venv>/bin/python, which
        # is how the apps run: rename the complete one into place, atomically
        if os.path.exists(final) and not complete(final):
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(building, final)
        except OSError:
            if not complete(final):  # not a concurrent build that won
                raise
        log.info(
            "Built the venv of {app} in {seconds:.1f} s: {path}",
            app=app.name, seconds=time.monotonic() - started, path=final,
        )  # fmt: skip
        return final
    finally:
        shutil.rmtree(building, ignore_errors=True)


#: The venvs built in this run (app name -> path), and the apps that cannot be had.
_venvs: dict = {}
_unavailable: dict = {}


async def venvs(testcase: TestCase, apps: list) -> dict:
    """The venvs of ``apps`` (built concurrently); skips, or fails with CI=true, without them."""
    missing = [a for a in apps if a.name not in _venvs and a.name not in _unavailable]

    async def one(app):
        try:
            _venvs[app.name] = await build_venv(testcase, app)
        except Unavailable as e:
            _unavailable[app.name] = str(e)

    results = await DeferredList([ensureDeferred(one(a)) for a in missing], consumeErrors=True)
    for ok, failure in results:
        if not ok:
            failure.raiseException()
    reasons = [_unavailable[a.name] for a in apps if a.name in _unavailable]
    if reasons:
        reason = "; ".join(reasons)
        if os.environ.get("CI") == "true":
            testcase.fail(reason)
        raise SkipTest(reason)
    return {a.name: _venvs[a.name] for a in apps}


# --- messages ------------------------------------------------------------


def now_2020() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def intel(id: str, intel_type: int, value: str, operation: str = "ADD") -> dict:
    """A Threat Bus 2020 Intel."""
    return {
        "ts": now_2020(),
        "id": id,
        "data": {"indicator": [value], "intel_type": intel_type},
        "operation": operation,
    }


def stix_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def indicator(pattern: str, pattern_type: str = "stix", id: str = None, **custom) -> dict:
    """A STIX-2.1 Indicator, as the 2022 apps and plugins publish one."""
    body = {
        "type": "indicator",
        "spec_version": "2.1",
        "id": id or f"indicator--{uuid.uuid4()}",
        "created": stix_now(),
        "modified": stix_now(),
        "pattern": pattern,
        "pattern_type": pattern_type,
        "valid_from": stix_now(),
    }
    if pattern_type == "stix":
        body["pattern_version"] = "2.1"
    body.update(custom)
    return body


def domain_indicator(value: str, **kw) -> dict:
    return indicator(f"[domain-name:value = '{value}']", **kw)


def suricata_rule(sid: int, msg: str, rev: int = 1) -> str:
    return f'alert ip any any -> any any (msg:"{msg}"; sid:{sid}; rev:{rev};)'


# --- the test as an app --------------------------------------------------


@attrs.define
class Peer:
    """
    The test as an app of one generation (2020 or 2022), as upstream apps are
    written: REQ to manage, SUB on its P2P topic, PUB. Keeps all it receives.
    """

    generation: int
    manage: object
    sub: object = None
    pub: object = None
    p2p: str = None
    received: list = attrs.Factory(list)

    async def subscribe(self, ctx: Context, topic) -> dict:
        reply = await request(self.manage, {"action": "subscribe", "topic": topic, "snapshot": 0})
        if reply.get("status") != "success":
            raise AssertionError(f"the bus refused a {self.generation} subscription to {topic!r}: {reply}")
        self.p2p = reply["topic"]
        if self.generation == 2020:
            pub_endpoint, sub_endpoint = reply["pub_endpoint"], reply["sub_endpoint"]
        else:  # 2022 apps build the endpoints from the manage host and the ports
            if not (reply.get("pub_port") and reply.get("sub_port")):
                raise AssertionError(f"a 2022 subscribe reply without pub_port/sub_port: {reply}")
            pub_endpoint, sub_endpoint = f"127.0.0.1:{reply['pub_port']}", f"127.0.0.1:{reply['sub_port']}"
        self.sub = ctx.socket(zmq.SUB, "tcp://" + pub_endpoint)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, self.p2p)
        self.pub = ctx.socket(zmq.PUB, "tcp://" + sub_endpoint)
        return reply

    def publish(self, topic: str, body: dict) -> None:
        self.pub.send(f"{topic} {json.dumps(body)}".encode())

    def poll(self) -> list:
        """Take in what arrived: the list of (suffix, JSON value) so far."""
        while True:
            try:
                frame = self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self.received
            head, _, body = frame.partition(b" ")
            self.received.append((head[len(self.p2p) :].decode(), json.loads(body)))

    def find(self, suffix: str, predicate) -> list:
        return [body for s, body in self.poll() if s == suffix and predicate(body)]


# --- the bus, the apps and the peers ---------------------------------------


def template(name: str, **values) -> str:
    with open(os.path.join(UPSTREAM, "config", name), encoding="utf-8") as f:
        return string.Template(f.read()).substitute(**values)


def read_calls(path: str) -> list:
    """The records a fake logged (its argv, and more), complete lines only."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


class World:
    """
    A bus (twistd) with the given upstream apps and the two peers, stopped at
    cleanup. With ``two_plugins``, the bus runs both app plugins, ``zmq-app``
    for the 2020 apps and ``zmq`` for the 2022 apps; else ``zmq-app`` for all.
    """

    def __init__(self, testcase: TestCase, apps: list, two_plugins: bool = False):
        self.testcase = testcase
        self.apps = apps
        self.two_plugins = two_plugins
        self.dir = os.path.abspath(testcase.mktemp())
        os.makedirs(self.dir)
        self.processes = {}
        self.workdirs = {}
        self.ctx = Context(testcase)
        self.old = self.new = None
        testcase.addCleanup(self.stop)

    # -- where things show

    def workdir(self, app: Upstream) -> str:
        return self.workdirs[app.name]

    def vast_calls(self, app: Upstream) -> list:
        return [c["argv"] for c in read_calls(os.path.join(self.workdir(app), "vast-calls.jsonl"))]

    def suricatasc_calls(self) -> list:
        """The calls of suricatasc: {"argv": [...], "time": when}."""
        return read_calls(os.path.join(self.workdir(SURICATA_2022), "suricatasc-calls.jsonl"))

    def rules_path(self) -> str:
        return os.path.join(self.workdir(SURICATA_2022), "threatbus.rules")

    def rules(self) -> str:
        with open(self.rules_path(), encoding="utf-8") as f:
            return f.read()

    def suricata_reloaded(self) -> bool:
        """
        suricata-threatbus has had Suricata reload the rules file as it is now,
        and done with it. (It never reloads a change that it made while
        suricatasc ran: it notes the time of a reload only once suricatasc
        ended, after the log line counted here.)
        """
        calls = self.suricatasc_calls()
        done = self.processes[SURICATA_2022.name].text().count("Triggered rule reload")
        return bool(calls) and done == len(calls) and calls[-1]["time"] >= os.path.getmtime(self.rules_path())

    def set_vast_matches(self, app: Upstream, matches: dict) -> None:
        """What ``app``'s fake vast prints for an export whose query contains a key."""
        path = os.path.join(self.workdir(app), "vast-matches.json")
        with open(path + ".new", "w", encoding="utf-8") as f:
            json.dump(matches, f)
        os.replace(path + ".new", path)

    def vast_live_match(self, app: Upstream, match: dict) -> None:
        """Have ``app``'s fake live matcher (``vast matcher attach/start``) report ``match``."""
        with open(os.path.join(self.workdir(app), "vast-live.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(match) + "\n")

    def diagnostics(self) -> str:
        parts = [p.describe() for p in self.processes.values()]
        for app in self.apps:
            if app in (PYVAST_2020, VAST_2022):
                calls = self.vast_calls(app)
                parts.append(f"--- {app.name}'s fake vast, {len(calls)} calls, the last: {calls[-8:]}")
        return "\n".join(parts)

    def assert_running(self) -> None:
        """Every app and the bus still run: none died of what it was sent."""
        ended = [p.name for p in self.processes.values() if p.done]
        if ended:
            raise AssertionError(f"ended early: {ended}\n{self.diagnostics()}")

    async def expect(self, predicate, what: str, timeout: float = DEADLINE):
        """Wait for ``predicate`` to be true; fail with what every process said if it does not come."""
        try:
            return await wait_for(predicate, timeout, what)
        except Timeout as e:
            raise AssertionError(f"{e}\n{self.diagnostics()}") from None

    # -- start and stop

    async def start(self) -> "World":
        paths = await venvs(self.testcase, self.apps)
        await self.start_bus()
        for app in self.apps:
            self.start_app(app, paths[app.name])
        self.old = Peer(2020, self.ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{self.manage_port(2020)}"))
        await self.old.subscribe(self.ctx, "threatbus")
        if any(a.version.startswith("2022") for a in self.apps):
            self.new = Peer(2022, self.ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{self.manage_port(2022)}"))
            await self.new.subscribe(self.ctx, ["stix2/indicator", "stix2/sighting"])
        await self.until_ready()
        return self

    def manage_port(self, generation: int) -> int:
        """The manage port for apps of ``generation``."""
        plugin = "zmq" if self.two_plugins and generation == 2022 else "zmq-app"
        return self.ports[plugin]["manage"]

    async def start_bus(self, attempts: int = 3) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        for attempt in range(attempts):
            plugins = ["zmq-app", "zmq"] if self.two_plugins else ["zmq-app"]
            ports = iter(free_ports(3 * len(plugins)))
            self.ports = {plugin: {e: next(ports) for e in ("manage", "pub", "sub")} for plugin in plugins}
            values = {
                (e if plugin == "zmq-app" else f"{plugin}_{e}"): str(port)
                for plugin, endpoints in self.ports.items()
                for e, port in endpoints.items()
            }
            path = os.path.join(self.dir, "bus.yaml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(template("bus-two-plugins.yaml" if self.two_plugins else "bus.yaml", **values))
            argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", os.path.join(self.dir, "twistd.pid"),
                    "zmq-app", "--config", path]  # fmt: skip
            bus = self.processes["twistd"] = spawn("twistd -n zmq-app", argv, env, self.dir)
            wanted = [
                f"{plugin} {e} endpoint listening on 127.0.0.1:{port}"
                for plugin, endpoints in self.ports.items()
                for e, port in endpoints.items()
            ]
            await wait_for(
                lambda: bus.done or all(w in bus.text() for w in wanted),
                START_DEADLINE,
                "twistd to bind its endpoints",
            )
            if not bus.done:
                return
            if "cannot bind" not in bus.text() or attempt == attempts - 1:
                raise AssertionError(f"twistd -n zmq-app did not start:\n{bus.describe()}")
            # a port was taken between free_ports and the bind: try others

    def start_app(self, app: Upstream, venv: str) -> None:
        workdir = self.workdirs[app.name] = os.path.join(self.dir, app.name)
        os.makedirs(workdir)
        open(os.path.join(workdir, "threatbus.rules"), "w").close()
        config = os.path.join(workdir, "config.yaml")
        with open(config, "w", encoding="utf-8") as f:
            manage = self.manage_port(int(app.version[:4]))
            f.write(template(app.config, manage=str(manage), workdir=workdir))
        env = {
            "PATH": os.pathsep.join([FAKES, os.path.join(venv, "bin"), os.environ.get("PATH", os.defpath)]),
            "HOME": workdir,
            "XDG_CONFIG_HOME": workdir,
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "FAKE_VAST_LOG": os.path.join(workdir, "vast-calls.jsonl"),
            "FAKE_VAST_MATCHES": os.path.join(workdir, "vast-matches.json"),
            "FAKE_VAST_LIVE": os.path.join(workdir, "vast-live.jsonl"),
            "FAKE_SURICATASC_LOG": os.path.join(workdir, "suricatasc-calls.jsonl"),
            "FAKE_VAST_LIFETIME": str(TEST_TIMEOUT),
        }
        argv = [os.path.join(venv, "bin", "python"), "-m", app.module, "--config", config]
        self.processes[app.name] = spawn(f"{app.name} {app.version}", argv, env, workdir)

    async def stop(self) -> None:
        """Stop the apps (all at once), then the bus."""
        apps = [p for name, p in self.processes.items() if name != "twistd"]
        await DeferredList([ensureDeferred(stop(p)) for p in apps], consumeErrors=True)
        if "twistd" in self.processes:
            await stop(self.processes["twistd"])

    async def until_ready(self) -> None:
        """
        Publish probes of both generations until every app and peer has acted
        on one of its own generation: the apps' and peers' sockets are then
        connected (ZeroMQ drops what a PUB sends before that).
        """
        checks = {
            "the test's 2020 app": lambda: self.old.find(
                "intel", lambda b: b["id"].startswith("probe-intel-")
            )
        }
        if self.new:
            checks["the test's 2022 app"] = lambda: self.new.find(
                "indicator", lambda b: "stix-probe-" in b.get("pattern", "")
            )
        if PYVAST_2020 in self.apps:
            checks[PYVAST_2020.name] = lambda: any(
                "intel-probe-" in " ".join(c) for c in self.vast_calls(PYVAST_2020)
            )
        if VAST_2022 in self.apps:
            checks[VAST_2022.name] = lambda: any(
                "stix-probe-" in " ".join(c) for c in self.vast_calls(VAST_2022)
            )
        if SURICATA_2022 in self.apps:
            checks[SURICATA_2022.name] = lambda: "txthreatbus probe" in self.rules()
        pending = set(checks)
        end = time.monotonic() + READY_DEADLINE
        n = 0
        while pending:
            for name, app in self.processes.items():
                if app.done:
                    raise AssertionError(f"{app.name} ended while starting\n{self.diagnostics()}")
            if time.monotonic() > end:
                raise AssertionError(
                    f"after {READY_DEADLINE} s of probes, these never acted on one: {sorted(pending)}"
                    f"\n{self.diagnostics()}"
                )
            n += 1
            self.old.publish("threatbus/intel", intel(f"probe-intel-{n}", DOMAIN, f"intel-probe-{n}.invalid"))
            if self.new:
                self.new.publish("stix2/indicator", domain_indicator(f"stix-probe-{n}.invalid"))
                if SURICATA_2022 in self.apps:
                    rule = suricata_rule(9000001, f"txthreatbus probe {n}", rev=n)
                    self.new.publish("stix2/indicator", indicator(rule, pattern_type="suricata"))
            await settle(0.3)
            pending = {name for name in pending if not checks[name]()}
        log.info("All apps acted on probes after {n} round(s)", n=n)


# --- the tests -------------------------------------------------------------


def vast_2022_query(value: str) -> str:
    """The retro query vast-threatbus 2022.5.16 builds for a domain."""
    return f'"{value}" == net.domain || "{value}" == net.hostname'


def vast_2020_query(value: str) -> str:
    """The retro query pyvast-threatbus 2020.11.26 builds for a domain."""
    return f'"{value}" in net.domain || "{value}" in net.hostname'


def dns_event(value: str, ts: str) -> dict:
    """A VAST result line for a DNS query of ``value``."""
    return {"ts": ts, "event_type": "dns", "dns": {"rrname": value, "rrtype": "A"}}


class PyvastThreatbus2020Tests(TestCase):
    """pyvast-threatbus 2020.11.26 alone on the bus: the 2020 protocol end to end."""

    timeout = TEST_TIMEOUT

    async def test_intel_and_sighting(self):
        """A 2020 Intel makes pyvast-threatbus query VAST; its match comes back as a 2020 Sighting of that Intel."""
        world = await World(self, [PYVAST_2020]).start()
        event = dns_event("seen2020.example.com", "2020-11-26T14:46:52.123456")
        world.set_vast_matches(PYVAST_2020, {"seen2020.example.com": [event]})

        world.old.publish("threatbus/intel", intel("intel-2020-domain", DOMAIN, "seen2020.example.com"))
        world.old.publish("threatbus/intel", intel("intel-2020-ip", IPSRC, "198.51.100.7"))

        query = vast_2020_query("seen2020.example.com")
        await world.expect(
            lambda: ["export", "--max-events=0", "json", query] in world.vast_calls(PYVAST_2020),
            "pyvast-threatbus to export the domain",
        )
        await world.expect(
            lambda: ["export", "--max-events=0", "json", "198.51.100.7"] in world.vast_calls(PYVAST_2020),
            "pyvast-threatbus to export the IP",
        )
        sightings = await world.expect(
            lambda: world.old.find("sighting", lambda s: s["intel"] == "intel-2020-domain"),
            "pyvast-threatbus's sighting",
        )
        self.assertEqual(sightings[0]["context"], {**event, "source": "VAST"})
        self.assertEqual(sightings[0]["ioc"], ["seen2020.example.com"])
        self.assertTrue(sightings[0]["ts"].startswith("2020-11-26 14:46:52"), sightings[0])
        world.assert_running()


class TwoGenerationsTests(TestCase):
    """
    pyvast-threatbus 2020.11.26, vast-threatbus 2022.5.16 and
    suricata-threatbus 2022.5.16 on one bus: what one generation publishes
    reaches the other.
    """

    timeout = TEST_TIMEOUT

    async def world(self) -> World:
        return await World(self, [PYVAST_2020, VAST_2022, SURICATA_2022]).start()

    async def test_2020_intel_reaches_vast_threatbus(self):
        """2020 Intel (DOMAIN, IPSRC, then a REMOVE) becomes vast-threatbus's matcher add/remove and retro queries."""
        world = await self.world()
        world.old.publish("threatbus/intel", intel("intel-evil-domain", DOMAIN, "evil.example.com"))
        world.old.publish("threatbus/intel", intel("intel-evil-ip", IPSRC, "203.0.113.66"))

        def added(value):
            return [c for c in world.vast_calls(VAST_2022) if c[:4] == ["matcher", "add", MATCHER, value]]

        for value, query in (
            ("evil.example.com", vast_2022_query("evil.example.com")),
            ("203.0.113.66", "203.0.113.66"),
        ):
            calls = await world.expect(lambda: added(value), f"vast-threatbus to add {value} to its matcher")
            self.assertEqual(len(calls[0]), 5, calls)
            self.assertRegex(
                calls[0][4],
                r"^threatbus__indicator--[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
            )
            await world.expect(
                lambda: ["export", "--caf.scheduler.max-threads=1", "json", query]
                in world.vast_calls(VAST_2022),
                f"vast-threatbus to retro-query {value}",
            )
        # the same Intel again is the same Indicator
        world.old.publish("threatbus/intel", intel("intel-evil-domain", DOMAIN, "evil.example.com"))
        await world.expect(lambda: len(added("evil.example.com")) == 2, "the second add")
        first, second = added("evil.example.com")
        self.assertEqual(first, second)

        world.old.publish("threatbus/intel", intel("intel-evil-domain", DOMAIN, "evil.example.com", "REMOVE"))
        await world.expect(
            lambda: ["matcher", "remove", MATCHER, "evil.example.com"] in world.vast_calls(VAST_2022),
            "vast-threatbus to remove evil.example.com from its matcher",
        )
        world.assert_running()

    async def test_vast_threatbus_sighting_reaches_2020(self):
        """vast-threatbus's Sighting of an Indicator made from a 2020 Intel reaches 2020 apps as a Sighting of that Intel."""
        world = await self.world()
        event = dns_event("sighted.example.com", "2022-05-16T10:11:12.000000")
        world.set_vast_matches(VAST_2022, {"sighted.example.com": [event]})

        world.old.publish("threatbus/intel", intel("intel-sighted-1", DOMAIN, "sighted.example.com"))

        await world.expect(
            lambda: [
                "export",
                "--caf.scheduler.max-threads=1",
                "json",
                vast_2022_query("sighted.example.com"),
            ]
            in world.vast_calls(VAST_2022),
            "vast-threatbus to retro-query sighted.example.com",
        )
        stix = await world.expect(
            lambda: world.new.find("sighting", lambda s: s.get("x_threatbus_sighting_context") == event),
            "vast-threatbus's STIX Sighting on stix2/sighting",
        )
        self.assertEqual(stix[0]["x_threatbus_match_type"], "RETRO")
        # of the Indicator that vast-threatbus was given (its live matcher gets it too, concurrently)
        reference = "threatbus__" + stix[0]["sighting_of_ref"]
        await world.expect(
            lambda: ["matcher", "add", MATCHER, "sighted.example.com", reference]
            in world.vast_calls(VAST_2022),
            "vast-threatbus to add the same Indicator to its matcher",
        )
        sightings = await world.expect(
            lambda: world.old.find("sighting", lambda s: s.get("context", {}).get("dns") == event["dns"]),
            "the 2020 Sighting",
        )
        self.assertEqual(len(sightings), 1, sightings)
        sighting = sightings[0]
        self.assertEqual(sighting["intel"], "intel-sighted-1")
        self.assertEqual(sighting["ioc"], ["sighted.example.com"])
        self.assertEqual({k: v for k, v in sighting["context"].items() if k != "source"}, event)
        self.assertTrue(re.match(r"2022-05-16[ T]10:11:12", sighting["ts"]), sighting)
        world.assert_running()

    async def test_vast_threatbus_live_sighting_reaches_2020(self):
        """vast-threatbus's live-matcher Sighting of an Indicator made from a 2020 Intel reaches 2020 apps as one of that Intel."""
        world = await self.world()
        world.old.publish("threatbus/intel", intel("intel-live-1", IPSRC, "192.0.2.77"))
        calls = await world.expect(
            lambda: [
                c for c in world.vast_calls(VAST_2022) if c[:4] == ["matcher", "add", MATCHER, "192.0.2.77"]
            ],
            "vast-threatbus to add 192.0.2.77 to its matcher",
        )
        reference = calls[0][4]
        event = {"ts": "2022-05-16T11:22:33.000000", "event_type": "flow", "src_ip": "192.0.2.77"}
        # VAST's matcher reports the reference it was given as a quoted string
        world.vast_live_match(
            VAST_2022,
            {"event": event, "indicator": {"value": "192.0.2.77", "context": json.dumps(reference)}},
        )

        stix = await world.expect(
            lambda: world.new.find("sighting", lambda s: s.get("x_threatbus_sighting_context") == event),
            "vast-threatbus's live STIX Sighting on stix2/sighting",
        )
        self.assertEqual(stix[0]["x_threatbus_match_type"], "LIVE")
        self.assertEqual(stix[0]["x_threatbus_indicator_value"], "192.0.2.77")
        self.assertEqual("threatbus__" + stix[0]["sighting_of_ref"], reference)
        sightings = await world.expect(
            lambda: world.old.find("sighting", lambda s: s.get("context", {}).get("src_ip") == "192.0.2.77"),
            "the 2020 Sighting",
        )
        self.assertEqual(len(sightings), 1, sightings)
        sighting = sightings[0]
        self.assertEqual(sighting["intel"], "intel-live-1")
        self.assertEqual(sighting["ioc"], ["192.0.2.77"])
        self.assertEqual({k: v for k, v in sighting["context"].items() if k != "source"}, event)
        self.assertTrue(re.match(r"2022-05-16[ T]11:22:33", sighting["ts"]), sighting)
        world.assert_running()

    async def test_stix_indicator_reaches_pyvast_threatbus(self):
        """A STIX Indicator reaches pyvast-threatbus 2020 as Intel; its Sighting reaches 2022 apps as one of the Indicator."""
        world = await self.world()
        event = dns_event("stix-evil.example.com", "2022-05-16T12:00:00")
        world.set_vast_matches(PYVAST_2020, {"stix-evil.example.com": [event]})
        body = domain_indicator("stix-evil.example.com")

        world.new.publish("stix2/indicator", body)

        await world.expect(
            lambda: ["export", "--max-events=0", "json", vast_2020_query("stix-evil.example.com")]
            in world.vast_calls(PYVAST_2020),
            "pyvast-threatbus to retro-query stix-evil.example.com",
        )
        # pyvast-threatbus reports a 2020 Sighting of the Intel whose id is the Indicator's
        sightings = await world.expect(
            lambda: world.old.find("sighting", lambda s: s.get("context", {}).get("dns") == event["dns"]),
            "pyvast-threatbus's 2020 Sighting",
        )
        self.assertEqual(sightings[0]["intel"], body["id"])
        stix = await world.expect(
            lambda: world.new.find("sighting", lambda s: s.get("sighting_of_ref") == body["id"]),
            "the STIX Sighting of the Indicator",
        )
        self.assertEqual(stix[0]["type"], "sighting")
        self.assertEqual(stix[0]["x_threatbus_sighting_context"]["dns"], event["dns"])
        world.assert_running()

    async def test_suricata_rules_follow_indicators(self):
        """A Suricata-rule Indicator lands in suricata-threatbus's rules file and Suricata reloads; its REMOVE takes it out."""
        world = await self.world()
        rule = suricata_rule(4711001, "txthreatbus upstream test")
        id = f"indicator--{uuid.uuid4()}"
        # the probes' rule is reloaded, and no reload runs that could miss ours
        await world.expect(world.suricata_reloaded, "suricata-threatbus to reload the probes' rule")
        reloads = len(world.suricatasc_calls())

        world.new.publish("stix2/indicator", indicator(rule, pattern_type="suricata", id=id))

        await world.expect(lambda: rule + "\n" in world.rules(), "the rule in the rules file")
        await world.expect(world.suricata_reloaded, "suricatasc to reload the rules")
        socket = os.path.join(world.workdir(SURICATA_2022), "suricata.socket")
        self.assertEqual(
            [c["argv"] for c in world.suricatasc_calls()[reloads:]],
            [["-c", "ruleset-reload-nonblocking", socket]],
        )

        world.new.publish(
            "stix2/indicator", indicator(rule, pattern_type="suricata", id=id, x_threatbus_update="REMOVE")
        )
        await world.expect(lambda: "sid:4711001" not in world.rules(), "the rule to leave the rules file")
        self.assertIn("txthreatbus probe", world.rules())
        # nothing of a Suricata rule reaches 2020 apps: Intel has no slot for it
        self.assertFalse(any("4711001" in " ".join(c) for c in world.vast_calls(PYVAST_2020)))
        world.assert_running()


class TwoPluginsTests(TestCase):
    """The bus with both app plugins: the 2020 apps on zmq-app, the 2022 apps on zmq, each on its own ports."""

    timeout = TEST_TIMEOUT

    async def test_across_plugins(self):
        """2020 Intel, STIX Indicators and Sightings cross from one plugin's apps to the other's."""
        world = await World(self, [PYVAST_2020, VAST_2022, SURICATA_2022], two_plugins=True).start()
        event = dns_event("across.example.com", "2022-05-16T13:14:15")
        world.set_vast_matches(VAST_2022, {"across.example.com": [event]})
        body = domain_indicator("stix-across.example.com")
        rule = suricata_rule(4711002, "txthreatbus across plugins")

        world.old.publish("threatbus/intel", intel("intel-across-1", DOMAIN, "across.example.com"))
        world.new.publish("stix2/indicator", body)
        world.new.publish("stix2/indicator", indicator(rule, pattern_type="suricata"))

        await world.expect(
            lambda: any(
                c[:4] == ["matcher", "add", MATCHER, "across.example.com"]
                for c in world.vast_calls(VAST_2022)
            ),
            "vast-threatbus (on zmq) to add the 2020 Intel (from zmq-app) to its matcher",
        )
        await world.expect(
            lambda: ["export", "--max-events=0", "json", vast_2020_query("stix-across.example.com")]
            in world.vast_calls(PYVAST_2020),
            "pyvast-threatbus (on zmq-app) to retro-query the STIX Indicator (from zmq)",
        )
        await world.expect(
            lambda: rule + "\n" in world.rules(), "the rule in suricata-threatbus's rules file"
        )
        sightings = await world.expect(
            # (the fake vast also matches stix-across.example.com, the STIX Indicator's value:
            # that Sighting is of the STIX Indicator, and may come first)
            lambda: world.old.find(
                "sighting",
                lambda s: s.get("context", {}).get("dns") == event["dns"] and s.get("ioc") == ["across.example.com"],
            ),
            "vast-threatbus's Sighting as a 2020 Sighting on zmq-app",
        )
        self.assertEqual(sightings[0]["intel"], "intel-across-1")
        world.assert_running()
