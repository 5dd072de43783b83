"""
The status page: what the bus is doing, for a person (``/``) and for
programs (``/status.json``), served beside ``/metrics`` by the metrics
endpoint.

``Status`` gathers it from the read-only ``status()`` methods of the
services that own it (the bus core, the backbone, the app plugins, the
store), and turns the bus's counters into rates with ``Rates``, a sampler
driven by the clock. What it lists is bounded: at most ``MAX_LISTED``
subscriptions, and the total, so that a hostile number of subscriptions
cannot make a page large or slow to build. A subscription's point-to-point
topic lets whoever knows it read that app's stream: the page shows only its
first letters.

The HTML page is built on the server, every value from peers escaped, and
refreshed by a small inline script that fetches ``status.json`` and builds
the same page with ``textContent`` only. Its Content-Security-Policy allows
that script and style (by hash) and nothing else: no other script, no
external resource.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import deque
from html import escape
from typing import Callable, Optional, Sequence

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource

import txthreatbus
from txthreatbus import logs

log = Logger(observer=logs.publisher)

VERSION = txthreatbus.__version__
#: Subscriptions listed at most (the total is given too).
MAX_LISTED = 1000
#: Seconds between samples of the counters, and the span of time the rates
#: cover (at most one interval more).
SAMPLE_INTERVAL = 5.0
RATE_WINDOW = 60.0
#: Seconds between the page's refreshes.
REFRESH_SECONDS = 2


class Rates:
    """
    Rates of the counters that ``read()`` returns (a dict of numbers), over
    the last ``window`` seconds: ``clock`` samples them every ``interval``
    seconds, and a rate is the change from the oldest sample kept to now.
    """

    def __init__(self, clock, read: Callable[[], dict], interval: float = SAMPLE_INTERVAL,
                 window: float = RATE_WINDOW):
        self._clock = clock
        self._read = read
        self._interval = interval
        self._window = window
        self._samples: deque = deque()
        self._loop: Optional[LoopingCall] = None

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("Sampling the counters for the status page failed", f)
        )

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        self._samples.clear()

    def sample(self) -> None:
        """Take a sample now; forget those older than the window."""
        now = self._clock.seconds()
        self._samples.append((now, self._read()))
        while self._samples[0][0] < now - self._window:
            self._samples.popleft()

    def rates(self) -> dict:
        """
        ``seconds``: the span the rates cover (0 before the first sample, or
        right at it), and ``per_second``: each counter's rate over it.
        """
        current = self._read()
        if not self._samples:
            return {"seconds": 0.0, "per_second": {key: 0.0 for key in current}}
        then, old = self._samples[0]
        span = self._clock.seconds() - then
        if span <= 0:
            return {"seconds": 0.0, "per_second": {key: 0.0 for key in current}}
        return {
            "seconds": span,
            "per_second": {key: round((value - old.get(key, 0)) / span, 3) for key, value in current.items()},
        }


class Status:
    """
    The status of one bus, as ``report()`` gives it; started and stopped
    with the metrics endpoint (uptime counts from the start).

    @param bus: the ``Bus``.
    @param backbone: its backbone (with ``status()``).
    @param apps: its app plugins (``ZmqAppService``s).
    @param store: its ``StoreService``, if any.
    @param limit: subscriptions listed at most.
    """

    def __init__(self, clock, bus, backbone, apps: Sequence = (), store=None, limit: int = MAX_LISTED,
                 interval: float = SAMPLE_INTERVAL, window: float = RATE_WINDOW):
        self._clock = clock
        self._bus = bus
        self._backbone = backbone
        self._apps = tuple(apps)
        self._store = store
        self._limit = limit
        self._started: Optional[float] = None
        self.rates = Rates(clock, bus.metrics.counts, interval, window)

    def start(self) -> None:
        if self._started is None:
            self._started = self._clock.seconds()
        self.rates.start()

    def stop(self) -> None:
        self._started = None
        self.rates.stop()

    def report(self) -> dict:
        """The status as plain values (JSON's)."""
        apps, listed, total = [], [], 0
        for app in self._apps:
            state = app.status(self._limit - len(listed))
            subscriptions = state.pop("subscriptions")
            total += state["subscription_count"]
            listed.extend({"app": app.name, **sub} for sub in subscriptions)
            apps.append(state)
        rates = self.rates.rates()
        per_second = rates["per_second"]
        counts = self._bus.metrics.counts()
        started = self._started
        return {
            "version": VERSION,
            "uptime_seconds": 0.0 if started is None else self._clock.seconds() - started,
            "apps": apps,
            "backbone": self._backbone.status(),
            "store": None if self._store is None else self._store.status(),
            **self._bus.status(),
            "rates": {
                "seconds": rates["seconds"],
                **{key: per_second.get(key, 0.0) for key in ("received", "published", "unrouted", "dropped")},
                "dropped_by_reason": {
                    key.split(":", 1)[1]: value
                    for key, value in sorted(per_second.items())
                    if key.startswith("dropped:")
                },
            },
            "totals": {key: counts[key] for key in ("received", "published", "unrouted", "dropped")},
            "subscriptions": {"total": total, "listed": len(listed), "limit": self._limit, "items": listed},
        }


# --- what a person reads: the same words on the server (Python) and in the
# browser (the script below)


def duration(seconds: Optional[float]) -> str:
    """``seconds`` for a person: ``1d 2h 3m 4s``, ``5s``; ``-`` for None."""
    if seconds is None:
        return "-"
    rest = max(0, int(seconds))
    days, rest = divmod(rest, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts, shown = [], False
    for value, unit in ((days, "d"), (hours, "h"), (minutes, "m")):
        shown = shown or bool(value)
        if shown:
            parts.append(f"{value}{unit}")
    parts.append(f"{secs}s")
    return " ".join(parts)


def describe_backbone(backbone: dict) -> str:
    if backbone["kind"] != "rabbitmq":
        return "in-memory (this instance only)"
    state = "connected" if backbone["connected"] else "NOT connected"
    return (
        f"RabbitMQ at {backbone['address']} (vhost {backbone['vhost']}): {state}; "
        f"{backbone['pending_messages']} messages ({backbone['pending_bytes']} bytes) "
        "not yet confirmed by the broker"
    )


def describe_store(store: Optional[dict]) -> str:
    if store is None:
        return "none"
    records = store["records"]
    counted = (
        "not counted yet" if records is None else ", ".join(f"{kind} {n}" for kind, n in records.items())
    )
    queue = store["queue"]
    return (
        f"{store['url']}: {store['state']}; records: {counted}; "
        f"waiting to be written: {queue['records']} ({queue['bytes']} bytes)"
    )


def _rate(value: float) -> str:
    return f"{value:.2f}/s"


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def view(report: dict) -> list:
    """
    The page as sections of plain strings, before any markup:
    ``(title, note, head, rows)``, a head of None being a table of
    name/value rows.
    """
    rates = report["rates"]
    subscriptions = report["subscriptions"]
    return [
        ("Overview", None, None, [
            ("Version", report["version"]),
            ("Uptime", duration(report["uptime_seconds"])),
            ("Backbone", describe_backbone(report["backbone"])),
            ("Store", describe_store(report["store"])),
            ("Snapshots pending", str(report["snapshots_pending"])),
        ]),
        ("Endpoints", None,
         ("Plugin", "Host", "Advertised host", "Manage", "Pub", "Sub", "CURVE", "Subscriptions",
          "Buffered bytes", "Held snapshot requests"),
         [
             (app["name"], app["host"], app["advertised_host"], str(app["ports"]["manage"]),
              str(app["ports"]["pub"]), str(app["ports"]["sub"]), "on" if app["curve"] else "off",
              str(app["subscription_count"]), str(app["buffered_bytes"]), str(app["held_snapshot_requests"]))
             for app in report["apps"]
         ]),
        ("Rates", f"over the last {duration(rates['seconds'])}", ("Messages", "Rate", "In all"), [
            ("received from apps", _rate(rates["received"]), str(report["totals"]["received"])),
            ("published to apps", _rate(rates["published"]), str(report["totals"]["published"])),
            ("reached no subscriber", _rate(rates["unrouted"]), str(report["totals"]["unrouted"])),
            ("dropped", _rate(rates["dropped"]), str(report["totals"]["dropped"])),
            *((f"dropped: {reason}", _rate(value), "") for reason, value in rates["dropped_by_reason"].items()),
        ]),
        ("Subscriptions", f"{subscriptions['listed']} of {subscriptions['total']} shown",
         ("Plugin", "Generation", "Topics", "P2P topic", "Peer", "Age", "Last heartbeat", "Ready",
          "Snapshot", "Buffered frames", "Buffered bytes"),
         [
             (sub["app"], sub["generation"], ", ".join(sub["topics"]), sub["p2p"], sub["peer"],
              duration(sub["age_seconds"]),
              "never" if sub["last_heartbeat_seconds_ago"] is None
              else duration(sub["last_heartbeat_seconds_ago"]) + " ago",
              _yes(sub["ready"]), _yes(sub["snapshot"]), str(sub["buffered_frames"]), str(sub["buffered_bytes"]))
             for sub in subscriptions["items"]
         ]),
    ]


def _html_section(title: str, note: Optional[str], head, rows) -> str:
    e = escape
    parts = [f"<h2>{e(title)}</h2>"]
    if note:
        parts.append(f'<p class="note">{e(note)}</p>')
    parts.append(f'<table id="{e(title.lower())}">')
    if head is None:
        parts.append("<tbody>")
        parts.extend(f"<tr><th>{e(name)}</th><td>{e(value)}</td></tr>" for name, value in rows)
    else:
        parts.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>")
        parts.extend("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    parts.append("</tbody></table>")
    return "\n".join(parts)


STYLE = """
body { font-family: sans-serif; margin: 1em 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
thead th { background: #eee; }
.note, #updated { color: #666; }
"""

# Builds what view() builds, from status.json; text goes into the page as
# textContent only (never as markup).
SCRIPT = """
(function () {
  "use strict";
  var REFRESH = %(refresh)d * 1000;
  var updated = document.getElementById("updated");
  var refreshes = 0;
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    var rest = Math.max(0, Math.floor(seconds)), parts = [], shown = false;
    [[86400, "d"], [3600, "h"], [60, "m"]].forEach(function (u) {
      var value = Math.floor(rest / u[0]);
      rest -= value * u[0];
      shown = shown || value > 0;
      if (shown) parts.push(value + u[1]);
    });
    parts.push(rest + "s");
    return parts.join(" ");
  }
  function rate(value) { return value.toFixed(2) + "/s"; }
  function yes(value) { return value ? "yes" : "no"; }
  function backbone(b) {
    if (b.kind !== "rabbitmq") return "in-memory (this instance only)";
    return "RabbitMQ at " + b.address + " (vhost " + b.vhost + "): " +
      (b.connected ? "connected" : "NOT connected") + "; " + b.pending_messages + " messages (" +
      b.pending_bytes + " bytes) not yet confirmed by the broker";
  }
  function store(s) {
    if (s === null) return "none";
    var counted = s.records === null ? "not counted yet" :
      Object.keys(s.records).map(function (k) { return k + " " + s.records[k]; }).join(", ");
    return s.url + ": " + s.state + "; records: " + counted + "; waiting to be written: " +
      s.queue.records + " (" + s.queue.bytes + " bytes)";
  }
  function view(r) {
    var rates = r.rates, subs = r.subscriptions;
    return [
      ["Overview", null, null, [
        ["Version", r.version], ["Uptime", duration(r.uptime_seconds)],
        ["Backbone", backbone(r.backbone)], ["Store", store(r.store)],
        ["Snapshots pending", String(r.snapshots_pending)]]],
      ["Endpoints", null,
       ["Plugin", "Host", "Advertised host", "Manage", "Pub", "Sub", "CURVE", "Subscriptions",
        "Buffered bytes", "Held snapshot requests"],
       r.apps.map(function (a) {
         return [a.name, a.host, a.advertised_host, String(a.ports.manage), String(a.ports.pub),
                 String(a.ports.sub), a.curve ? "on" : "off", String(a.subscription_count),
                 String(a.buffered_bytes), String(a.held_snapshot_requests)];
       })],
      ["Rates", "over the last " + duration(rates.seconds), ["Messages", "Rate", "In all"], [
        ["received from apps", rate(rates.received), String(r.totals.received)],
        ["published to apps", rate(rates.published), String(r.totals.published)],
        ["reached no subscriber", rate(rates.unrouted), String(r.totals.unrouted)],
        ["dropped", rate(rates.dropped), String(r.totals.dropped)]
      ].concat(Object.keys(rates.dropped_by_reason).map(function (k) {
        return ["dropped: " + k, rate(rates.dropped_by_reason[k]), ""];
      }))],
      ["Subscriptions", subs.listed + " of " + subs.total + " shown",
       ["Plugin", "Generation", "Topics", "P2P topic", "Peer", "Age", "Last heartbeat", "Ready",
        "Snapshot", "Buffered frames", "Buffered bytes"],
       subs.items.map(function (s) {
         return [s.app, s.generation, s.topics.join(", "), s.p2p, s.peer, duration(s.age_seconds),
                 s.last_heartbeat_seconds_ago === null ? "never" :
                   duration(s.last_heartbeat_seconds_ago) + " ago",
                 yes(s.ready), yes(s.snapshot), String(s.buffered_frames), String(s.buffered_bytes)];
       })]
    ];
  }
  function element(tag, text) {
    var e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function section(s) {
    var nodes = [element("h2", s[0])];
    if (s[1]) { var note = element("p", s[1]); note.className = "note"; nodes.push(note); }
    var table = element("table");
    table.id = s[0].toLowerCase();
    if (s[2]) {
      var head = table.createTHead().insertRow();
      s[2].forEach(function (h) { head.appendChild(element("th", h)); });
    }
    var body = table.createTBody();
    s[3].forEach(function (row) {
      var tr = body.insertRow();
      row.forEach(function (cell, i) { tr.appendChild(element(!s[2] && i === 0 ? "th" : "td", cell)); });
    });
    nodes.push(table);
    return nodes;
  }
  function render(r) {
    var main = document.getElementById("status"), nodes = [];
    view(r).forEach(function (s) { nodes = nodes.concat(section(s)); });
    main.replaceChildren.apply(main, nodes);
    document.title = "txthreatbus " + r.version + " status";
    document.getElementById("title").textContent = "txthreatbus " + r.version;
  }
  function refresh() {
    fetch("status.json", {cache: "no-store"}).then(function (response) {
      if (!response.ok) throw new Error("HTTP " + response.status);
      return response.json();
    }).then(function (r) {
      render(r);
      refreshes += 1;
      updated.dataset.refreshes = String(refreshes);
      updated.textContent = "Updated " + new Date().toLocaleTimeString() + ", every " + (REFRESH / 1000) + " s";
    }).catch(function (error) {
      updated.textContent = "Could not refresh: " + error.message;
    }).then(function () { setTimeout(refresh, REFRESH); });
  }
  setTimeout(refresh, REFRESH);
})();
""" % {"refresh": REFRESH_SECONDS}


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: Only the page's own script and style, and requests to where it came from.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def render_page(report: dict) -> str:
    """The HTML page for ``report``, every value escaped."""
    version = escape(report["version"])
    sections = "\n".join(_html_section(*section) for section in view(report))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width">
<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS * 5}"></noscript>
<title>txthreatbus {version} status</title>
<style>{STYLE}</style>
</head>
<body>
<h1 id="title">txthreatbus {version}</h1>
<p id="updated" data-refreshes="0">As the page was loaded; refreshed every {REFRESH_SECONDS} s</p>
<main id="status">
{sections}
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""


def to_json(report: dict) -> bytes:
    """``report`` as JSON, with ``<``, ``>`` and ``&`` as escapes: inert even if sniffed as HTML."""
    text = json.dumps(report, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("ascii")


def _no_cache(request, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")


class StatusJSON(Resource):
    """``/status.json``: ``Status.report()``."""

    isLeaf = True

    def __init__(self, status: Status):
        super().__init__()
        self._status = status

    def render_GET(self, request):
        _no_cache(request, b"application/json")
        return to_json(self._status.report())


class StatusPage(Resource):
    """``/``: the status page."""

    isLeaf = True

    def __init__(self, status: Status):
        super().__init__()
        self._status = status

    def render_GET(self, request):
        _no_cache(request, b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
        return render_page(self._status.report()).encode("utf-8")
