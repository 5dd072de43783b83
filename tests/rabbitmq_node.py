"""
A RabbitMQ node of a test's own: started, killed, paused and restarted at
will, never touching the shared broker (``rabbit@localhost`` on
127.0.0.1:5672).

Each ``RabbitMQNode`` has its own node name (``txtb-<random>@localhost``),
its own free ports (AMQP, Erlang distribution, and with ``tls=True`` AMQPS),
and its own files in a temporary directory: ``rabbitmq.conf``, an empty
``enabled_plugins``, an empty ``rabbitmq-env.conf`` (so that
/etc/rabbitmq/rabbitmq-env.conf, which names the shared node, is not read),
the data (``mnesia/``), the logs (``log/``) and ``HOME`` with the Erlang
cookie that both the node and ``rabbitmqctl -n NODE`` read. The scripts run
from /usr/lib/rabbitmq/bin when it exists (Debian's /usr/sbin wrappers
would switch to the rabbitmq user), as the current user.

    node = RabbitMQNode(tls=True)
    try:
        node.start()            # blocks until AMQP accepts and await_startup succeeds
        ... node.amqp_port, node.amqps_port, node.ca_file ...
        node.kill()             # SIGKILL the whole process group (beam included)
        node.start()            # again: same name, ports and data (durable queues survive)
        node.stop_app(); node.start_app()   # the broker stopped, the Erlang node up
        node.pause(); node.resume()         # SIGSTOP / SIGCONT the beam: a hung broker
    finally:
        node.cleanup()          # kills the node, removes the directory

Every wait has a deadline. The calls block: from a running reactor, call
them in a thread (``deferToThread``). In tests, ``node_for(testcase)``
makes a started node that the test's cleanup removes, and
``rabbitmq_missing()`` says why no node can be started here (the tests skip
then, or fail with ``CI=true``).

Measured here (RabbitMQ 3.10.8, Erlang 25.2, 2 CPUs): a start, first or
after SIGKILL, takes 3.8 to 5.1 s (typically 4.4 s; ``start_seconds``), of
which about 1 s is ``rabbitmqctl await_startup`` (each rabbitmqctl call
costs about 1 s); ``kill`` 0.02 s; ``stop_app`` 0.3 s; ``start_app`` with
its await_startup 1.0 to 1.8 s.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import List, Optional

from tests.support import free_ports

#: Where Debian (and RabbitMQ's generic packages) keep the real scripts.
SCRIPT_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/lib/rabbitmq/sbin")

#: Seconds a node may take to start (boot, listeners, await_startup).
START_DEADLINE = 90.0
#: Seconds one rabbitmqctl call may take.
CTL_DEADLINE = 60.0
#: Seconds a killed node's processes may take to be gone.
KILL_DEADLINE = 10.0


def script(name: str) -> Optional[str]:
    """The path of RabbitMQ script ``name`` (rabbitmq-server, rabbitmqctl), or None."""
    for directory in SCRIPT_DIRS:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def rabbitmq_missing(tls: bool = False) -> Optional[str]:
    """Why no RabbitMQ node of our own can be started here, or None if one can."""
    for name in ("rabbitmq-server", "rabbitmqctl"):
        if script(name) is None:
            return f"{name} is not installed (the RabbitMQ server package)"
    if shutil.which("erl") is None:
        return "erl is not installed (Erlang, which RabbitMQ runs on)"
    if tls and shutil.which("openssl") is None:
        return "the openssl command is not installed (it makes the test certificates)"
    return None


def require_rabbitmq(testcase, tls: bool = False) -> None:
    """Skip ``testcase`` if no node can be started here; with ``CI=true``, fail instead."""
    from twisted.trial.unittest import SkipTest

    reason = rabbitmq_missing(tls)
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        testcase.fail(reason + ", and CI=true: CI must run these tests")
    raise SkipTest(reason)


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), 0.5).close()
        return True
    except OSError:
        return False


class NodeError(RuntimeError):
    """The node did not do what it was asked in time; the text says why (with its log)."""


def _openssl(directory: str, *args: str) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=60
    )
    if result.returncode:
        raise NodeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def make_ca(directory: str, name: str) -> tuple:
    """A throwaway CA in ``directory``: the paths of its certificate and key."""
    cert, key = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    _openssl(
        directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=txthreatbus test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    return cert, key


def make_certificate(directory: str, name: str, ca: tuple, server: bool) -> tuple:
    """
    A certificate signed by ``ca`` (cert, key paths): for a server, for
    ``localhost`` and 127.0.0.1; else a client's. Its certificate and key paths.
    """
    cert, key = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    csr, ext = os.path.join(directory, f"{name}.csr"), os.path.join(directory, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints = CA:FALSE\n")
        f.write("keyUsage = critical, digitalSignature, keyEncipherment\n")
        if server:
            f.write("extendedKeyUsage = serverAuth\n")
            f.write("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
        else:
            f.write("extendedKeyUsage = clientAuth\n")
    _openssl(
        directory, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost" if server else f"/CN={name}",
    )
    _openssl(
        directory, "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
    )
    return cert, key


class RabbitMQNode:
    """
    One RabbitMQ node of our own (see the module's text).

    @ivar name: the node name, ``txtb-<random>@localhost``.
    @ivar amqp_port: its AMQP port on 127.0.0.1.
    @ivar amqps_port: its AMQPS port on 127.0.0.1 (``tls=True``), else None;
        also on 127.0.0.2, which the broker's certificate does not name.
    @ivar dist_port: its Erlang distribution port.
    @ivar directory: the temporary directory with all its files.
    @ivar ca_file: the CA that signed the broker's certificate (``tls=True``).
    @ivar wrong_ca_file: a CA that has nothing to do with it (``tls=True``).
    @ivar client_cert_file, client_key_file: a client certificate of ``ca_file``
        (the node asks for one and, with ``require_client_certificate``,
        refuses TLS clients without).
    @ivar start_seconds: how long each start took.
    """

    host = "127.0.0.1"
    username = "guest"
    password = "guest"
    vhost = "/"

    def __init__(self, tls: bool = False, require_client_certificate: bool = False, prefix: str = "txtb"):
        self.name = f"{prefix}-{secrets.token_hex(4)}@localhost"
        self.tls = tls
        self.require_client_certificate = require_client_certificate
        ports = free_ports(3 if tls else 2)
        self.amqp_port, self.dist_port = ports[0], ports[1]
        self.amqps_port = ports[2] if tls else None
        self.directory = tempfile.mkdtemp(prefix="txtb-rabbitmq-")
        self.home = os.path.join(self.directory, "home")
        self.log_dir = os.path.join(self.directory, "log")
        self.mnesia_dir = os.path.join(self.directory, "mnesia")
        self.pid_file = os.path.join(self.directory, "node.pid")
        self.console_log = os.path.join(self.log_dir, "console.log")
        for d in (self.home, self.log_dir, self.mnesia_dir):
            os.makedirs(d)
        self.process: Optional[subprocess.Popen] = None
        self.start_seconds: List[float] = []
        self.paused = False
        self.ca_file = self.wrong_ca_file = self.client_cert_file = self.client_key_file = None
        try:
            self._write_files()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    # --- files

    def _write_files(self) -> None:
        cookie = os.path.join(self.home, ".erlang.cookie")
        with open(cookie, "w") as f:
            f.write(secrets.token_hex(16).upper())
        os.chmod(cookie, 0o400)
        with open(os.path.join(self.directory, "rabbitmq-env.conf"), "w"):
            pass
        with open(os.path.join(self.directory, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}",
            "log.console = false",
            "log.file.level = info",
            "disk_free_limit.absolute = 50MB",
        ]
        if self.tls:
            tls_dir = os.path.join(self.directory, "tls")
            os.makedirs(tls_dir)
            ca = make_ca(tls_dir, "ca")
            server = make_certificate(tls_dir, "server", ca, server=True)
            client = make_certificate(tls_dir, "client", ca, server=False)
            wrong = make_ca(tls_dir, "wrong-ca")
            self.ca_file = ca[0]
            self.server_cert_file, self.server_key_file = server
            self.client_cert_file, self.client_key_file = client
            self.wrong_ca_file = wrong[0]
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.amqps_port}",
                # a loopback address that the certificate does not name, for
                # host-name verification tests
                f"listeners.ssl.2 = 127.0.0.2:{self.amqps_port}",
                f"ssl_options.cacertfile = {self.ca_file}",
                f"ssl_options.certfile = {self.server_cert_file}",
                f"ssl_options.keyfile = {self.server_key_file}",
                "ssl_options.verify = verify_peer",
                f"ssl_options.fail_if_no_peer_cert = {str(self.require_client_certificate).lower()}",
            ]
        with open(os.path.join(self.directory, "rabbitmq.conf"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def environment(self) -> dict:
        """The environment of the node and of rabbitmqctl: ours, whatever /etc or the caller set."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not (k.startswith("RABBITMQ_") or k.startswith("ERL_") or k in ("NODENAME", "CONFIG_FILE"))
        }
        env.update(
            HOME=self.home,
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=os.path.join(self.directory, "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=os.path.join(self.directory, "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(self.directory, "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.directory, "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=self.mnesia_dir,
            RABBITMQ_LOG_BASE=self.log_dir,
            RABBITMQ_PID_FILE=self.pid_file,
            # distribution on the loopback only, as the shared broker's
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
            LC_ALL="C.UTF-8",
        )
        return env

    # --- the process

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def beam_pid(self) -> int:
        """The pid of the node's Erlang VM (the script's child), from its pid file."""
        deadline = time.monotonic() + 10
        while True:
            try:
                with open(self.pid_file) as f:
                    pid = int(f.read().strip())
                os.kill(pid, 0)
                return pid
            except (OSError, ValueError):
                if time.monotonic() > deadline or not self.running:
                    raise NodeError(f"no pid of {self.name} in {self.pid_file}{self._log_tail()}")
                time.sleep(0.05)

    def start(self, timeout: float = START_DEADLINE) -> float:
        """
        Start the node (again: the same name, ports and data) and wait until
        its AMQP port(s) accept and ``rabbitmqctl await_startup`` succeeds.
        Returns the seconds it took; raises NodeError (the node killed) after
        ``timeout``.
        """
        if self.running:
            raise NodeError(f"{self.name} is running already")
        t0 = time.monotonic()
        deadline = t0 + timeout
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        with open(self.console_log, "ab") as log:
            self.process = subprocess.Popen(
                [script("rabbitmq-server")],
                env=self.environment(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.paused = False
        try:
            ports = [p for p in (self.amqp_port, self.amqps_port) if p]
            while True:
                if not self.running:
                    raise NodeError(
                        f"{self.name} exited with {self.process.returncode} while starting{self._log_tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeError(
                        f"{self.name} did not start within {timeout:g} s (ports {ports}){self._log_tail()}"
                    )
                if all(accepts(p) for p in ports):
                    # await_startup fails at once while the node is not
                    # registered with epmd yet: ask again until the deadline
                    try:
                        self.ctl("await_startup", "--timeout", str(max(1, int(left))), timeout=left + 10)
                        break
                    except NodeError:
                        if time.monotonic() > deadline:
                            raise
                time.sleep(0.2)
        except BaseException:
            self.kill()
            raise
        took = time.monotonic() - t0
        self.start_seconds.append(took)
        return took

    def kill(self) -> None:
        """SIGKILL the node's process group (the script, the beam and its helpers); wait until it is gone."""
        process = self.process
        if process is None:
            return
        pids = [process.pid]
        try:
            with open(self.pid_file) as f:
                pids.append(int(f.read().strip()))
        except (OSError, ValueError):
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids[1:]:  # the beam, should it have left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            process.wait(KILL_DEADLINE)
        except subprocess.TimeoutExpired:
            raise NodeError(f"{self.name} (pid {process.pid}) still runs {KILL_DEADLINE:g} s after SIGKILL")
        # A killed beam's threads take a while to end, and its sockets are
        # open until the last one has: a port that still accepts is not free
        # for the next start (nor a sign that it is up).
        deadline = time.monotonic() + KILL_DEADLINE
        ports = [p for p in (self.amqp_port, self.amqps_port, self.dist_port) if p]
        while any(_alive(pid) for pid in pids[1:]) or any(accepts(p) for p in ports):
            if time.monotonic() > deadline:
                raise NodeError(f"{self.name}'s processes or ports {ports} still there {KILL_DEADLINE:g} s after SIGKILL")
            time.sleep(0.02)
        self.paused = False

    def restart(self, timeout: float = START_DEADLINE) -> float:
        """SIGKILL and start again; the seconds the start took."""
        self.kill()
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP the node's Erlang VM: a hung broker (connections stay open, nothing answers)."""
        os.kill(self.beam_pid(), signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT the node's Erlang VM."""
        os.kill(self.beam_pid(), signal.SIGCONT)
        self.paused = False

    def stop_app(self) -> None:
        """Stop RabbitMQ in the node (its connections closed, its port shut); the Erlang node stays."""
        self.ctl("stop_app")

    def start_app(self, timeout: float = START_DEADLINE) -> float:
        """Start RabbitMQ in the node again and wait for it; the seconds it took."""
        t0 = time.monotonic()
        self.ctl("start_app", timeout=timeout)
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)
        deadline = time.monotonic() + timeout
        while not all(accepts(p) for p in (self.amqp_port, self.amqps_port) if p):
            if time.monotonic() > deadline:
                raise NodeError(f"{self.name} did not open its ports after start_app{self._log_tail()}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def ctl(self, *args: str, timeout: float = CTL_DEADLINE) -> str:
        """Run ``rabbitmqctl -n NODE ARGS``; its output, or NodeError."""
        if self.paused:
            raise NodeError(f"{self.name} is paused: rabbitmqctl would hang")
        try:
            result = subprocess.run(
                [script("rabbitmqctl"), "-n", self.name, *args],
                env=self.environment(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise NodeError(f"rabbitmqctl {' '.join(args)} on {self.name} took over {timeout:g} s") from None
        if result.returncode:
            raise NodeError(
                f"rabbitmqctl {' '.join(args)} on {self.name} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}{self._log_tail()}"
            )
        return result.stdout

    def cleanup(self) -> None:
        """Kill the node (paused or not) and remove its directory. Safe to call twice."""
        try:
            self.kill()
        finally:
            self.process = None
            shutil.rmtree(self.directory, ignore_errors=True)

    # --- for people

    def _log_tail(self, n: int = 3000) -> str:
        texts = []
        for path in (self.console_log, os.path.join(self.log_dir, self.name + ".log")):
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - n))
                    texts.append(f"\n--- {path}:\n" + f.read().decode("utf-8", "replace"))
            except OSError:
                pass
        return "".join(texts)

    def __repr__(self):
        ports = f"amqp {self.amqp_port}" + (f", amqps {self.amqps_port}" if self.amqps_port else "")
        return f"<RabbitMQNode {self.name} ({ports}) in {self.directory}>"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie whose threads have all ended is gone for our purposes (where
    # pid 1 does not reap orphans, it stays a zombie)
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] not in ("Z", "X"):
                    return True
        return False
    except OSError:
        return os.path.exists(f"/proc/{pid}")


def node_for(testcase, tls: bool = False, **options) -> "RabbitMQNode":
    """
    A node of ``testcase``'s own, not started yet (start it in a thread),
    killed and removed at the end of the test; or SkipTest (fail in CI)
    when RabbitMQ is not installed.
    """
    require_rabbitmq(testcase, tls)
    node = RabbitMQNode(tls=tls, **options)
    testcase.addCleanup(node.cleanup)
    return node
