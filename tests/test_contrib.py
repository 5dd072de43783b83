"""
contrib/txthreatbus.service, the systemd unit: systemd accepts it, it
restarts the bus whatever ends it, and its ExecStart, as written, runs the
bus and stops cleanly on SIGTERM (what ``systemctl stop`` sends).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

import zmq

from tests.support import Context, free_ports, request, wait_for
from tests.test_tap import PROCESS_DEADLINE, ProcessOutput, terminated_cleanly, write_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(REPO_ROOT, "contrib", "txthreatbus.service")
#: Where the unit expects the package's venv.
INSTALLED = "/opt/txthreatbus/bin/"


def unit() -> dict:
    """The unit's sections: {section: {key: [values]}} (systemd keys may repeat)."""
    sections, current = {}, None
    with open(UNIT, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
                continue
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def this_twistd() -> str:
    """The twistd of the Python running the tests (the venv the README installs into)."""
    path = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.access(path, os.X_OK):
        raise SkipTest(f"no twistd beside {sys.executable}")
    return path


class UnitTests(SynchronousTestCase):
    def test_restarts_always(self):
        """Restart=always: systemd starts the bus again however it ended (exit 1 included)."""
        service = unit()["Service"]
        self.assertEqual(service["Restart"], ["always"])
        self.assertEqual(service["Type"], ["simple"])

    def test_runs_in_the_foreground(self):
        """ExecStart runs twistd in the foreground without a pid file, with the config of /etc."""
        argv = shlex.split(unit()["Service"]["ExecStart"][0])
        self.assertEqual(argv[0], INSTALLED + "twistd")
        self.assertEqual(
            argv[1:], ["--nodaemon", "--pidfile=", "zmq-app", "--config", "/etc/txthreatbus/config.yaml"]
        )


class SystemdTests(TestCase):
    async def test_systemd_accepts_it(self):
        """systemd-analyze verify finds nothing wrong (with twistd where the unit says)."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "txthreatbus.service")
        with open(UNIT, encoding="utf-8") as f:
            text = f.read().replace(INSTALLED + "twistd", this_twistd())
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        out, err, code = await getProcessOutputAndValue(analyze, ["verify", path], env=os.environ)
        self.assertEqual(code, 0, (out + err).decode("utf-8", "replace"))


class ExecStartTests(TestCase):
    async def test_runs_and_stops(self):
        """The unit's ExecStart (twistd from the venv, a config of ours) serves, and SIGTERM stops it cleanly."""
        manage, pub, sub = free_ports(3)
        config = write_config(
            self,
            f"""\
logging: {{console: true, console_verbosity: INFO}}
store: false
plugins:
  backbones:
    inmem: {{}}
  apps:
    zmq-app: {{host: 127.0.0.1, manage: {manage}, pub: {pub}, sub: {sub}}}
""",
        )
        argv = shlex.split(unit()["Service"]["ExecStart"][0])
        argv[0] = this_twistd()
        argv[argv.index("/etc/txthreatbus/config.yaml")] = config
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        process = ProcessOutput()
        reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ), path=workdir)
        self.addCleanup(process.kill)
        await wait_for(
            lambda: f"manage endpoint listening on 127.0.0.1:{manage}" in process.text() or process.done,
            PROCESS_DEADLINE,
            "the bus to bind its manage port",
        )
        self.assertFalse(process.done, process.text())
        # served: the reactor runs (and with it twistd's SIGTERM handler)
        req = Context(self).socket(zmq.REQ, f"tcp://127.0.0.1:{manage}")
        reply = await request(req, {"action": "subscribe", "topic": "threatbus", "snapshot": 0})
        self.assertEqual(reply["status"], "success")
        self.assertEqual(os.listdir(workdir), [], "no pid file, nothing left in the working directory")
        await terminated_cleanly(self, process)
