"""The composition root: builds the mesh and one learning task per ``[[task]]`` from the config, runs their
long-lived loops in one TaskGroup, and handles SIGTERM/SIGINT (graceful stop), SIGHUP and config-file
changes (reload: tasks added, removed, changed or restarted without stopping the others) and sd_notify.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

import meshd
from meshd import config as configmod
from meshd import logs
from meshd.config import DEFAULT_TASK, Config, TaskConfig
from meshd.core.stats import GossipStats, LoopLag
from meshd.errors import ConfigError, DataError, MeshdError, StoreError
from meshd.identity import Identity
from meshd.mesh.node import Mesh
from meshd.ops import runfile
from meshd.ops.sdnotify import Notifier
from meshd.ops.status import StatusServer
from meshd.task.learner import limit_torch_threads
from meshd.task.runtime import LearningTask

log = structlog.get_logger("meshd.daemon")
LOOP_LAG_TICK_S = 0.1  # the loop-lag probe sleeps this long; how much later it wakes is the lag


class Daemon:
    """Owns every subsystem and task of one running meshd; `run()` returns when it has stopped."""

    def __init__(self, cfg: Config, identity: Identity, *, notifier: Notifier | None = None) -> None:
        assert cfg.source is not None, "a daemon's config comes from a file"
        self.cfg = cfg
        self.identity = identity
        self.notifier = notifier or Notifier()
        self.stats = GossipStats()
        self.loop_lag = LoopLag()
        self.state = "starting"
        self._started_mono = time.monotonic()
        self._loaded_at = _now_iso()
        self._last_reload_ok = True
        self._last_reload_error: str | None = None
        self._pending_restart: list[str] = []
        self._started_cfg = cfg  # what restart-only keys are running with, whatever reloads came since
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._config_sig = _config_signature(cfg)
        self.status_server: StatusServer | None = None
        self._runfile: Path | None = None  # written once the status API listens (meshd.ops.runfile)
        self.mesh: Mesh | None = None
        self.tasks: dict[str, LearningTask] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    async def run(self) -> int:
        guard = _blocking_guard()
        try:
            return await self._run_with_signals()
        finally:
            if guard is not None:
                guard.deactivate()

    async def _run_with_signals(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.notifier.close()

    async def _run(self) -> int:
        await asyncio.to_thread(_ensure_private_dir, self.cfg.node.state_dir)
        # Process-wide; each task's worker threads re-apply their own training.threads (engine).
        limit_torch_threads(min(t.training.threads for t in self.cfg.tasks))
        self.mesh = Mesh(self.cfg, self.identity, self.stats)
        await self.mesh.open()
        for tcfg in self.cfg.tasks:
            await self._open_task(tcfg)
        failed = [t for t in self.tasks.values() if t.state == "failed"]
        if failed and len(failed) == len(self.tasks):
            # Nothing could start: fail loudly, as a single-model daemon with a bad data product always did.
            await self._close()
            raise DataError("; ".join(f"task {t.name!r}: {t.error}" for t in failed))
        host, port = configmod.split_host_port(self.cfg.listen.status)
        self.status_server = StatusServer(host, port, self.snapshot, self.reload, self.model_file)
        try:
            await self.mesh.start_listening()
            await self.status_server.start()
        except OSError as exc:
            await self._close()
            raise MeshdError(f"cannot listen: {exc.strerror or exc} (check listen.peer / listen.status)") from exc
        await self._write_runfile(f"{host}:{self.status_server.port}")
        log.info(
            "daemon_started",
            domain=self.cfg.node.domain,
            peer_id=self.identity.peer_id,
            peer_listen=f"{self.mesh.listen_host}:{self.mesh.listen_port}",
            status_listen=f"{host}:{self.status_server.port}",
            version=meshd.__version__,
            tasks=sorted(self.tasks),
        )
        self.state = "running"
        self.notifier.ready(f"serving {self.cfg.node.domain}")
        exit_code = 0
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                loops: dict[str, Coroutine[Any, Any, None]] = {
                    "reload": self._reload_loop(),
                    "watch_config": self._watch_config_loop(),
                    "watchdog": self.notifier.watchdog_loop(),
                    "loop_lag": self._loop_lag_loop(),
                    **self.mesh.loops(),
                }
                tasks = [tg.create_task(coro, name=name) for name, coro in loops.items()]
                for task in list(self.tasks.values()):
                    self._start_task(task)
                await self._stop.wait()
                self.state = "stopping"
                self.notifier.stopping()
                log.info("daemon_stopping")
                for runner in [*tasks, *self._runners.values()]:
                    runner.cancel()
        except* MeshdError as eg:
            for err in eg.exceptions:
                log.error("daemon_failed", error=str(err))
            exit_code = 1
        finally:
            self.state = "stopping"
            self._tg = None
            saved = await self._close()
        if not saved and exit_code == 0:
            log.error("daemon_stop_incomplete", detail="a final checkpoint could not be written (see "
                      "final_checkpoint_failed); those tasks resume from their previous checkpoint")
            exit_code = 1
        log.info("daemon_stopped", exit_code=exit_code)
        return exit_code

    async def _close(self) -> bool:
        """Leave the mesh (no merge lands after this), write every task's final checkpoint, close the mesh.
        Returns False when some task's final checkpoint could not be written."""
        if self.mesh is not None:
            with contextlib.suppress(Exception):
                await self.mesh.leave()
        saved = True
        for task in list(self.tasks.values()):
            saved = await task.close() and saved
        with contextlib.suppress(Exception):
            if self.mesh is not None:
                await self.mesh.close()
        if self.status_server is not None:
            await self.status_server.stop()
        if self._runfile is not None:
            await asyncio.to_thread(runfile.remove, self._runfile, os.getpid())
        return saved

    async def _write_runfile(self, status_addr: str) -> None:
        """Say where the status API listens, for `meshd status` run by users who cannot read the config."""
        assert self.cfg.source is not None
        path = runfile.daemon_path(self.cfg.node.state_dir)
        try:
            await asyncio.to_thread(runfile.write, path, status=status_addr, config=self.cfg.source,
                                    domain=self.cfg.node.domain, pid=os.getpid())
        except StoreError as exc:  # `meshd status --config` still works for whoever can read the config
            log.warning("runtime_file_failed", path=str(path), error=str(exc))
            return
        self._runfile = path

    # --- tasks -------------------------------------------------------------------------------------------

    async def _open_task(self, tcfg: TaskConfig) -> LearningTask:
        """Build and open a task (data product, model, checkpoint); a failure is the task's, not the daemon's."""
        assert self.mesh is not None
        task = LearningTask(tcfg, self.mesh, state_dir=self.cfg.node.state_dir,
                            max_param_abs=self.cfg.limits.max_param_abs)
        self.tasks[tcfg.name] = task
        try:
            await task.open()
        except (MeshdError, OSError, ValueError) as exc:  # DataError, ModelError... are MeshdErrors
            task.fail(exc)
        return task

    def _start_task(self, task: LearningTask) -> None:
        """Route the task's envelopes to it and run its loops in the daemon's TaskGroup."""
        assert self.mesh is not None and self._tg is not None
        if task.state == "failed":
            return
        self.mesh.attach(task)
        self._runners[task.name] = self._tg.create_task(task.run(), name=f"task:{task.name}")

    async def _stop_task(self, name: str, why: str) -> None:
        """Stop one task: no more envelopes routed to it, loops cancelled, final checkpoint written."""
        assert self.mesh is not None
        self.mesh.detach(name)
        runner = self._runners.pop(name, None)
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        task = self.tasks.pop(name, None)
        if task is not None:
            await task.close()
        log.info("task_stopped", task=name, reason=why)

    async def _apply_tasks(self, old: Config, new: Config) -> None:
        """Reload: start added tasks, stop removed ones, restart those whose model or data changed (and failed
        ones), apply the other changes in place. Tasks that did not change are never interrupted."""
        before = {t.name: t for t in old.tasks}
        after = {t.name: t for t in new.tasks}
        for name in [n for n in before if n not in after]:
            await self._stop_task(name, "removed from config")
        for name, tcfg in after.items():
            task = self.tasks.get(name)
            restart = configmod.task_needs_restart(before[name], tcfg) if name in before else []
            if task is not None and (restart or task.state == "failed"):
                await self._stop_task(name, "restart: " + (", ".join(restart) or "it had failed"))
                task = None
            if task is None:
                started = await self._open_task(tcfg)
                if self._tg is not None:
                    self._start_task(started)
                log.info("task_added" if name not in before else "task_restarted", task=name, state=started.state)
            elif before.get(name) != tcfg:
                task.apply(tcfg)

    # --- reload ------------------------------------------------------------------------------------------

    async def _loop_lag_loop(self) -> None:
        """Measures how late the loop wakes from a short sleep: the time it spent on something else."""
        while True:
            started = time.monotonic()
            await asyncio.sleep(LOOP_LAG_TICK_S)
            now = time.monotonic()
            self.loop_lag.observe(now, max(0.0, now - started - LOOP_LAG_TICK_S))

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload()

    async def _watch_config_loop(self) -> None:
        """Reload when the config or the trust registry changes on disk (content hashes, so editors'
        atomic saves are seen)."""
        while True:
            await asyncio.sleep(1.0)
            sig = await asyncio.to_thread(_config_signature, self.cfg)
            if sig != self._config_sig:
                self._config_sig = sig
                log.info("config_changed_on_disk", path=str(self.cfg.source))
                self.request_reload()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply it (SIGHUP, the file watcher, `meshd reload`). Returns the outcome:
        ``ok``, and the ``problems`` that refused it or the keys ``changed`` and still ``pending_restart``."""
        async with self._reload_lock:
            return await self._reload_locked()

    async def _reload_locked(self) -> dict[str, Any]:
        assert self.cfg.source is not None
        self.notifier.reloading()
        path = self.cfg.source
        try:
            self._config_sig = await asyncio.to_thread(_config_signature, self.cfg)
            new = await asyncio.to_thread(configmod.load, path)
        except ConfigError as exc:
            self._last_reload_ok = False
            self._last_reload_error = "; ".join(exc.problems)
            log.error("config_reload_rejected", path=str(path), problems=exc.problems)
            self.notifier.ready("reload rejected; running on the previous config")
            return {"ok": False, "path": str(path), "problems": list(exc.problems)}
        self._pending_restart = configmod.pending_restart(self._started_cfg, new)
        changed = configmod.diff(self.cfg, new)
        logs.set_level(new.log.level)
        try:
            if self.mesh is not None:
                await self.mesh.apply_config(new)
            await self._apply_tasks(self.cfg, new)
        except MeshdError as exc:
            self._last_reload_ok = False
            self._last_reload_error = str(exc)
            log.error("config_reload_failed", error=str(exc))
            self.notifier.ready()
            return {"ok": False, "path": str(path), "problems": [str(exc)]}
        self.cfg = new
        self._config_sig = await asyncio.to_thread(_config_signature, new)
        self._loaded_at = _now_iso()
        self._last_reload_ok = True
        self._last_reload_error = None
        log.info("config_reloaded", changed=changed, pending_restart=self._pending_restart)
        self.notifier.ready()
        failed = sorted(n for n, task in self.tasks.items() if task.state == "failed")
        return {"ok": True, "path": str(path), "changed": changed, "pending_restart": self._pending_restart,
                "tasks": {n: task.state for n, task in sorted(self.tasks.items())}, "failed_tasks": failed}

    # --- status ------------------------------------------------------------------------------------------

    def _health(self, mesh: dict[str, Any], tasks: dict[str, Any]) -> dict[str, Any]:
        """Ready, or the problems an operator (`meshd status` exits 1) or a probe (`/readyz` 503) must know of."""
        problems: list[str] = []
        if self.state != "running":
            problems.append(f"daemon is {self.state}")
        if not self._last_reload_ok:
            problems.append(f"last config reload failed: {self._last_reload_error}")
        for name, ts in tasks.items():
            if ts["state"] == "failed":
                problems.append(f"task {name} failed: {ts['error']}")
        alive = mesh.get("counts", {}).get("alive", 0)
        if mesh.get("enabled") and mesh.get("trusted", 0) > 0 and alive == 0:
            problems.append(f"mesh enabled with {mesh.get('trusted')} trusted peers, none alive")
        return {"ready": not problems, "problems": problems}

    def _listen_status(self) -> dict[str, Any]:
        host, _ = configmod.split_host_port(self._started_cfg.listen.status)
        bound = f"{host}:{self.status_server.port}" if self.status_server is not None else None
        return {"status": bound, "status_file": str(self._runfile) if self._runfile else None}

    async def model_file(self, task: str | None) -> tuple[int, bytes | str]:
        """``GET /v1/model``: (200, the task's served model as safetensors) or (an HTTP status, the reason)."""
        names = sorted(self.tasks)
        if task is None and len(names) != 1:
            return 400, f"this domain runs {len(names)} tasks ({', '.join(names)}); ask for one with ?task=NAME"
        chosen = self.tasks.get(task if task is not None else names[0])
        if chosen is None:
            return 404, f"no task named {task!r}; this domain's tasks: {', '.join(names)}"
        body = await chosen.model_file()
        if body is None:
            return 409, f"task {chosen.name!r} has no model yet (state {chosen.state})"
        return 200, body

    def snapshot(self) -> dict[str, Any]:
        mesh = self.mesh.snapshot() if self.mesh is not None else {}
        tasks = {name: task.snapshot() for name, task in sorted(self.tasks.items())}
        # A single-model config's status reads as it always did: its one task's model, training and gossip.
        primary = tasks.get(DEFAULT_TASK) or (next(iter(tasks.values())) if len(tasks) == 1 else {})
        totals = {k: sum(int(ts["gossip"].get(k, 0)) for ts in tasks.values()) for k in ("rounds", "merged", "pulls")}
        primary_gossip = {k: v for k, v in primary.get("gossip", {}).items() if k not in totals and k != "rejected"}
        gossip = {**self.stats.snapshot(), **totals, **primary_gossip}
        mesh_part = mesh.get("mesh", {"joined": False, "peers": [], "counts": {}, "untrusted_seen": [],
                                       "untrusted_senders": []})
        mesh_part["joined"] = bool(mesh_part.get("enabled")) and all(ts["joined"] for ts in tasks.values())
        return {
            "health": self._health(mesh_part, tasks),
            "domain": self.cfg.node.domain,
            "peer_id": self.identity.peer_id,
            "version": meshd.__version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "state": self.state,
            "config": {
                "path": str(self.cfg.source),
                "loaded_at": self._loaded_at,
                "last_reload_ok": self._last_reload_ok,
                "last_reload_error": self._last_reload_error,
                "pending_restart": self._pending_restart,
            },
            "listen": {**mesh.get("listen", {"peer": self.cfg.listen.peer}), **self._listen_status()},
            "loop": self.loop_lag.snapshot(time.monotonic()),
            "mesh": mesh_part,
            "tasks": tasks,
            "model": primary.get("model", {}),
            "training": primary.get("training", {}),
            "gossip": gossip,
            "checkpoint": primary.get("checkpoint", {}),
            "data": primary.get("data", {}),
        }


def _blocking_guard() -> Any:
    """With MESHD_BLOCKBUSTER=1 (the test suite sets it), any blocking call made on the event loop
    raises, so a torch step, a file write or a sync socket call that slipped onto the loop fails loudly."""
    if os.environ.get("MESHD_BLOCKBUSTER") != "1":
        return None
    from blockbuster import BlockBuster

    bb = BlockBuster()
    # Log lines are small line-buffered writes to stdout/journald: the one blocking write we accept.
    for name in ("io.TextIOWrapper.write", "io.BufferedWriter.write", "os.write"):
        bb.functions[name].can_block_in("structlog/_output.py", {"msg", "__call__"})
    bb.activate()
    log.info("blocking_guard_active")
    return bb


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _config_signature(cfg: Config) -> tuple[str | None, str | None]:
    assert cfg.source is not None
    registry = _file_signature(cfg.trust.registry) if cfg.trust.registry is not None else None
    return _file_signature(cfg.source), registry


def _file_signature(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
