"""
The small parts of the RabbitMQ backbone: its topology (names, arguments,
declarations), batches (several bus messages in one AMQP message), the
diagnosis of a failed connection, the TLS options, and its config section.
"""

from __future__ import annotations

import os
import socket

from OpenSSL import crypto
from hypothesis import given
from hypothesis import strategies as st
from pika import exceptions as amqp
from pika.exchange_type import ExchangeType
from twisted.internet import defer, error, ssl
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.rabbitmq_fakes import FakeChannel, FakeConnection
from txthreatbus.backbones.rabbitmq import batches
from txthreatbus.backbones.rabbitmq.connection import CONNECT_TIMEOUT, TlsError, tls_options
from txthreatbus.backbones.rabbitmq.diagnosis import address, describe, diagnose
from txthreatbus.backbones.rabbitmq.topology import TOPICS, TYPES, Topology, exchange_name, queue_arguments, queue_name
from txthreatbus.config import ConfigError, QueueConfig, RabbitMQConfig, TlsConfig, parse
from txthreatbus.model import CLASSES

KINDS = tuple(TYPES.values())


class TopologyTests(SynchronousTestCase):
    """Exchange and queue names and arguments, as Threat Bus 2020.11.26 makes them."""

    def test_a_type_name_for_every_message_class(self):
        """Every message class has its type name, and each type name its bus topic."""
        self.assertEqual(set(TYPES), set(CLASSES))
        self.assertEqual(len(set(KINDS)), len(KINDS))
        self.assertEqual(TOPICS["intel"], "threatbus/intel")
        self.assertEqual(TOPICS["snapshotenvelope"], "threatbus/snapshotenvelope")

    def test_threat_bus_names(self):
        """One fanout exchange per type, one queue per instance and type, as in Threat Bus."""
        topology = Topology.of(RabbitMQConfig(queue=QueueConfig(name_suffix="box1")))
        self.assertEqual(topology.exchanges, {k: f"threatbus.{k}" for k in KINDS})
        self.assertEqual(topology.queues, {k: f"threatbus.{k}.box1" for k in KINDS})
        self.assertEqual(topology.queues["intel"], "threatbus.intel.box1")
        self.assertEqual(topology.queues["snapshotenvelope"], "threatbus.snapshotenvelope.box1")

    def test_hostname_suffix_and_join_pattern(self):
        """Without name_suffix the queues end in the hostname; naming_join_pattern joins."""
        topology = Topology.of(RabbitMQConfig(naming_join_pattern="-"))
        self.assertEqual(topology.exchanges["sighting"], "threatbus-sighting")
        self.assertEqual(topology.queues["sighting"], "threatbus-sighting-" + socket.gethostname())
        self.assertEqual(exchange_name("/", "intel"), "threatbus/intel")
        self.assertEqual(queue_name("/", "intel", "a"), "threatbus/intel/a")

    def test_queue_arguments(self):
        """lazy gives x-queue-mode lazy (else default); max_items > 0 gives x-max-length."""
        self.assertEqual(queue_arguments(QueueConfig()), {"x-queue-mode": "lazy"})
        self.assertEqual(
            queue_arguments(QueueConfig(lazy=False, max_items=7)),
            {"x-queue-mode": "default", "x-max-length": 7},
        )

    def test_declare(self):
        """Each type: a durable fanout exchange, its queue with the configured options, bound to it."""
        self.declared(durable_exchanges=True)

    def test_declare_transient_exchanges(self):
        """durable_exchanges: false declares them as Threat Bus does."""
        self.declared(durable_exchanges=False)

    def declared(self, durable_exchanges: bool):
        queue = QueueConfig(name_suffix="box1", durable=False, auto_delete=True, exclusive=True, max_items=9)
        topology = Topology.of(RabbitMQConfig(queue=queue, durable_exchanges=durable_exchanges))
        channel = FakeChannel(FakeConnection(), 1)
        self.successResultOf(defer.ensureDeferred(topology.declare(channel)))
        calls = channel.calls
        self.assertEqual(len(calls), 3 * len(KINDS))
        for i, kind in enumerate(KINDS):
            exchange, declared, bound = calls[3 * i : 3 * i + 3]
            self.assertEqual(
                exchange,
                ("exchange_declare", dict(exchange=f"threatbus.{kind}", exchange_type=ExchangeType.fanout,
                                          durable=durable_exchanges)),
            )
            self.assertEqual(
                declared,
                ("queue_declare", dict(queue=f"threatbus.{kind}.box1", durable=False, exclusive=True,
                                       auto_delete=True,
                                       arguments={"x-queue-mode": "lazy", "x-max-length": 9})),
            )
            self.assertEqual(
                bound, ("queue_bind", dict(queue=f"threatbus.{kind}.box1", exchange=f"threatbus.{kind}"))
            )

    def test_declare_refused(self):
        """A declaration the broker refuses fails the whole declaring with the broker's reason."""
        topology = Topology.of(RabbitMQConfig(queue=QueueConfig(name_suffix="box1")))
        channel = FakeChannel(FakeConnection(), 1)
        channel.refuse["queue_declare"] = amqp.ChannelClosedByBroker(406, "PRECONDITION_FAILED")
        failure = self.failureResultOf(defer.ensureDeferred(topology.declare(channel)))
        self.assertEqual(failure.value.reply_code, 406)


