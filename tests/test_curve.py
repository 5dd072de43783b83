"""
CurveZMQ end to end: the README's key commands as written, a bus with CURVE
on, and our client library, command line and check-config against it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import start_bus, zmq_app_of
from tests.test_cli import run
from tests.test_client import INTEL
from txthreatbus.client import Client, CurveKeyError, CurveKeys
from txthreatbus.config import CurveConfig

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_key_commands() -> list:
    """The shell lines of the README's CurveZMQ key block."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("### CurveZMQ") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def make_keys(testcase) -> str:
    """A folder where the README's key commands were run, as written; its path."""
    folder = os.path.abspath(testcase.mktemp())
    os.makedirs(folder)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for line in readme_key_commands():
        line = line.replace("python -c", f"{sys.executable} -c")
        done = subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True, text=True)
        testcase.assertEqual(done.returncode, 0, f"{line}\n{done.stderr}")
    return folder


class KeyCommandTests(SynchronousTestCase):
    """The README's key commands work as written, in an empty folder."""

    def test_commands(self):
        """They make the server's pair, an app's pair, and the folder of admitted public keys."""
        folder = make_keys(self)
        for path in (
            "server-keys/server.key",
            "server-keys/server.key_secret",
            "app-keys/misp-app.key",
            "app-keys/misp-app.key_secret",
            "clients/misp-app.key",
        ):
            self.assertTrue(os.path.isfile(os.path.join(folder, path)), path)
        self.assertEqual(os.listdir(os.path.join(folder, "clients")), ["misp-app.key"])

    def test_client_keys(self):
        """CurveKeys.from_files reads them, and says which file is wrong, and why."""
        folder = make_keys(self)
        keys = CurveKeys.from_files(
            os.path.join(folder, "server-keys/server.key"), os.path.join(folder, "app-keys/misp-app.key_secret")
        )
        self.assertEqual(len(keys.server_public), 40)
        error = self.assertRaises(
            CurveKeyError,
            CurveKeys.from_files,
            os.path.join(folder, "server-keys/server.key"),
            os.path.join(folder, "app-keys/misp-app.key"),  # the public file, not the secret one
        )
        self.assertIn("holds no secret key", str(error))
        error = self.assertRaises(CurveKeyError, CurveKeys.from_files, "/nonexistent.key", "x")
        self.assertIn("/nonexistent.key (the bus's public key)", str(error))


class CurveBusTests(TestCase):
    """Our client library and commands against a bus with CURVE on."""

    def setUp(self):
        self.keys = make_keys(self)
        curve = CurveConfig(
            server_secret_key_file=os.path.join(self.keys, "server-keys/server.key_secret"),
            authorized_clients_dir=os.path.join(self.keys, "clients"),
        )
        self.top = start_bus(self, curve=curve)
        self.endpoint = f"127.0.0.1:{zmq_app_of(self.top).ports['manage']}"
        self.options = [
            "--curve-server-key",
            os.path.join(self.keys, "server-keys/server.key"),
            "--curve-secret-key",
            os.path.join(self.keys, "app-keys/misp-app.key_secret"),
        ]

    async def test_client(self):
        """Client(curve=...) subscribes, publishes and receives, encrypted."""
        keys = CurveKeys.from_files(self.options[1], self.options[3])
        client = Client(self.endpoint, curve=keys, linger=0.5)
        client.startService()
        self.addCleanup(client.stopService)
        got = Deferred()
        sub = await client.subscribe("threatbus/intel", callback=lambda m: got.called or got.callback(m))
        await sub.connected("threatbus/intel")
        sub.publish_intel(INTEL)
        self.assertEqual(await got, INTEL)

    async def test_commands(self):
        """ping with the key options is answered; without them it is not, and says so."""
        code, out, err = await run(self, "ping", "--endpoint", self.endpoint, *self.options)
        self.assertEqual(code, 0, err)
        code, out, err = await run(self, "ping", "--endpoint", self.endpoint, "--timeout", "0.5")
        self.assertEqual(code, 1, err)

    async def test_bad_options(self):
        """One key option without the other is a usage error; a missing key file ends with its name."""
        code, _, err = await run(self, "ping", "--endpoint", self.endpoint, *self.options[:2])
        self.assertEqual(code, 2, err)
        self.assertIn("--curve-server-key and --curve-secret-key go together", err)
        code, _, err = await run(
            self, "ping", "--endpoint", self.endpoint, "--curve-server-key", "/nonexistent.key",
            "--curve-secret-key", self.options[3],
        )
        self.assertEqual(code, 1, err)
        self.assertIn("txthreatbus ping: cannot use a CurveZMQ key: /nonexistent.key", err)

    async def test_check_config(self):
        """check-config loads the key files: a missing one is an error naming it."""
        good = os.path.join(self.keys, "good.yaml")
        bad = os.path.join(self.keys, "bad.yaml")
        for path, secret in ((good, "server-keys/server.key_secret"), (bad, "server-keys/missing.key_secret")):
            with open(path, "w") as f:
                f.write(
                    "plugins: {apps: {zmq-app: {curve: {server_secret_key_file: %s, authorized_clients_dir: %s}}}}\n"
                    % (os.path.join(self.keys, secret), os.path.join(self.keys, "clients"))
                )
        code, out, err = await run(self, "check-config", good)
        self.assertEqual(code, 0, err)
        code, out, err = await run(self, "check-config", bad)
        self.assertEqual(code, 1, out)
        self.assertIn("missing.key_secret", err)
