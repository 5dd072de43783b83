"""
The README's snippets run as written (the bus's ports put in): the quick
start's pyzmq app and the client library example, against a running bus;
the example test of an app, with trial; every config it shows loads.
"""

from __future__ import annotations

import os
import re
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import start_bus, wait_for, zmq_app_of
from tests.test_cli import environment
from txthreatbus import config

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def snippet(heading: str) -> str:
    """The first Python block of the README section ``heading``."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


async def run_python(testcase, source: str, top, *args: str):
    """Run ``source`` with the default ports replaced by ``top``'s: (stdout, stderr, code)."""
    ports = zmq_app_of(top).ports
    source = source.replace("13370", str(ports["manage"]))
    path = testcase.mktemp() + ".py"
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    d = getProcessOutputAndValue(sys.executable, [path, *args], env=environment(), reactor=reactor)
    d.addTimeout(30, reactor)
    return await d


class ReadmeSnippetTests(TestCase):
    """What a new user copies from the README works."""

    async def test_quick_start_app(self):
        """The quick start's app gets its intel back, and leaves no subscription behind."""
        top = start_bus(self)
        out, err, code = await run_python(self, snippet("## Quick start"), top)
        self.assertEqual(code, 0, err)
        self.assertIn(b'intel {"ts": "2020-11-26 14:46:52", "id": "i1"', out)
        self.assertEqual(len(zmq_app_of(top).subscriptions), 0)

    async def test_client_example(self):
        """The client library example publishes its intel, receives it, and unsubscribes."""
        top = start_bus(self)
        out, err, code = await run_python(self, snippet("## Client library"), top)
        self.assertEqual(code, 0, err)
        self.assertIn(b"Intel(", out)
        await wait_for(lambda: len(zmq_app_of(top).subscriptions) == 0, what="the unsubscribe")

    async def test_testing_example(self):
        """The example test of an app on txthreatbus.testing's fakes passes."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "test_watch.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(snippet("### Testing an app"))
        d = getProcessOutputAndValue(
            sys.executable,
            ["-m", "twisted.trial", path],
            env=environment(),
            path=folder,
            reactor=reactor,
        )
        d.addTimeout(60, reactor)
        out, err, code = await d
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"PASSED (successes=1)", out)


class ReadmeConfigTests(SynchronousTestCase):
    """Every config the README shows is one that twistd accepts."""

    def test_every_yaml_block_is_a_config(self):
        with open(README, encoding="utf-8") as f:
            blocks = re.findall(r"```yaml\n(.*?)```", f.read(), re.S)
        self.assertGreaterEqual(len(blocks), 5)
        for block in blocks:
            try:
                config.parse(block)
            except config.ConfigError as e:
                self.fail(f"the README's config does not load: {e}\n{block}")