class BatchTests(SynchronousTestCase):
    """Several bus messages in one AMQP message."""

    @given(st.lists(st.binary(max_size=300), min_size=1, max_size=20))
    def test_round_trip(self, bodies):
        """Any bodies (empty ones, ones with newlines or length-like bytes) come back as they went."""
        content_type, body = batches.pack(bodies)
        self.assertEqual(batches.unpack(content_type, body), bodies)

    @given(st.lists(st.sampled_from([b"", b"\n", b"{}\n{}", b"\x00\x00\x00\x05", b"\r\n\r\n"]), min_size=2))
    def test_round_trip_awkward(self, bodies):
        """Newlines, empty bodies and bytes that look like lengths: several are a batch, each kept."""
        content_type, body = batches.pack(bodies)
        self.assertEqual(content_type, batches.BATCH)
        self.assertEqual(batches.unpack(content_type, body), bodies)

    def test_single_is_plain_json(self):
        """One message travels as Threat Bus sends it: application/json, the JSON itself."""
        self.assertEqual(batches.pack([b'{"a": 1}']), (batches.JSON, b'{"a": 1}'))
        self.assertEqual(batches.JSON, "application/json")

    def test_layout(self):
        """A batch is each body behind its 4-byte big-endian length."""
        self.assertEqual(
            batches.pack([b"ab", b"", b"c"]),
            (batches.BATCH, b"\x00\x00\x00\x02ab\x00\x00\x00\x00\x00\x00\x00\x01c"),
        )

    def test_other_content_types_are_one_message(self):
        """What is not a batch (JSON, none, another type) is one message, whatever its bytes."""
        body = b"\x00\x00\x00\x01x"
        for content_type in (batches.JSON, None, "text/plain"):
            self.assertEqual(batches.unpack(content_type, body), [body])

    def test_empty_batch(self):
        """A batch with no bytes holds no messages."""
        self.assertEqual(batches.unpack(batches.BATCH, b""), [])

    def test_truncated_length(self):
        """A batch that ends inside a length is a BatchError."""
        _, body = batches.pack([b"ab", b"cd"])
        for cut in (1, 2, 3):
            with self.assertRaises(batches.BatchError) as caught:
                batches.unpack(batches.BATCH, body[: 6 + cut])
            self.assertIn("ends inside a length", str(caught.exception))

    def test_overlong_length(self):
        """A length past the end of the batch is a BatchError; a body cut short is one too."""
        with self.assertRaises(batches.BatchError) as caught:
            batches.unpack(batches.BATCH, b"\x00\x00\x00\x09abc")
        self.assertIn("says 9 bytes at byte 4, where 3 remain", str(caught.exception))
        _, body = batches.pack([b"ab", b"cd"])
        self.assertRaises(batches.BatchError, batches.unpack, batches.BATCH, body[:-1])
        self.assertTrue(issubclass(batches.BatchError, ValueError))


