"""The local status API: `/healthz`, `/readyz`, `/status` (JSON) and `/metrics` (Prometheus), on the status listener,
`POST /v1/reload` (what `meshd reload` and the unit's ExecReload call) and `GET /v1/model` (the served model as
safetensors), answered from loopback only.

Everything is derived from one snapshot function, so `/status` and `/metrics` can never disagree; `/metrics`
adds the process and platform collectors of prometheus_client (`process_*`, `python_*`). Field by field
documentation: docs/status.md.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import ipaddress
import platform
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

import meshd
from meshd.core.stats import REJECT_REASONS
from meshd.core.wire import PROTOCOL_VERSION

Snapshot = Callable[[], dict[str, Any]]
Reload = Callable[[], Awaitable[dict[str, Any]]]
ModelFile = Callable[[str | None], Awaitable[tuple[int, bytes | str]]]
PEER_STATES = ("alive", "suspect", "dead", "left", "unknown")
MAX_PEER_SERIES = 64  # per-peer series (label peer_id) for at most this many peers: the most recently seen


class StatusServer:
    def __init__(self, host: str, port: int, snapshot: Snapshot, reload: Reload | None = None,
                 model: ModelFile | None = None) -> None:
        self._host, self._port = host, port
        self._snapshot = snapshot
        self._reload = reload
        self._model = model
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        return self._site.port if self._site else self._port

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        if self._reload is not None:
            app.router.add_post("/v1/reload", self._reload_handler)
        if self._model is not None:
            app.router.add_get("/v1/model", self._model_handler)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._host, self._port, shutdown_timeout=1.0, reuse_address=True)
        await self._site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the loop turns; stopping is reported so a balancer can drain.
        state = self._snapshot().get("state")
        if state == "stopping":
            return web.Response(status=503, text="stopping\n")
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        """200 when the domain does its job; 503 with the problems when it is degraded (for probes)."""
        health = self._snapshot().get("health", {"ready": False, "problems": ["no health information"]})
        return web.json_response(health, status=200 if health.get("ready") else 503, dumps=_dumps)

    async def _reload_handler(self, request: web.Request) -> web.Response:
        """Reload the config now; 200 with the outcome when applied, 422 with the problems when refused."""
        if not _loopback(request) or self._reload is None:  # listen.allow_public_status exposes /status, never reload
            return web.json_response({"ok": False, "problems": ["reload is only served on loopback"]}, status=403)
        outcome = await self._reload()
        return web.json_response(outcome, status=200 if outcome.get("ok") else 422, dumps=_dumps)

    async def _model_handler(self, request: web.Request) -> web.Response:
        """The served model now (safetensors, as ``meshd export --out x.safetensors`` writes), loopback only:
        a model is derived from the domain's data, so ``listen.allow_public_status`` never exposes it."""
        if not _loopback(request) or self._model is None:
            return web.json_response({"error": "the model is only served on loopback"}, status=403)
        status, body = await self._model(request.query.get("task"))
        if isinstance(body, str):
            return web.json_response({"error": body}, status=status)
        return web.Response(body=body, status=status, content_type="application/octet-stream")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._snapshot(), dumps=_dumps)

    async def _metrics(self, request: web.Request) -> web.Response:
        # The snapshot is taken on the loop (it reads the daemon's state); the process collector reads
        # /proc/self files, so the text is rendered in a worker thread.
        body = await asyncio.to_thread(render_metrics, self._snapshot())
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def render_metrics(snapshot: dict[str, Any]) -> bytes:
    """The /metrics text of one status snapshot, with the process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: snapshot))
    # prometheus_client's own instances (they sit in its default registry, which meshd never serves).
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return generate_latest(registry)


@functools.cache
def _build_labels() -> tuple[str, str, str, str]:
    """meshd_build_info's labels: meshd version, wire protocol version, Python, torch (without importing it)."""
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "none"
    return meshd.__version__, str(PROTOCOL_VERSION), platform.python_version(), torch


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, default=str)


