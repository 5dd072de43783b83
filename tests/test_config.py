"""
Configuration: a Threat Bus 2020.11.26 config.yaml loads unchanged, and
each kind of mistake is a ConfigError of one line that names the key.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txthreatbus import config
from txthreatbus.config import (
    Config,
    ConfigError,
    CurveConfig,
    InMemConfig,
    LoggingConfig,
    MetricsConfig,
    RabbitMQConfig,
    StoreConfig,
    ZmqAppConfig,
)

#: A complete config.yaml as Threat Bus 2020.11.26 documents it.
THREATBUS_2020_11_26 = """\
logging:
  console: true
  console_verbosity: DEBUG
  file: true
  file_verbosity: WARNING
  filename: /var/log/threatbus.log

plugins:
  backbones:
    inmem: {}
  apps:
    zmq-app:
      host: "0.0.0.0"
      manage: 13380
      pub: 13381
      sub: 13382
"""


class ConfigTestCase(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def assertConfigError(self, text: str, *fragments: str) -> str:
        """``text`` is refused with a one-line ConfigError containing ``fragments``."""
        e = self.assertRaises(ConfigError, config.parse, text)
        message = str(e)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class DefaultsTests(ConfigTestCase):
    """Every key has a default."""

    def test_no_file(self):
        """Config() is the in-memory backbone and zmq-app on 127.0.0.1:13370-13372."""
        c = Config()
        self.assertEqual(c.logging, LoggingConfig(True, "INFO", False, "DEBUG", "threatbus.log"))
        self.assertEqual(c.backbone, InMemConfig())
        self.assertEqual(
            (c.zmq_app.host, c.zmq_app.manage, c.zmq_app.pub, c.zmq_app.sub),
            ("127.0.0.1", 13370, 13371, 13372),
        )
        self.assertIsNone(c.zmq_app.curve)
        self.assertIsNone(c.metrics)

    def test_empty_file(self):
        """An empty file, or one with empty sections, is all defaults."""
        self.assertEqual(config.load(self.write("")), Config())
        self.assertEqual(config.parse("logging:\nplugins:\n  backbones:\n  apps:\n"), Config())

    def test_bare_plugin_keys(self):
        """inmem: and zmq-app: with no value (as in Threat Bus's example) are defaults."""
        self.assertEqual(config.parse("plugins:\n  backbones:\n    inmem:\n  apps:\n    zmq-app:\n"), Config())


class ThreatBusConfigTests(ConfigTestCase):
    """A Threat Bus 2020.11.26 config.yaml works unchanged."""

    def test_full(self):
        """Every key of the 2020.11.26 layout is read."""
        c = config.load(self.write(THREATBUS_2020_11_26))
        self.assertEqual(
            c.logging,
            LoggingConfig(
                console=True,
                console_verbosity="DEBUG",
                file=True,
                file_verbosity="WARNING",
                filename="/var/log/threatbus.log",
            ),
        )
        self.assertEqual(c.backbone, InMemConfig())
        self.assertEqual(
            (c.zmq_app.host, c.zmq_app.manage, c.zmq_app.pub, c.zmq_app.sub),
            ("0.0.0.0", 13380, 13381, 13382),
        )
        self.assertIsNone(c.metrics)

    def test_lower_case_verbosity(self):
        """Verbosity names are case-insensitive, WARN and WARNING both."""
        for name in ("info", "Warn", "warning", "CRITICAL", "error", "debug"):
            c = config.parse(f"logging: {{console_verbosity: {name}}}")
            self.assertEqual(c.logging.console_verbosity, name)

    def test_txthreatbus_keys(self):
        """txthreatbus's own keys (metrics, zmq-app limits, curve) load."""
        c = config.parse(
            """\
metrics: {host: "::1", port: 9200}
plugins:
  apps:
    zmq-app:
      advertise_host: bus.example.com
      snapshot_timeout: 60
      subscription_timeout: 60.5
      manage: 0
      curve:
        server_secret_key_file: /etc/server.key_secret
        authorized_clients_dir: /etc/clients
"""
        )
        self.assertEqual(c.metrics, MetricsConfig("::1", 9200))
        self.assertEqual(c.zmq_app.advertise_host, "bus.example.com")
        self.assertEqual((c.zmq_app.snapshot_timeout, c.zmq_app.subscription_timeout), (60, 60.5))
        self.assertEqual(c.zmq_app.manage, 0)
        self.assertEqual(c.zmq_app.curve, CurveConfig("/etc/server.key_secret", "/etc/clients"))

    def test_rabbitmq(self):
        """A rabbitmq section with queue options loads."""
        c = config.parse(
            """\
plugins:
  backbones:
    rabbitmq:
      host: rabbit.example.com
      port: 5673
      username: bus
      password: secret
      vhost: /threatbus
      naming_join_pattern: "."
      queue:
        name_suffix: my_suffix
        durable: true
        auto_delete: false
        lazy: true
        exclusive: false
        max_items: 100000
"""
        )
        self.assertIsInstance(c.backbone, RabbitMQConfig)
        self.assertEqual(
            (c.backbone.host, c.backbone.port, c.backbone.username, c.backbone.vhost),
            ("rabbit.example.com", 5673, "bus", "/threatbus"),
        )
        q = c.backbone.queue
        self.assertEqual(
            (q.name_suffix, q.durable, q.auto_delete, q.lazy, q.exclusive, q.max_items),
            ("my_suffix", True, False, True, False, 100000),
        )


class ConfigErrorTests(ConfigTestCase):
    """Each kind of bad config is one line that names the key."""

    def test_is_value_error(self):
        """ConfigError is a ValueError."""
        self.assertTrue(issubclass(ConfigError, ValueError))

    def test_missing_file(self):
        """A file that does not exist is named, with the reason."""
        path = os.path.abspath(self.mktemp())
        e = self.assertRaises(ConfigError, config.load, path)
        self.assertIn(path, str(e))
        self.assertIn("cannot read", str(e))
        self.assertNotIn("\n", str(e))

    def test_directory(self):
        """A directory is not a config file."""
        path = self.mktemp()
        os.mkdir(path)
        e = self.assertRaises(ConfigError, config.load, path)
        self.assertIn("cannot read", str(e))

    def test_not_utf8(self):
        """A file that is not UTF-8 text."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"logging: \xff\xfe\n")
        e = self.assertRaises(ConfigError, config.load, path)
        self.assertIn("not UTF-8", str(e))

    def test_invalid_yaml(self):
        """Invalid YAML is reported with its line."""
        self.assertConfigError("logging:\n  console: [\n", "invalid YAML", "line 3")
        self.assertConfigError("a: b: c", "invalid YAML", "line 1")

    def test_invalid_yaml_character(self):
        """A control character in the YAML is reported on one line."""
        self.assertConfigError("logging: \x01\n", "invalid YAML", "unacceptable character")

    def test_invalid_yaml_in_file(self):
        """A file's YAML error names the file."""
        path = self.write("plugins: {")
        e = self.assertRaises(ConfigError, config.load, path)
        self.assertIn(path, str(e))
        self.assertIn("invalid YAML", str(e))

    def test_top_level_not_mapping(self):
        """A document that is a list, scalar or false is not a config."""
        for text in ("[]", "- a", "5", "false", "just text"):
            self.assertConfigError(text, "the top level: must be a mapping")

    def test_unknown_top_level_key(self):
        """An unknown top-level key is named, with the known ones."""
        self.assertConfigError("loggin: {}", "loggin: unknown key", "logging, metrics, plugins")

    def test_unknown_plugins_key(self):
        """An unknown key under plugins is named with its path."""
        self.assertConfigError("plugins: {backbone: {}}", "plugins.backbone: unknown key")

    def test_unknown_backbone(self):
        """An unknown backbone plugin is named."""
        self.assertConfigError(
            "plugins: {backbones: {kafka: {}}}",
            "plugins.backbones.kafka: unknown backbone plugin",
            "inmem, rabbitmq",
        )

    def test_unknown_app(self):
        """An unknown app plugin (Threat Bus's zeek) is named."""
        self.assertConfigError(
            "plugins:\n  apps:\n    zeek:\n      host: 127.0.0.1\n      port: 47761\n",
            "plugins.apps.zeek: unknown app plugin",
            "zmq-app",
        )

    def test_two_backbones(self):
        """Only one backbone can be configured."""
        self.assertConfigError(
            "plugins: {backbones: {inmem: {}, rabbitmq: {}}}",
            "plugins.backbones: configure one backbone",
            "inmem, rabbitmq",
        )

    def test_unknown_section_key(self):
        """An unknown key inside a section is named with its full path."""
        self.assertConfigError("plugins: {apps: {zmq-app: {port: 1}}}", "plugins.apps.zmq-app.port: unknown key")
        self.assertConfigError("logging: {colour: true}", "logging.colour: unknown key")
        self.assertConfigError("plugins: {backbones: {inmem: {x: 1}}}", "plugins.backbones.inmem.x: unknown key")
        self.assertConfigError("metrics: {ip: x}", "metrics.ip: unknown key")

    def test_wrong_types(self):
        """A value of the wrong type is named with what it must be."""
        for text, fragments in (
            ('plugins: {apps: {zmq-app: {manage: "x"}}}', ("plugins.apps.zmq-app.manage:", "port number", "'x'")),
            ("logging: {console: yes-string}", ("logging.console:", "true or false", "'yes-string'")),
            ("logging: {file: 1}", ("logging.file:", "true or false")),
            ("logging: {filename: ''}", ("logging.filename:", "non-empty string")),
            ("plugins: {apps: {zmq-app: {host: 5}}}", ("plugins.apps.zmq-app.host:", "string")),
            ("plugins: {apps: {zmq-app: {manage: true}}}", ("plugins.apps.zmq-app.manage:", "True")),
            ("plugins: {apps: {zmq-app: {pub: 1.5}}}", ("plugins.apps.zmq-app.pub:",)),
            ("plugins: {apps: {zmq-app: {snapshot_timeout: 0}}}", ("plugins.apps.zmq-app.snapshot_timeout:", "> 0")),
            ("plugins: {apps: {zmq-app: {subscription_timeout: -1}}}", ("subscription_timeout:", ">= 0")),
            ("plugins: {apps: {zmq-app: {buffer_bytes: 0}}}", ("plugins.apps.zmq-app.buffer_bytes:", "> 0")),
            ("plugins: {apps: {zmq-app: {max_buffered_bytes: -1}}}", ("plugins.apps.zmq-app.max_buffered_bytes:", "> 0")),
            (
                "plugins: {apps: {zmq-app: {max_subscriptions_per_peer: 0}}}",
                ("plugins.apps.zmq-app.max_subscriptions_per_peer:", "> 0"),
            ),
            ("metrics: {port: '9100'}", ("metrics.port:",)),
        ):
            self.assertConfigError(text, *fragments)

    def test_port_out_of_range(self):
        """Ports above 65535 or below 0 are refused, naming the key."""
        for key in ("manage", "pub", "sub"):
            for bad in (70000, -1, 65536):
                self.assertConfigError(
                    f"plugins: {{apps: {{zmq-app: {{{key}: {bad}}}}}}}",
                    f"plugins.apps.zmq-app.{key}:", "port number", str(bad),
                )
        self.assertConfigError("metrics: {port: 70000}", "metrics.port:", "70000")

    def test_port_limits(self):
        """Ports 1 and 65535 are accepted."""
        c = config.parse("plugins: {apps: {zmq-app: {manage: 1, pub: 65535}}}")
        self.assertEqual((c.zmq_app.manage, c.zmq_app.pub), (1, 65535))

    def test_bad_verbosity(self):
        """A verbosity that is not a level name is refused, listing the levels."""
        for key in ("console_verbosity", "file_verbosity"):
            for bad in ("LOUD", 10, "'  '"):
                self.assertConfigError(f"logging: {{{key}: {bad}}}", f"logging.{key}:", "DEBUG, INFO")

    def test_section_not_mapping(self):
        """A section that is not a mapping is named."""
        for text, key in (
            ("logging: true", "logging:"),
            ("plugins: [inmem]", "plugins:"),
            ("plugins: {backbones: inmem}", "plugins.backbones:"),
            ("plugins: {apps: [zmq-app]}", "plugins.apps:"),
            ("plugins: {backbones: {inmem: 1}}", "plugins.backbones.inmem:"),
            ("plugins: {apps: {zmq-app: 13370}}", "plugins.apps.zmq-app:"),
            ("plugins: {apps: {zmq-app: {curve: yes}}}", "plugins.apps.zmq-app.curve:"),
            ("metrics: 9100", "metrics:"),
        ):
            self.assertConfigError(text, key, "must be a mapping")

    def test_curve_missing_keys(self):
        """A curve section needs both of its keys, and names the missing ones."""
        base = "plugins: {apps: {zmq-app: {curve: %s}}}"
        self.assertConfigError(
            base % "{}", "plugins.apps.zmq-app.curve: needs",
            "server_secret_key_file", "authorized_clients_dir",
        )
        message = self.assertConfigError(
            base % "{server_secret_key_file: /k}", "plugins.apps.zmq-app.curve: needs authorized_clients_dir"
        )
        self.assertNotIn("server_secret_key_file", message)
        self.assertConfigError(
            base % "{server_secret_key_file: /k, authorized_clients_dir: ''}",
            "plugins.apps.zmq-app.curve.authorized_clients_dir:", "non-empty string",
        )

    def test_rabbitmq_errors(self):
        """Errors inside the rabbitmq section name the nested key."""
        self.assertConfigError(
            "plugins: {backbones: {rabbitmq: {queue: {durable: maybe}}}}",
            "plugins.backbones.rabbitmq.queue.durable:",
        )
        self.assertConfigError(
            "plugins: {backbones: {rabbitmq: {port: 70000}}}", "plugins.backbones.rabbitmq.port:"
        )
        self.assertConfigError(
            "plugins: {backbones: {rabbitmq: {queue: 1}}}", "plugins.backbones.rabbitmq.queue:", "mapping"
        )

    def test_error_in_file_names_file_and_key(self):
        """A bad key in a file is named along with the file."""
        path = self.write("plugins:\n  apps:\n    zmq-app:\n      manage: 70000\n")
        e = self.assertRaises(ConfigError, config.load, path)
        self.assertIn(path, str(e))
        self.assertIn("plugins.apps.zmq-app.manage:", str(e))


THREATBUS_2022_5_16 = """\
logging:
  console: true
  console_verbosity: INFO
  file: false
  file_verbosity: INFO
  filename: threatbus.log

plugins:
  backbones:
    inmem: {}
  apps:
    zmq:
      host: "127.0.0.1"
      manage: 13370
      pub: 13371
      sub: 13372
"""


class StixGenerationConfigTests(ConfigTestCase):
    """A Threat Bus 2022.5.16 config (plugins.apps.zmq) works unchanged, beside or instead of zmq-app."""

    def test_zmq(self):
        """plugins.apps.zmq is the only app plugin when it is the only one given."""
        c = config.load(self.write(THREATBUS_2022_5_16))
        self.assertEqual(list(c.apps), ["zmq"])
        self.assertEqual((c.zmq_app.host, c.zmq_app.manage, c.zmq_app.pub, c.zmq_app.sub), ("127.0.0.1", 13370, 13371, 13372))

    def test_both(self):
        """zmq-app and zmq together are two plugins, in the file's order, each on its own ports."""
        c = config.parse("plugins: {apps: {zmq: {manage: 1, pub: 2, sub: 3}, zmq-app: {}}}")
        self.assertEqual(list(c.apps), ["zmq", "zmq-app"])
        self.assertEqual(c.apps["zmq-app"], ZmqAppConfig())
        self.assertConfigError(
            "plugins: {apps: {zmq: {}, zmq-app: {}}}",
            "plugins.apps.zmq-app.manage: port 13370 is plugins.apps.zmq.manage's too",
        )

    def test_environment(self):
        """THREATBUS_PLUGINS__APPS__ZMQ__* set the zmq plugin, as Threat Bus 2022 reads them."""
        loaded = config.load(self.write(THREATBUS_2022_5_16), {"THREATBUS_PLUGINS__APPS__ZMQ__HOST": "0.0.0.0"})
        self.assertEqual(loaded.apps["zmq"].host, "0.0.0.0")

    def test_two_plugins_run(self):
        """The service tree has one app plugin per key, named by it, each with its config."""
        from txthreatbus.apps.zmq_app.memory import MemorySockets
        from txthreatbus.tap import bus_service

        c = config.parse("plugins: {apps: {zmq: {manage: 1, pub: 2, sub: 3}, zmq-app: {}}}")
        top = bus_service(c, Clock(), sockets=MemorySockets)
        for name in ("zmq", "zmq-app"):
            self.assertIs(top.getServiceNamed(name).config, c.apps[name])


class StoreConfigTests(ConfigTestCase):
    """The store: on by default, off with store: false, its URL checked."""

    def test_default_on(self):
        """With no store key, the store is SQLite in the working directory, keeping everything."""
        self.assertEqual(config.parse("").store, StoreConfig(url="sqlite:///txthreatbus.sqlite", retention_days=0))
        self.assertEqual(config.parse("store:\n").store, StoreConfig())
        self.assertEqual(config.parse("store: true\n").store, StoreConfig())

    def test_off(self):
        """store: false is no store, as Threat Bus has none."""
        self.assertIsNone(config.parse("store: false\n").store)

    def test_postgresql_and_retention(self):
        """A PostgreSQL URL and retention_days are read; the environment sets them too."""
        c = config.parse("store: {url: 'postgresql://bus@db/intel', retention_days: 30}\n")
        self.assertEqual(c.store, StoreConfig(url="postgresql://bus@db/intel", retention_days=30))
        c = config.load(None, {"THREATBUS_STORE__URL": "sqlite:////var/lib/txthreatbus/intel.sqlite"})
        self.assertEqual(c.store.url, "sqlite:////var/lib/txthreatbus/intel.sqlite")

    def test_errors(self):
        """Another database, a bad retention or a store that is no mapping is refused, naming the key."""
        self.assertConfigError("store: {url: 'mysql://db/x'}", "store.url: must be a database URL")
        self.assertConfigError("store: {retention_days: -1}", "store.retention_days")
        self.assertConfigError("store: [1]", "store: must be a mapping, or false for no store")
        self.assertConfigError("store: {path: x}", "store.path: unknown key")

    def test_safe_url(self):
        """A URL's password never reaches a log line or check-config."""
        self.assertEqual(config.safe_url("postgresql://bus:secret@db/intel"), "postgresql://bus:***@db/intel")
        self.assertEqual(config.safe_url("sqlite:///x.sqlite"), "sqlite:///x.sqlite")


class EnvironmentTests(ConfigTestCase):
    """THREATBUS_* environment variables override config keys, as Threat Bus 2021+ reads them."""

    def test_override_file(self):
        """A variable's value, read as YAML, replaces the file's key; the others stay."""
        path = self.write("plugins:\n  apps:\n    zmq-app: {host: 127.0.0.1, manage: 1000}\n")
        loaded = config.load(
            path,
            {
                "THREATBUS_PLUGINS__APPS__ZMQ_APP__HOST": "0.0.0.0",
                "THREATBUS_PLUGINS__APPS__ZMQ_APP__PUB": "2000",
                "THREATBUS_LOGGING__CONSOLE": "false",
                "HOME": "/root",
            },
        )
        self.assertEqual(
            (loaded.zmq_app.host, loaded.zmq_app.manage, loaded.zmq_app.pub, loaded.logging.console),
            ("0.0.0.0", 1000, 2000, False),
        )

    def test_without_file(self):
        """With no file, variables build the sections they name, a backbone included."""
        loaded = config.load(
            None,
            {
                "THREATBUS_PLUGINS__BACKBONES__RABBITMQ__HOST": "broker.example.org",
                "THREATBUS_METRICS__PORT": "9200",
            },
        )
        self.assertEqual(loaded.backbone.host, "broker.example.org")
        self.assertEqual(loaded.metrics.port, 9200)
        self.assertEqual(config.load(None, {}), config.Config())

    def test_checked_as_a_file(self):
        """A wrong value or key from a variable is a ConfigError naming the key."""
        for variables, words in (
            ({"THREATBUS_PLUGINS__APPS__ZMQ_APP__MANAGE": "70000"}, ("plugins.apps.zmq-app.manage:",)),
            ({"THREATBUS_PLUGINS__APPS__ZMQ_APP__COLOR": "red"}, ("plugins.apps.zmq-app.color:", "unknown key")),
            ({"THREATBUS_LOGGING__CONSOLE__X": "1"}, ("THREATBUS_LOGGING__CONSOLE__X", "logging.console is not a section")),
            ({"THREATBUS_LOGGING____X": "1"}, ("THREATBUS_LOGGING____X", "not a config key's path")),
        ):
            path = self.write("logging: {console: true}\n")
            error = self.assertRaises(config.ConfigError, config.load, path, variables)
            for word in words:
                self.assertIn(word, str(error))

    def test_twistd_reads_environment(self):
        """twistd zmq-app applies the process's THREATBUS_* variables, with or without --config."""
        from txthreatbus.tap import Options

        self.patch(os, "environ", {**os.environ, "THREATBUS_PLUGINS__APPS__ZMQ_APP__MANAGE": "14370"})
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["config"].zmq_app.manage, 14370)


class PortTests(ConfigTestCase):
    """Each listening endpoint needs a port of its own."""

    def test_same_port_twice(self):
        """Two endpoints on one port of one host are refused, naming both keys."""
        self.assertConfigError(
            "plugins: {apps: {zmq-app: {pub: 13370}}}",
            "plugins.apps.zmq-app.pub: port 13370 is plugins.apps.zmq-app.manage's too",
        )
        self.assertConfigError(
            "metrics: {host: 127.0.0.1, port: 13372}",
            "metrics.port: port 13372 is plugins.apps.zmq-app.sub's too",
        )
        self.assertConfigError(
            "plugins: {apps: {zmq-app: {host: 0.0.0.0}}}\nmetrics: {host: 127.0.0.1, port: 13371}",
            "metrics.port",
        )

    def test_allowed(self):
        """Port 0 (any free port) repeats freely, and other hosts may share a port number."""
        config.parse("plugins: {apps: {zmq-app: {manage: 0, pub: 0, sub: 0}}}\nmetrics: {port: 0}")
        config.parse("plugins: {apps: {zmq-app: {host: 127.0.0.1}}}\nmetrics: {host: 127.0.0.2, port: 13370}")

