"""
TLS to the broker, with real processes: a RabbitMQ node of the test's own
(tests/rabbitmq_node.py) with an amqps listener whose certificate (for
``localhost`` and 127.0.0.1) a throwaway CA signed, and ``twistd zmq-app``
instances whose backbone has ``ssl: {ca_file, cert_file, key_file}``.

Without RabbitMQ or the openssl command these tests are skipped, except in
CI (CI=true), where they fail.
"""

from __future__ import annotations

import os

from twisted.internet.error import ProcessTerminated
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests import faults
from tests.rabbitmq_node import node_for

N = 500
RATE = 250.0


class TlsTests(TestCase):
    timeout = 120

    async def node(self, **options):
        node = node_for(self, tls=True, **options)
        await deferToThread(node.start)
        return node

    def workdir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    async def carried(self, node, host: str, ssl: dict) -> dict:
        """Two instances on ``node``'s amqps port: 500 intel published at A, counted at A and B."""
        rig = faults.Rig(node, self.workdir(), N, backbone={"ssl": ssl}, port=node.amqps_port, host=host)
        try:
            await rig.up()  # the probes went through the broker: both are connected
            await rig.send(RATE)
            counts = await rig.collect(idle=10, deadline=60, settle=1.0)
        finally:
            await rig.down()
        return {name: (c.received, c.missing, c.duplicated) for name, c in counts.items()}

    async def start_failure(self, node, host: str, ssl: dict) -> str:
        """One instance on ``node``'s amqps port that must not start: its output (it exited non-zero)."""
        instance = faults.Instance(
            "A", node, "t", self.workdir(), backbone={"ssl": ssl}, port=node.amqps_port, host=host
        )
        self.addCleanup(instance.kill)
        process = instance.spawn(grace=0)
        reason = await process.finished()
        output = process.text()
        self.assertIsInstance(reason, ProcessTerminated, output)
        self.assertIsNone(reason.signal, output)
        self.assertNotEqual(reason.exitCode, 0, output)
        self.assertNotIn("Traceback", output)
        return output

    def critical(self, output: str) -> list:
        return [line for line in output.splitlines() if "#critical]" in line]

    async def test_intel_crosses_over_tls(self):
        """(i) Two instances with ssl: {ca_file} carry intel to each other over amqps, exactly once."""
        node = await self.node()
        got = await self.carried(node, "localhost", {"ca_file": node.ca_file})
        self.assertEqual(got, {"A": (N, 0, 0), "B": (N, 0, 0)})

    async def test_ip_address_host(self):
        """host: 127.0.0.1 is verified against the certificate's IP address."""
        node = await self.node()
        got = await self.carried(node, "127.0.0.1", {"ca_file": node.ca_file})
        self.assertEqual(got, {"A": (N, 0, 0), "B": (N, 0, 0)})

    async def test_wrong_ca(self):
        """(ii) A CA that did not sign the broker's certificate: one critical line naming it, exit non-zero."""
        node = await self.node()
        output = await self.start_failure(node, "localhost", {"ca_file": node.wrong_ca_file})
        critical = self.critical(output)
        self.assertEqual(len(critical), 1, output)
        self.assertIn("TLS", critical[0])
        self.assertIn("certificate verify failed", critical[0])
        self.assertIn(f"localhost:{node.amqps_port}", critical[0])

    async def test_wrong_host_name(self):
        """A host the certificate is not for (an alias of the broker): a start-up error naming the mismatch."""
        node = await self.node()
        # the broker's certificate is for localhost and 127.0.0.1, not 127.0.0.2
        output = await self.start_failure(node, "127.0.0.2", {"ca_file": node.ca_file})
        critical = self.critical(output)
        self.assertEqual(len(critical), 1, output)
        self.assertTrue(
            "TLS" in critical[0] or "certificate" in critical[0].lower(),
            f"the critical line names neither TLS nor the certificate: {critical[0]}",
        )
        self.assertIn("127.0.0.2", critical[0])

    async def test_client_certificate(self):
        """A broker that requires client certificates: cert_file and key_file get in, none is a start-up error."""
        node = await self.node(require_client_certificate=True)
        ssl = {"ca_file": node.ca_file, "cert_file": node.client_cert_file, "key_file": node.client_key_file}
        got = await self.carried(node, "localhost", ssl)
        self.assertEqual(got, {"A": (N, 0, 0), "B": (N, 0, 0)})
        output = await self.start_failure(node, "localhost", {"ca_file": node.ca_file})
        critical = self.critical(output)
        self.assertEqual(len(critical), 1, output)
        self.assertIn("certificate required", critical[0])