class DiagnosisTests(SynchronousTestCase):
    """Start-up failures are explained in one line naming the broker and the cause."""

    config = RabbitMQConfig(host="mq", port=5673, username="bus", vhost="/tb")

    def text(self, e: BaseException) -> str:
        return diagnose(Failure(e), self.config)

    def test_unreachable(self):
        self.assertEqual(
            self.text(error.ConnectionRefusedError()),
            "cannot reach RabbitMQ at mq:5673: Connection was refused by other side",
        )
        self.assertEqual(self.text(error.DNSLookupError("mq")), "cannot reach RabbitMQ at mq:5673: DNS lookup failed: mq")

    def test_credentials(self):
        """403: the credentials."""
        self.assertEqual(
            self.text(amqp.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused")),
            "RabbitMQ at mq:5673 refused the credentials for user 'bus'",
        )

    def test_vhost(self):
        """530: the vhost."""
        self.assertEqual(
            self.text(amqp.ConnectionClosedByBroker(530, "NOT_ALLOWED - vhost /tb not found")),
            "RabbitMQ at mq:5673 refused user 'bus' access to vhost '/tb' (NOT_ALLOWED - vhost /tb not found)",
        )

    def test_other_close(self):
        self.assertEqual(
            self.text(amqp.ConnectionClosedByBroker(320, "CONNECTION_FORCED")),
            "RabbitMQ at mq:5673 closed the connection: 320 CONNECTION_FORCED",
        )

    def test_channel_refusal(self):
        """A refused declaration: the queues exist with other options, or permissions."""
        self.assertEqual(
            self.text(amqp.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg")),
            "RabbitMQ at mq:5673 refused to set up the exchanges and queues: "
            "406 PRECONDITION_FAILED - inequivalent arg",
        )

    def test_exchange_durability_refused(self):
        """An exchange declared transient before (Threat Bus, an earlier txthreatbus): the line says what to do."""
        text = self.text(amqp.ChannelClosedByBroker(
            406, "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'threatbus.intel' in vhost '/'"
        ))
        self.assertIn("refused to set up the exchanges and queues: 406 PRECONDITION_FAILED", text)
        self.assertIn("set durable_exchanges as they are, or delete them", text)

    def test_timeout(self):
        self.assertEqual(
            self.text(defer.TimeoutError()),
            f"RabbitMQ at mq:5673 did not answer within {CONNECT_TIMEOUT:g} s",
        )

    def test_tls(self):
        """A TLS failure points at the ssl section and the host the certificate must name."""
        line = self.text(TlsError("certificate verify failed"))
        self.assertTrue(line.startswith("TLS with RabbitMQ at mq:5673 failed: certificate verify failed"))
        self.assertIn("plugins.backbones.rabbitmq.ssl", line)
        self.assertIn("issued for 'mq'", line)

    def test_tls_client_certificate_required(self):
        """A broker that asks for a client certificate: the line points at cert_file and key_file."""
        line = self.text(TlsError("tlsv13 alert certificate required"))
        self.assertIn("set cert_file and key_file", line)
        self.assertNotIn("ca_file", line)

    def test_closed_while_opening(self):
        self.assertEqual(
            self.text(error.ConnectionDone()),
            "RabbitMQ at mq:5673 closed the connection while opening it (ConnectionDone: Connection was "
            "closed cleanly)",
        )
        self.assertIn("closed the connection while opening it", self.text(amqp.AMQPConnectionError(1)))

    def test_anything_else(self):
        self.assertEqual(
            self.text(RuntimeError("boom.")), "cannot connect to RabbitMQ at mq:5673: RuntimeError: boom"
        )

    def test_address_and_describe(self):
        self.assertEqual(address("::1", 5672), "[::1]:5672")
        self.assertEqual(address("mq", 5672), "mq:5672")
        self.assertEqual(describe(amqp.ChannelClosedByBroker(404, "NOT_FOUND")), "404 NOT_FOUND")
        self.assertEqual(describe(KeyError()), "KeyError")


def _write(testcase, name: str, data: bytes) -> str:
    directory = testcase.mktemp()
    os.makedirs(directory)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


class TlsOptionsTests(SynchronousTestCase):
    """connection.tls_options: the ssl section's files, checked when the backbone is made."""

    _pem: dict = {}

    def setUp(self):
        pem = TlsOptionsTests._pem
        if not pem:  # one key for all the tests
            key = ssl.KeyPair.generate(size=2048)
            # the certificate alone (a PrivateCertificate's PEM holds the key too)
            pem["cert"] = ssl.Certificate(key.selfSignedCert(1, CN="test CA").original).dumpPEM()
            pem["key"] = key.dump(crypto.FILETYPE_PEM)
        self.cert_pem, self.key_pem = pem["cert"], pem["key"]

    def config(self, **tls) -> RabbitMQConfig:
        return RabbitMQConfig(host="mq.example", port=5671, ssl=TlsConfig(**tls))

    def test_system_trust(self):
        """Without files: the system's CAs, and the host name checked."""
        self.assertIsNotNone(tls_options(self.config()))

    def test_files(self):
        """A CA file and a client certificate and key that are PEM are taken."""
        ca = _write(self, "ca.pem", self.cert_pem)
        cert = _write(self, "cert.pem", self.cert_pem)
        key = _write(self, "key.pem", self.key_pem)
        self.assertIsNotNone(tls_options(self.config(ca_file=ca, cert_file=cert, key_file=key)))

    def test_missing_file(self):
        """A file that cannot be read: ConfigError naming the key and the file."""
        missing = os.path.abspath(self.mktemp())
        for key in ("ca_file", "cert_file", "key_file"):
            files = {"cert_file": _write(self, "cert.pem", self.cert_pem),
                     "key_file": _write(self, "key.pem", self.key_pem), key: missing}
            if key != "ca_file":
                files.pop("ca_file", None)
            with self.assertRaises(ConfigError) as caught:
                tls_options(self.config(**files))
            self.assertIn(f"plugins.backbones.rabbitmq.ssl.{key}: cannot read {missing}", str(caught.exception))

    def test_unreadable_file(self):
        """A directory where a file should be: ConfigError naming the key."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with self.assertRaises(ConfigError) as caught:
            tls_options(self.config(ca_file=directory))
        self.assertIn("plugins.backbones.rabbitmq.ssl.ca_file: cannot read", str(caught.exception))

    def test_not_pem(self):
        """Files that are not PEM certificates or keys: ConfigError naming the section."""
        junk = _write(self, "junk.pem", b"not a certificate\n")
        cert = _write(self, "cert.pem", self.cert_pem)
        for tls in (dict(ca_file=junk), dict(cert_file=junk, key_file=junk), dict(cert_file=cert, key_file=junk)):
            with self.assertRaises(ConfigError) as caught:
                tls_options(self.config(**tls))
            self.assertIn("plugins.backbones.rabbitmq.ssl: not a PEM certificate or key", str(caught.exception))


class ConfigTests(SynchronousTestCase):
    """The backbone's options: buffer_bytes, batch_bytes, ssl."""

    def rabbitmq(self, text: str) -> RabbitMQConfig:
        return parse("plugins: {backbones: {rabbitmq: {%s}}}" % text).backbone

    def test_buffer_bytes_default(self):
        """buffer_bytes is 64 MiB unless set."""
        self.assertEqual(RabbitMQConfig().buffer_bytes, 67108864)
        self.assertEqual(self.rabbitmq("buffer_bytes: 1048576").buffer_bytes, 1 << 20)

    def test_buffer_bytes_refused(self):
        """A buffer_bytes that is not a whole number > 0 is refused, naming the key."""
        for bad in ("0", "-1", "1.5", "true", "64MiB", "null"):
            with self.assertRaises(ConfigError) as caught:
                self.rabbitmq(f"buffer_bytes: {bad}")
            self.assertIn("plugins.backbones.rabbitmq.buffer_bytes: must be a whole number > 0", str(caught.exception))

    def test_buffer_size_gone(self):
        """The message-count buffer_size option is gone: setting it is an unknown key."""
        with self.assertRaises(ConfigError) as caught:
            self.rabbitmq("buffer_size: 10")
        self.assertIn("plugins.backbones.rabbitmq.buffer_size: unknown key", str(caught.exception))

    def test_batch_bytes(self):
        """batch_bytes is 256 KiB unless set; 0 (one AMQP message each) is allowed; < 0 is not."""
        self.assertEqual(RabbitMQConfig().batch_bytes, 256 << 10)
        self.assertEqual(self.rabbitmq("").batch_bytes, 256 << 10)
        self.assertEqual(self.rabbitmq("batch_bytes: 0").batch_bytes, 0)
        self.assertEqual(self.rabbitmq("batch_bytes: 4096").batch_bytes, 4096)
        for bad in ("-1", "1.5", "true"):
            with self.assertRaises(ConfigError) as caught:
                self.rabbitmq(f"batch_bytes: {bad}")
            self.assertIn("plugins.backbones.rabbitmq.batch_bytes:", str(caught.exception))

    def test_ssl(self):
        """ssl: a section of files; none by default; an empty one means TLS with the system's CAs."""
        self.assertIsNone(RabbitMQConfig().ssl)
        self.assertIsNone(self.rabbitmq("").ssl)
        self.assertEqual(self.rabbitmq("ssl: {}").ssl, TlsConfig())
        loaded = self.rabbitmq("ssl: {ca_file: /ca.pem, cert_file: /c.pem, key_file: /k.pem}").ssl
        self.assertEqual(loaded, TlsConfig(ca_file="/ca.pem", cert_file="/c.pem", key_file="/k.pem"))

    def test_ssl_cert_without_key(self):
        """cert_file without key_file (or the reverse) is refused, naming the section."""
        for tls in ("cert_file: /c.pem", "key_file: /k.pem"):
            with self.assertRaises(ConfigError) as caught:
                self.rabbitmq("ssl: {%s}" % tls)
            self.assertIn("plugins.backbones.rabbitmq.ssl: cert_file and key_file go together", str(caught.exception))

    def test_ssl_refused(self):
        """Unknown keys and values that are not strings are refused, naming the key."""
        with self.assertRaises(ConfigError) as caught:
            self.rabbitmq("ssl: {verify: false}")
        self.assertIn("plugins.backbones.rabbitmq.ssl.verify: unknown key", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.rabbitmq("ssl: {ca_file: 5}")
        self.assertIn("plugins.backbones.rabbitmq.ssl.ca_file:", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.rabbitmq("ssl: /ca.pem")
        self.assertIn("plugins.backbones.rabbitmq.ssl: must be a mapping", str(caught.exception))