class _Collector(Collector):
    """Prometheus metrics computed from the status snapshot at scrape time."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self._snapshot()
        g = s.get("gossip", {})
        c = s.get("config", {})

        def gauge(name: str, doc: str, value: Any) -> Iterator[Any]:
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield GaugeMetricFamily(name, doc, value=float(value))
            elif isinstance(value, bool):
                yield GaugeMetricFamily(name, doc, value=1.0 if value else 0.0)

        def counter(name: str, doc: str, value: Any) -> Iterator[Any]:
            yield CounterMetricFamily(name, doc, value=float(value or 0))

        yield from gauge("meshd_up", "1 while the daemon runs", 1)
        build = GaugeMetricFamily("meshd_build_info", "Always 1; the labels say which meshd runs",
                                  labels=["version", "protocol", "python", "torch"])
        build.add_metric(list(_build_labels()), 1.0)
        yield build
        yield from gauge("meshd_ready", "1 when the domain does its job (/readyz 200), 0 when degraded",
                         bool(s.get("health", {}).get("ready")))
        yield from gauge("meshd_uptime_seconds", "Seconds since the daemon started", s.get("uptime_s", 0))
        lag = s.get("loop", {})
        yield from gauge("meshd_loop_lag_seconds", "How late the event loop ran its last 0.1 s timer",
                         lag.get("lag_s", 0.0))
        yield from gauge("meshd_loop_lag_max_seconds", "Largest event loop lag over the last 60 s",
                         lag.get("max_lag_s", 0.0))
        joined = s.get("mesh", {}).get("joined")
        yield from gauge("meshd_mesh_joined", "1 when this domain takes part in the mesh", joined)
        yield from counter("meshd_messages_sent", "Envelopes sent and answered", g.get("sent"))
        yield from counter("meshd_messages_received", "Envelopes accepted", g.get("received"))
        yield from counter("meshd_bytes_sent", "Envelope bytes sent", g.get("bytes_sent"))
        yield from counter("meshd_bytes_received", "Envelope bytes accepted", g.get("bytes_received"))
        yield from counter("meshd_send_failures", "Sends that got no answer after retries", g.get("send_failures"))
        rejected = CounterMetricFamily(
            "meshd_messages_rejected", "Incoming messages rejected, by reason", labels=["reason"]
        )
        seen = g.get("rejected", {})
        for reason in sorted({*REJECT_REASONS, *seen}):  # every documented reason from the start
            rejected.add_metric([reason], float(seen.get(reason, 0)))
        yield rejected
        latency = HistogramMetricFamily("meshd_exchange_seconds", "Seconds from sending a request to its "
                                        "answer (retries included), by envelope kind", labels=["kind"])
        for kind, h in sorted(g.get("exchange_latency", {}).items()):
            latency.add_metric([kind], list(h["buckets"].items()), sum_value=h["sum_s"])
        yield latency
        peers = GaugeMetricFamily("meshd_peers", "Known trusted peers, by state", labels=["state"])
        counts = s.get("mesh", {}).get("counts", {})
        for state in PEER_STATES:
            peers.add_metric([state], float(counts.get(state, 0)))
        yield peers
        yield from gauge("meshd_trusted_peers", "Size of the trust list (config and registry)",
                         s.get("mesh", {}).get("trusted", 0))
        yield from _peer_metrics(s.get("mesh", {}).get("peers", []))
        yield from _task_metrics(s.get("tasks", {}))
        yield from gauge("meshd_config_last_reload_ok", "1 if the last config reload succeeded",
                         c.get("last_reload_ok"))


# The scores of a task (docs/status.md, training): accuracy for classification and binary tasks, ROC AUC and F1
# for binary ones, RMSE and MAE for regression; each for the served model and the local-only baseline, on the
# holdout and on data.test_path. A task has samples only in its kind's series.
_SCORES = {"accuracy": "Accuracy", "roc_auc": "ROC AUC (binary tasks)", "f1": "F1 at probability 0.5 (binary tasks)",
           "rmse": "RMSE (regression tasks)", "mae": "MAE (regression tasks)"}
_SCOPES = {"holdout": "of the mesh model on this domain's holdout",
           "local_only": "on the same holdout of a model trained on local data alone",
           "test": "of the mesh model on data.test_path",
           "local_only_test": "of the local-only model on data.test_path"}
# Per-task series: (metric, help, section of the task's status, key, counter?)
_TASK_SERIES = [
    ("meshd_gossip_rounds", "Gossip rounds run", "gossip", "rounds", True),
    ("meshd_merges", "Model shares merged", "gossip", "merged", True),
    ("meshd_pulls_answered", "Pulls of this task's model answered", "gossip", "pulls", True),
    ("meshd_gossip_weight", "Push-sum weight of this domain", "gossip", "weight", False),
    ("meshd_consensus_distance", "Mean relative L2 distance to models received", "gossip", "consensus_distance", False),
    ("meshd_model_version", "Model version", "model", "version", False),
    ("meshd_model_parameters", "Model parameter count", "model", "parameters", False),
    ("meshd_training_steps", "Local SGD steps", "training", "steps", True),
    ("meshd_training_samples", "Samples seen by local training", "training", "samples_seen", True),
    ("meshd_training_loss", "Latest training loss", "training", "loss", False),
    *(  # meshd_holdout_accuracy ... meshd_local_only_test_mae: the task kind's scores (engine.SCOPES x metrics)
        (f"meshd_{scope}_{metric}", f"{metric_doc} {scope_doc}", "training", f"{scope}_{metric}", False)
        for metric, metric_doc in _SCORES.items() for scope, scope_doc in _SCOPES.items()
    ),
    ("meshd_training_epochs", "Passes over this domain's data", "training", "epochs", False),
    ("meshd_checkpoint_failures", "Checkpoint writes that failed (disk full, I/O error)", "checkpoint", "failures",
     True),
    ("meshd_checkpoint_version", "Model version of the last checkpoint written", "checkpoint", "last_version",
     False),
    ("meshd_privacy_epsilon_spent", "Epsilon spent by DP-SGD (the ledger)", "privacy", "epsilon_spent", False),
    ("meshd_privacy_epsilon_budget", "Epsilon budget (privacy.epsilon)", "privacy", "epsilon_budget", False),
    ("meshd_privacy_epsilon_remaining", "Epsilon budget left", "privacy", "epsilon_remaining", False),
    ("meshd_privacy_delta", "Delta of the privacy budget", "privacy", "delta", False),
    ("meshd_privacy_exhausted", "1 when training stopped at the privacy budget", "privacy", "exhausted", False),
]


def _task_metrics(tasks: dict[str, Any]) -> Iterator[Any]:
    """One family per series, one sample per task (label ``task``); ``meshd_task_up`` is 1 while it runs."""
    up = GaugeMetricFamily("meshd_task_up", "1 while the learning task runs (0: starting, failed or stopped)",
                           labels=["task", "state"])
    for name, ts in sorted(tasks.items()):
        up.add_metric([name, str(ts.get("state"))], 1.0 if ts.get("state") == "running" else 0.0)
    yield up
    kind = GaugeMetricFamily("meshd_task_kind", "1 for the kind of a task (model.task) and its headline metric",
                             labels=["task", "kind", "metric"])
    for name, ts in sorted(tasks.items()):
        tr = ts.get("training") or {}
        if tr.get("task"):
            kind.add_metric([name, str(tr["task"]), str(tr.get("metric"))], 1.0)
    yield kind
    acc = GaugeMetricFamily("meshd_privacy_accountant", "1 for the accountant of a task's privacy ledger",
                            labels=["task", "accountant"])
    for name, ts in sorted(tasks.items()):
        if ts.get("privacy", {}).get("accountant"):
            acc.add_metric([name, str(ts["privacy"]["accountant"])], 1.0)
    yield acc
    for metric, doc, section, key, is_counter in _TASK_SERIES:
        family_cls = CounterMetricFamily if is_counter else GaugeMetricFamily
        fam = family_cls(metric, doc, labels=["task"])
        for name, ts in sorted(tasks.items()):
            v = ts.get(section, {}).get(key)
            if is_counter:
                fam.add_metric([name], float(v or 0))
            elif isinstance(v, int | float):  # a bool (privacy.exhausted) is 0 or 1
                fam.add_metric([name], float(v))
        yield fam
    # The merge rule's accounting (gossip.merge in /status): one series per task, whatever the rule.
    clipped = CounterMetricFamily("meshd_shares_clipped", "Shares merged clipped by the merge rule", labels=["task"])
    quarantined = GaugeMetricFamily("meshd_peers_quarantined", "Peers whose shares this task refuses for now",
                                    labels=["task"])
    quarantines = CounterMetricFamily("meshd_quarantines", "Quarantines this task started", labels=["task"])
    for name, ts in sorted(tasks.items()):
        merge = (ts.get("gossip") or {}).get("merge") or {}
        clipped.add_metric([name], float(merge.get("clipped") or 0))
        quarantined.add_metric([name], float(merge.get("quarantined") or 0))
        quarantines.add_metric([name], float(merge.get("quarantines") or 0))
    yield from (clipped, quarantined, quarantines)


def _peer_metrics(peers: list[dict[str, Any]]) -> Iterator[Any]:
    """Per trusted peer (labels ``domain``, ``peer_id``), for the :data:`MAX_PEER_SERIES` most recently seen:
    seconds since it was last heard from, and its smoothed exchange round-trip time."""
    heard = [p for p in peers if isinstance(p.get("last_seen_s"), int | float)]
    heard.sort(key=lambda p: float(p["last_seen_s"]))
    age = GaugeMetricFamily("meshd_peer_last_seen_seconds", "Seconds since the last valid message or answer "
                            "from this peer", labels=["domain", "peer_id"])
    rtt = GaugeMetricFamily("meshd_peer_rtt_seconds", "Smoothed seconds from sending a request to this peer "
                            "to its answer", labels=["domain", "peer_id"])
    for p in heard[:MAX_PEER_SERIES]:
        labels = [str(p.get("domain") or ""), str(p.get("peer_id"))]
        age.add_metric(labels, float(p["last_seen_s"]))
        if isinstance(p.get("rtt_s"), int | float):
            rtt.add_metric(labels, float(p["rtt_s"]))
    yield age
    yield rtt
