"""Command line: `meshd init | keygen | id | config check | data describe | run | status | peers | reload | trust |
doctor | export | demo`.

Exit codes: 0 ok, 1 runtime failure (daemon unreachable, daemon crashed), 2 bad input (config, key, usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from meshd import __version__
from meshd import config as configmod
from meshd import identity as identitymod
from meshd.errors import ConfigError, DataError, IdentityError, MeshdError, ModelError
from meshd.ops import runfile

DEFAULT_CONFIG = Path("/etc/meshd/meshd.toml")
DEFAULT_STATUS = "127.0.0.1:7453"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshd",
        description="meshd: domains of a data mesh train one model together by gossip; raw data never leaves.",
    )
    p.add_argument("--version", action="version", version=f"meshd {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    s = sub.add_parser("init", help="write a config and an identity key for a new domain")
    s.add_argument("--domain", required=True, help="this domain's name (a-z, 0-9, '-', '_')")
    s.add_argument("--dir", type=Path, default=Path("."), help="folder for meshd.toml and identity.key (default: .)")
    s.add_argument("--peer-addr", default="0.0.0.0:7452", help="HOST:PORT of the gossip listener")
    s.add_argument("--status-addr", default=DEFAULT_STATUS, help="HOST:PORT of the local status API")
    s.add_argument("--data", default="",
                   help="path of the domain's data product (Parquet file or folder, Arrow/Feather, CSV or .npz)")
    s.add_argument("--state-dir", default="state",
                   help="state directory (checkpoints, replay state); relative to --dir (default: state)")
    s.add_argument("--force", action="store_true", help="overwrite an existing config and key")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("keygen", help="create an identity key file (mode 0600)")
    s.add_argument("--out", type=Path, required=True, help="where to write the key")
    s.add_argument("--force", action="store_true", help="overwrite an existing key")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("id", help="print the peer id (public key) of a key file")
    s.add_argument("--key", type=Path, required=True, help="identity key file")
    s.set_defaults(func=cmd_id)

    s = sub.add_parser("config", help="config tools")
    csub = s.add_subparsers(title="config commands", metavar="ACTION")
    c = csub.add_parser("check", help="validate a config file: prints ok, or every problem (exit 2)")
    c.add_argument("path", type=Path)
    c.set_defaults(func=cmd_config_check)

    s = sub.add_parser("data", help="data product tools")
    dsub = s.add_subparsers(title="data commands", metavar="ACTION")
    d = dsub.add_parser("describe", help="infer a data product's typed schema and print it as TOML to paste into "
                                         "[data] (Parquet file or folder, Arrow/Feather, CSV)")
    d.add_argument("path", type=Path, help="the data product: a table file or a folder of Parquet files")
    d.add_argument("--label", default="label", help="the label column (default: label)")
    d.set_defaults(func=cmd_data_describe)

    s = sub.add_parser("run", help="run the daemon in the foreground")
    s.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    s.set_defaults(func=cmd_run)

    for name, helptext in (("status", "show the local daemon's status"), ("peers", "show the peer table")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--url", help=f"status API base URL (default: from --config, else http://{DEFAULT_STATUS})")
        s.add_argument("--config", type=Path, help="config file to take the status address from")
        s.add_argument("--json", action="store_true", help="print the raw JSON")
        if name == "status":
            s.add_argument("--peers", action="store_true", help="also print the peer table")
        s.set_defaults(func=cmd_status if name == "status" else cmd_peers)

    s = sub.add_parser("reload", help="ask the running daemon to reload its config; exit 1 with the problems "
                                      "when it refuses the new one (the unit's ExecReload)")
    s.add_argument("--url", help=f"status API base URL (default: from --config, else http://{DEFAULT_STATUS})")
    s.add_argument("--config", type=Path, help="config file to take the status address from")
    s.set_defaults(func=cmd_reload)

    s = sub.add_parser("trust", help="trust a peer, stop trusting one, or list them (edits the config safely)")
    tsub = s.add_subparsers(title="trust commands", metavar="ACTION")
    t = tsub.add_parser("add", help="trust a peer id as a domain (and dial it at an address); the daemon reloads")
    t.add_argument("--domain", required=True, help="the peer's domain name")
    t.add_argument("--peer-id", required=True, help="its peer id (64 hex characters, as printed by `meshd id`)")
    t.add_argument("--address", help="HOST:PORT of its peer listener, for peers mDNS cannot find")
    t.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    t.set_defaults(func=cmd_trust_add)
    t = tsub.add_parser("remove", help="stop trusting a peer (by --peer-id or --domain); the daemon reloads")
    who = t.add_mutually_exclusive_group(required=True)
    who.add_argument("--peer-id", help="the peer id to remove")
    who.add_argument("--domain", help="the domain whose key to remove")
    t.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    t.set_defaults(func=cmd_trust_remove)
    t = tsub.add_parser("list", help="the peers the config trusts, and where each is listed")
    t.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=cmd_trust_list)

    s = sub.add_parser("doctor", help="check what `config check` cannot: key, data, state dir, ports, duplicated "
                                      "domains, typo'd peer ids, the daemon and its peers (exit 1 on a problem)")
    s.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    s.add_argument("--url", help="status API base URL of the running daemon (default: from the config)")
    s.add_argument("--offline", action="store_true", help="only the checks that need no running daemon")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("export", help="write the current model (newest checkpoint): torch state_dict or safetensors")
    s.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    s.add_argument("--out", type=Path, required=True,
                   help="model.pt (a torch state_dict) or model.safetensors (tensors, input scaler, metadata)")
    s.add_argument("--task", default=None, help="the task whose model to write (needed when the domain runs several)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("demo", help="run several domains on loopback and compare mesh vs local-only accuracy")
    s.add_argument("--domains", type=int, default=8)
    s.add_argument("--dataset", choices=["digits", "mnist1d"], default="digits")
    s.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the label split")
    s.add_argument("--duration", type=float, default=40.0, help="seconds of gossip training")
    s.add_argument("--workdir", type=Path, default=None, help="work directory (default: a new temp dir)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-live", action="store_true", help="no live view (plain progress lines)")
    s.set_defaults(func=cmd_demo)
    return p


def _err(msg: str) -> None:
    print(f"meshd: error: {msg}", file=sys.stderr)


# --- init / keys ---------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from meshd.ops.config_template import render

    problems = []
    if configmod._domain(args.domain):
        problems.append(f"--domain: {configmod._domain(args.domain)} (got {args.domain!r})")
    for flag, value in (("--peer-addr", args.peer_addr), ("--status-addr", args.status_addr)):
        why = configmod._host_port(value)
        if why:
            problems.append(f"{flag}: {why} (got {value!r})")
    if problems:
        for line in problems:
            _err(line)
        return 2
    d: Path = args.dir
    cfg_path, key_path = d / "meshd.toml", d / "identity.key"
    for existing in (cfg_path, key_path):
        if existing.exists() and not args.force:
            _err(f"{existing} already exists; refusing to overwrite it (use --force to replace it)")
            return 2
    if not d.exists():
        d.mkdir(parents=True, mode=0o700)
        os.chmod(d, 0o700)
    ident = identitymod.generate()
    identitymod.save(ident, key_path, force=args.force)
    data_path = str(Path(args.data).resolve()) if args.data else ""  # as the operator typed it, from here
    text = render(args.domain, peer_addr=args.peer_addr, status_addr=args.status_addr, data_path=data_path,
                  state_dir=args.state_dir)
    tmp = cfg_path.with_name(cfg_path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o640)
    tmp.replace(cfg_path)
    try:
        configmod.load(cfg_path)
    except ConfigError as exc:  # the template and the schema disagree: a bug, say so loudly
        _err(f"generated config does not validate: {exc}")
        return 1
    print(f"wrote {cfg_path} and {key_path} (mode 0600)")
    print(f"domain:  {args.domain}")
    print(f"peer id: {ident.peer_id}")
    print("Share the peer id with the mesh's governance; trust each peer with `meshd trust add --domain NAME "
          "--peer-id ID [--address HOST:PORT]`.")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        ident = identitymod.generate()
        identitymod.save(ident, args.out, force=args.force)
    except IdentityError as exc:
        _err(str(exc))
        return 2
    print(ident.peer_id)
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    try:
        print(identitymod.load(args.key).peer_id)
    except IdentityError as exc:
        _err(str(exc))
        return 2
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        configmod.load(args.path)
    except ConfigError as exc:
        print(f"{args.path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    print("ok")
    return 0


def cmd_data_describe(args: argparse.Namespace) -> int:
    from meshd.task.schema import describe_data_product  # pyarrow only for this command

    try:
        text = describe_data_product(args.path, args.label)
    except DataError as exc:
        _err(str(exc))
        return 2
    sys.stdout.write(text)
    return 0


# --- run -------------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import structlog

    from meshd import logs

    # Until the config is read, errors go to stderr through the same logger as the daemon's (JSON lines with
    # a syslog priority under systemd, readable text on a terminal), so `journalctl -p err` shows them too.
    logs.configure("info", "auto", stream=sys.stderr)
    startup = structlog.get_logger("meshd.run")
    try:
        cfg = configmod.load(args.config.resolve())
    except ConfigError as exc:
        startup.error("startup_failed", reason="invalid config", config=str(args.config), problems=exc.problems)
        return 2
    try:
        ident = identitymod.load(cfg.node.identity)
    except IdentityError as exc:
        startup.error("startup_failed", reason="identity", error=str(exc))
        return 2
    logs.configure(cfg.log.level, cfg.log.format)
    from meshd.daemon import Daemon

    log = structlog.get_logger("meshd.run")
    code = 1
    try:
        code = _run_loop(Daemon(cfg, ident).run())
    except (ConfigError, DataError, ModelError) as exc:  # bad input found at start: data, model, registry
        log.error("startup_failed", reason="bad input", error=str(exc))
        code = 2
    except MeshdError as exc:
        log.error("startup_failed", reason="cannot start", error=str(exc))
        code = 1
    # Exit now. The daemon has written every final checkpoint and the replay state, and joined its own writer
    # threads; what may still run is a worker thread inside a torch step or another blocking call whose result
    # nobody wants. asyncio.run (and interpreter exit) would join it, and a stopped daemon could then hang on
    # for as long as that step takes on a loaded host: systemd would have to SIGKILL it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the daemon's coroutine on a new event loop, without joining the default executor afterwards."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)


# --- status ----------------------------------------------------------------------------------------------------


def _status_url(args: argparse.Namespace) -> str:
    """The status API to talk to: --url; else the address the daemon of that config is really serving (its
    runtime file, meshd.ops.runfile: works for a user who cannot read the config, and after `listen.status`
    was edited but not yet restarted); else `listen.status` of the config (as it stands, even if invalid)."""
    if args.url:
        return str(args.url).rstrip("/")
    path = args.config or (Path(os.environ["MESHD_CONFIG"]) if os.environ.get("MESHD_CONFIG") else None)
    explicit = path is not None
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    addr: str | None = DEFAULT_STATUS
    state_dir: Path | None = None
    unreadable: str | None = None
    if path is not None:
        try:
            cfg = configmod.load(path)
            addr, state_dir = cfg.listen.status, cfg.node.state_dir
        except ConfigError as exc:
            # An edit the daemon would refuse must not stop us from reaching it (to reload, or to see its
            # status): take listen.status from the TOML as it stands, if that one key is usable.
            addr = _raw_status_address(path)
            if addr is None and explicit:
                unreadable = f"cannot read the status address from {path} ({'; '.join(exc.problems)})"
    candidates = [_url(a) for a in _runfile_addresses(path, state_dir)]
    if addr is not None:
        candidates.append(_url(addr))
    elif not candidates and not explicit:  # the default config may be unreadable for this user
        candidates.append(_url(DEFAULT_STATUS))
    if not candidates:
        where = ", ".join(str(p) for p in runfile.client_paths(None))
        raise MeshdError(f"{unreadable}, and no daemon running it left its address in {where}: "
                         "is the daemon running? (or pass --url)")
    unique = list(dict.fromkeys(candidates))
    for url in unique[:-1]:
        if _answers(url):
            return url
    return unique[-1]  # the config's own address: what the 'is the daemon running?' message names


def _url(addr: str) -> str:
    host, port = configmod.split_host_port(addr)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"


def _runfile_addresses(path: Path | None, state_dir: Path | None) -> list[str]:
    """Status addresses from the runtime files of the daemon running `path` (any daemon when no config)."""
    want = str(path.resolve()) if path is not None else None
    out = []
    for f in runfile.client_paths(state_dir):
        doc = runfile.read(f)
        if doc is not None and (want is None or doc["config"] == want) and _raw_ok(doc["status"]):
            out.append(str(doc["status"]))
    return out


def _raw_ok(addr: str) -> bool:
    try:
        configmod.split_host_port(addr)
    except ValueError:
        return False
    return True


def _answers(url: str) -> bool:
    """Whether a status API answers at `url` (any HTTP status: 503 while stopping is an answer too)."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=3):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _raw_status_address(path: Path) -> str | None:
    """``listen.status`` of a config file that does not validate (None if absent, unreadable or malformed)."""
    import tomllib

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    listen = raw.get("listen")
    addr = listen.get("status", DEFAULT_STATUS) if isinstance(listen, dict) else DEFAULT_STATUS
    try:
        configmod.split_host_port(addr)
    except ValueError:
        return None
    return str(addr)


def _fetch_status(args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        url = _status_url(args)
    except MeshdError as exc:
        _err(str(exc))
        return None
    try:
        with urllib.request.urlopen(url + "/status", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        _err(f"cannot reach the meshd status API at {url} ({reason}); is the daemon running? "
             "(`systemctl status meshd`, or pass --url / --config)")
        return None


def cmd_reload(args: argparse.Namespace) -> int:
    """POST /v1/reload: prints what changed, or every problem of a refused config (exit 1)."""
    try:
        url = _status_url(args)
    except MeshdError as exc:
        _err(str(exc))
        return 1
    req = urllib.request.Request(url + "/v1/reload", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            outcome: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            outcome = json.loads(exc.read())
        except ValueError:
            outcome = {"ok": False, "problems": [f"HTTP {exc.code}"]}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        _err(f"cannot reach the meshd status API at {url} ({getattr(exc, 'reason', exc)}); is the daemon running?")
        return 1
    if not outcome.get("ok"):
        print(f"meshd: reload refused; the daemon keeps running on its previous config ({outcome.get('path', '?')}):",
              file=sys.stderr)
        for line in outcome.get("problems", []):
            print(f"  {line}", file=sys.stderr)
        return 1
    changed = outcome.get("changed") or []
    print(f"reloaded {outcome.get('path')}: " + (", ".join(changed) if changed else "no change"))
    if outcome.get("pending_restart"):
        print("needs a restart to take effect: " + ", ".join(outcome["pending_restart"]))
    if outcome.get("failed_tasks"):
        print("failed tasks (see `meshd status`): " + ", ".join(outcome["failed_tasks"]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    s = _fetch_status(args)
    if s is None:
        return 1
    problems = s.get("health", {}).get("problems", [])
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_status(s))
        if args.peers:
            print()
            print(format_peers(s))
    if problems:  # scriptable: exit 1 when the domain is degraded
        print("meshd: degraded: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    s = _fetch_status(args)
    if s is None:
        return 1
    if args.json:
        print(json.dumps(s.get("mesh", {}).get("peers", []), indent=2))
        return 0
    print(format_peers(s))
    return 0


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


# The scores `meshd status` shows per task kind (training.task), and their short names.
_SHOWN_SCORES = {"classification": ("accuracy",), "binary": ("roc_auc", "accuracy", "f1"),
                 "regression": ("rmse", "mae")}
_SHORT = {"accuracy": "acc", "roc_auc": "auc", "f1": "f1", "rmse": "rmse", "mae": "mae"}


def _scores(training: dict[str, Any], scope: str) -> str:
    """'acc 0.91' or 'auc 0.95, acc 0.9, f1 0.88' or 'rmse 0.31, mae 0.24': a task's scores in one scope."""
    names = _SHOWN_SCORES.get(str(training.get("task") or "classification"), ("accuracy",))
    return ", ".join(f"{_SHORT[m]} {_fmt(training.get(f'{scope}_{m}'))}" for m in names)


def _headline(training: dict[str, Any], scope: str) -> str:
    """The headline score alone, named unless it is accuracy: '0.91', 'auc 0.95', 'rmse 0.31'."""
    metric = str(training.get("metric") or "accuracy")
    value = _fmt(training.get(f"{scope}_{metric}"))
    return value if metric == "accuracy" else f"{_SHORT.get(metric, metric)} {value}"


def _compatible_peers(task: dict[str, Any]) -> str:
    """'ok/known': peers known to run this task with our model and schema, of the peers the task knows of."""
    views = [v for v in (task.get("peers") or {}).values() if isinstance(v, dict)]
    ok = sum(1 for v in views if v.get("runs") and not v.get("incompatible"))
    return f"{ok}/{len(views)}"


def format_status(s: dict[str, Any]) -> str:
    """`meshd status`: the daemon, the mesh, and one row per task, from a /status snapshot."""
    cfg, mesh, model, tr, g = (s.get(k) or {} for k in ("config", "mesh", "model", "training", "gossip"))
    tasks: dict[str, Any] = s.get("tasks") or {}
    counts = mesh.get("counts", {})
    joined = "joined" if mesh.get("joined") else "not joined"
    peers = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"
    reload_note = "" if cfg.get("last_reload_ok", True) else f"  LAST RELOAD FAILED: {cfg.get('last_reload_error')}"
    rows = [
        ("domain", s.get("domain")),
        ("peer id", s.get("peer_id")),
        ("state", f"{s.get('state')} (up {_fmt(s.get('uptime_s'))} s, meshd {s.get('version')})"),
        ("config", f"{cfg.get('path')} loaded {cfg.get('loaded_at')}{reload_note}"),
        ("mesh", f"{joined}; peers: {peers}"),
    ]
    # The top-level model/training mirror the default (or only) task; with several tasks the table says it all.
    if model or not tasks:
        rows += [
            ("model", f"{model.get('name', '-')} v{_fmt(model.get('version'))} "
                      f"({_fmt(model.get('parameters'))} params, fp {str(model.get('fingerprint', '-'))[:12]}, "
                      f"{model.get('task') or 'classification'})"),
            ("training", f"steps {_fmt(tr.get('steps'))} ({_fmt(tr.get('epochs'))} epochs, scale "
                         f"{_fmt(tr.get('update_scale'))}), loss {_fmt(tr.get('loss'))}, "
                         f"holdout {_scores(tr, 'holdout')}; local-only {_scores(tr, 'local_only')}"),
        ]
    rows += [
        ("gossip", f"rounds {_fmt(g.get('rounds'))}, sent {_fmt(g.get('sent'))}, received {_fmt(g.get('received'))}, "
                   f"merged {_fmt(g.get('merged'))}, weight {_fmt(g.get('weight'))}, "
                   f"consensus dist {_fmt(g.get('consensus_distance'))}"),
        ("rejected", ", ".join(f"{k} {v}" for k, v in (g.get("rejected") or {}).items()) or "none"),
    ]
    if cfg.get("pending_restart"):
        rows.append(("pending restart", ", ".join(cfg["pending_restart"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if tasks:
        # Accuracy columns as long as every task is a classifier; otherwise each cell names its metric.
        kinds = {str((t.get("training") or {}).get("metric") or "accuracy") for t in tasks.values()}
        header = ("TASK", "STATE", "JOINED", "MODEL", "VERSION", "STEPS", "EPOCHS",
                  "HOLDOUT ACC" if kinds == {"accuracy"} else "HOLDOUT", "LOCAL-ONLY", "MERGED", "PEERS OK", "COHORT")
        table: list[tuple[str, ...]] = []
        for name, t in tasks.items():
            tm, tt, tg = (t.get(k) or {} for k in ("model", "training", "gossip"))
            version = tm.get("version")
            table.append((
                name, str(t.get("state") or "-"), "yes" if t.get("joined") else "no", str(tm.get("name") or "-"),
                "-" if version is None else f"v{version}", _fmt(tt.get("steps")), _fmt(tt.get("epochs")),
                _headline(tt, "holdout"), _headline(tt, "local_only"), _fmt(tg.get("merged")),
                _compatible_peers(t), ",".join(t.get("cohort") or []) or "-",
            ))
        lines += ["", *_table(header, table)]
        lines += [f"task {name} {t.get('state')}: {t['error']}" for name, t in tasks.items() if t.get("error")]
    return "\n".join(lines)


def _compatibility(s: dict[str, Any], peer: dict[str, Any]) -> str:
    """For each of our tasks: whether this peer can learn with it (yes, no: why, or ? while not known)."""
    tasks: dict[str, Any] = s.get("tasks") or {}
    pid, domain = peer.get("peer_id", ""), peer.get("domain")
    cells = []
    for name, t in tasks.items():
        cohort = t.get("cohort") or ["*"]
        view = (t.get("peers") or {}).get(pid)
        merge = view.get("merge") if isinstance(view, dict) else None
        if "*" not in cohort and pid not in cohort and domain not in cohort:
            cell = "not in cohort"
        elif isinstance(merge, dict) and merge.get("quarantined"):
            cell = f"quarantined ({float(merge.get('quarantine_left_s') or 0):.0f}s left)"
        elif isinstance(view, dict) and view.get("incompatible"):
            cell = f"no: {view['incompatible']}"
        elif isinstance(view, dict) and view.get("runs") is False:
            cell = "no: unknown_task"
        elif isinstance(view, dict) and view.get("runs"):
            cell = "yes"
        else:
            cell = "?"
        cells.append(cell if len(tasks) == 1 else f"{name} {cell}")
    return ", ".join(cells) or "-"


def format_peers(s: dict[str, Any]) -> str:
    """`meshd peers`: one row per peer the mesh knows, the tasks it runs and, for ours, whether it can join."""
    mesh = s.get("mesh") or {}
    peers = mesh.get("peers") or []
    lines = ["no peers known"]
    if peers:
        header = ("DOMAIN", "STATE", "ADDRESS", "SOURCE", "LAST SEEN", "TASKS", "COMPATIBLE", "PEER ID")
        rows = [
            (p.get("domain", ""), p.get("state", ""), p.get("address") or "-", p.get("source", ""),
             "-" if p.get("last_seen_s") is None else f"{p['last_seen_s']:.1f}s ago",
             ",".join(sorted(p.get("tasks") or {})) or "-", _compatibility(s, p), p.get("peer_id", "")[:16] + "…")
            for p in peers
        ]
        lines = _table(header, rows)
    return "\n".join(lines + _candidate_lines(peers) + _untrusted_lines(mesh))


def _candidate_lines(peers: list[dict[str, Any]]) -> list[str]:
    """Addresses proposed for trusted peers that no signed pong has verified (a moved peer, or an impersonator
    advertising a trusted id somewhere else): gossip never goes to them (docs/protocol.md, discovery)."""
    rows = [(str(p.get("domain") or "?"), str(c.get("address")), ",".join(c.get("sources") or []) or "withdrawn",
             str(c.get("failures", 0)), str(p.get("peer_id", ""))[:16] + "…")
            for p in peers for c in p.get("candidates") or [] if not c.get("verified")]
    if not rows:
        return []
    header = ("DOMAIN", "ADDRESS", "PROPOSED BY", "PINGS UNANSWERED", "PEER ID")
    return ["", "addresses proposed but not verified by a signed pong (never gossiped to):", *_table(header, rows)]


def _untrusted_lines(mesh: dict[str, Any]) -> list[str]:
    """Keys that are not trusted: senders refused recently (newest first) and discovery sightings. A key that
    looks like one of ours with a typo shows up here (`meshd doctor` points at it)."""
    rows = [(str(u.get("domain") or "?"), "sent to us (refused)", str(u.get("count", "")),
             f"{u.get('last_seen_s', 0):.1f}s ago", str(u.get("remote") or "-"), str(u.get("peer_id", "")))
            for u in mesh.get("untrusted_senders") or []]
    rows += [(str(u.get("domain") or "?"), f"discovered ({u.get('source')})", "-", "-", str(u.get("address") or "-"),
              str(u.get("peer_id", ""))) for u in mesh.get("untrusted_seen") or []]
    if not rows:
        return []
    header = ("CLAIMED DOMAIN", "SEEN AS", "COUNT", "LAST SEEN", "FROM", "UNTRUSTED PEER ID")
    return ["", "untrusted keys (not in [trust] peers; add one with `meshd trust add`):", *_table(header, rows)]


# --- trust -----------------------------------------------------------------------------------------------------


def _config_problems(exc: ConfigError) -> int:
    where = f"{exc.path}: " if exc.path else ""
    _err(f"{where}refused; nothing written" if len(exc.problems) == 1 else f"{where}{len(exc.problems)} problems; "
         "nothing written")
    for line in exc.problems:
        print(f"  {line}", file=sys.stderr)
    return 2


def cmd_trust_add(args: argparse.Namespace) -> int:
    from meshd.ops import trust

    try:
        print(trust.add(args.config, args.domain, args.peer_id, args.address))
    except ConfigError as exc:
        return _config_problems(exc)
    except MeshdError as exc:
        _err(str(exc))
        return 1
    return 0


def cmd_trust_remove(args: argparse.Namespace) -> int:
    from meshd.ops import trust

    try:
        done, warnings = trust.remove(args.config, peer_id=args.peer_id, domain=args.domain)
    except ConfigError as exc:
        return _config_problems(exc)
    except MeshdError as exc:
        _err(str(exc))
        return 1
    print(done)
    for line in warnings:
        _err(line)
    return 1 if warnings else 0


def cmd_trust_list(args: argparse.Namespace) -> int:
    from meshd.ops import trust

    try:
        found = trust.entries(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return 2
    if args.json:
        print(json.dumps([vars(e) for e in found], indent=2))
        return 0
    if not found:
        print(f"no peers in {args.config}; add one with `meshd trust add --domain NAME --peer-id ID`")
        return 0
    rows = [(e.domain or "?", "yes" if e.trusted else "NO", e.address or "-", ", ".join(e.sources), e.peer_id)
            for e in found]
    print("\n".join(_table(("DOMAIN", "TRUSTED", "ADDRESS", "LISTED IN", "PEER ID"), rows)))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from meshd.ops import doctor

    url = None
    if not args.offline:
        try:
            url = _status_url(args)
        except MeshdError as exc:
            _err(str(exc))
            return 2
    text, code = doctor.report(doctor.run_checks(args.config, url))
    print(text)
    return code


# --- export / demo ----------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from meshd.task.export import export_model

        path = export_model(args.config, args.out, args.task)
    except (ConfigError, MeshdError) as exc:
        _err(str(exc))
        return 2
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshd.ops.demo import run_demo

    return int(run_demo(args))


if __name__ == "__main__":
    sys.exit(main())
