"""Typed, frozen configuration loaded from TOML, validated in one place, and diffed for reload.

Every problem is reported as ``key.path: what is wrong (got X)``; unknown keys get a did-you-mean.
Relative paths resolve against the folder of the config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.errors import ConfigError
from meshd.identity import parse_peer_id

Check = Callable[[Any], str | None]

_DOMAIN_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_PEER_ID_RE = re.compile(r"^[0-9a-f]{64}$")


# --- field validators: return None when fine, else "what is wrong" -----------------------------------


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _between(lo: float, hi: float) -> Check:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}"

    return check


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def _host_port(v: Any) -> str | None:
    try:
        split_host_port(v)
    except ValueError as exc:
        return str(exc)
    return None


def _host_port_or_empty(v: Any) -> str | None:
    return None if v == "" else _host_port(v)


def _domain(v: Any) -> str | None:
    if _DOMAIN_RE.match(v):
        return None
    return "must be 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"


def _peer_ids(v: Any) -> str | None:
    for i, item in enumerate(v):
        if not _PEER_ID_RE.match(item):
            return f"item {i} is not a peer id (64 lowercase hex characters, as printed by `meshd id`)"
        if not _valid_key(item):
            return f"item {i} is not a valid Ed25519 public key (mistyped? compare with `meshd id` on that domain)"
    if len(set(v)) != len(v):
        return "lists the same peer id twice"
    return None


def _peer_id(v: Any) -> str | None:
    if not _PEER_ID_RE.match(v):
        return "is not a peer id (64 lowercase hex characters, see `meshd id`)"
    if not _valid_key(v):
        return "is not a valid Ed25519 public key (mistyped? compare with `meshd id` on that domain)"
    return None


def _valid_key(peer_id: str) -> bool:
    try:
        parse_peer_id(peer_id)
    except ValueError:
        return False
    return True


def _ipv4_list(v: Any) -> str | None:
    for i, item in enumerate(v):
        try:
            ipaddress.IPv4Address(item)
        except ValueError:
            return f"item {i} is not an IPv4 address (the address of the interface to use)"
    return None


def _positive_ints(v: Any) -> str | None:
    return None if all(x > 0 for x in v) else "every item must be > 0"


def _steps_per_round(v: Any) -> str | None:
    if v == "epoch" or (isinstance(v, int) and 0 <= v <= 100_000):
        return None
    return "must be \"epoch\" (one pass over this domain's rows) or a number of steps from 0 to 100000"


def _model_name(v: Any) -> str | None:
    if v in ("logreg", "mlp", "cnn1d"):
        return None
    if re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", v):
        return None
    return "must be 'logreg', 'mlp', 'cnn1d' or 'package.module:factory'"


def _opt(check: Check | None = None, doc: str = "", restart: bool = False) -> dict[str, Any]:
    return {"check": check, "doc": doc, "restart": restart}


# --- the schema ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeConfig:
    domain: str = field(default="", metadata=_opt(_domain, "this domain's name", restart=True))
    identity: Path = field(default=Path("identity.key"), metadata=_opt(doc="Ed25519 key file", restart=True))
    state_dir: Path = field(default=Path("state"), metadata=_opt(doc="checkpoints + replay state", restart=True))


@dataclass(frozen=True)
class ListenConfig:
    peer: str = field(default="0.0.0.0:7452", metadata=_opt(_host_port, "gossip listener", restart=True))
    status: str = field(default="127.0.0.1:7453", metadata=_opt(_host_port, "local status API", restart=True))
    advertise: str = field(
        default="", metadata=_opt(_host_port_or_empty, "address peers should dial", restart=True)
    )
    allow_public_status: bool = field(default=False, metadata=_opt(restart=True))


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="info", metadata=_opt(_one_of("debug", "info", "warning", "error")))
    format: str = field(default="auto", metadata=_opt(_one_of("auto", "json", "console")))


@dataclass(frozen=True)
class MeshConfig:
    enabled: bool = True


@dataclass(frozen=True)
class TrustConfig:
    peers: tuple[str, ...] = field(default=(), metadata=_opt(_peer_ids))
    registry: Path | None = None


@dataclass(frozen=True)
class StaticPeerConfig:
    domain: str = field(default="", metadata=_opt(_domain))
    address: str = field(default="", metadata=_opt(_host_port))
    peer_id: str = field(default="", metadata=_opt(_peer_id))


@dataclass(frozen=True)
class MdnsConfig:
    enabled: bool = True
    interfaces: tuple[str, ...] = field(default=(), metadata=_opt(_ipv4_list))


@dataclass(frozen=True)
class DiscoveryConfig:
    mdns: MdnsConfig = MdnsConfig()


@dataclass(frozen=True)
class GossipConfig:
    interval_s: float = field(default=1.0, metadata=_opt(_positive))
    jitter: float = field(default=0.25, metadata=_opt(_between(0.0, 0.9)))
    fanout: int = field(default=1, metadata=_opt(_between(1, 16)))
    # Local SGD steps between two exchanges while training (docs/learning.md section 4); 0 = split each training
    # round into per_round parts instead.
    every_steps: int = field(default=8, metadata=_opt(_between(0, 1_000_000)))
    per_round: int = field(default=8, metadata=_opt(_between(0, 1000)))
    # The next training part runs while the last part's exchange is in flight (at most one in flight);
    # false: each part waits for its exchange (docs/learning.md section 4).
    overlap: bool = False
    # Exchanges at the end of each training round, with no training in between (docs/learning.md section 4).
    settle: int = field(default=0, metadata=_opt(_between(0, 64)))
    # "pushpull": a share asks the receiver for its own share back in the answer (weights stay balanced);
    # "push": one-way shares only (docs/learning.md section 4).
    exchange: str = field(default="pushpull", metadata=_opt(_one_of("pushpull", "push")))
    serve_window: int = field(default=16, metadata=_opt(_between(0, 1000)))
    # The served model (docs/learning.md section 5): "peers" = the mean of the estimate and, for each of the last
    # serve_window peers heard, its models of about the last serve_smooth_s seconds (a peer heard less often:
    # its latest); "ema" = the estimate blended with an EMA of span serve_window over every model received.
    serve: str = field(default="peers", metadata=_opt(_one_of("peers", "ema")))
    serve_smooth_s: float = field(default=2.0, metadata=_opt(_between(0.0, 3600.0)))
    topology: str = field(default="exponential", metadata=_opt(_one_of("exponential", "random")))
    # "auto": q4 for classification and binary tasks, q8 for regression (see codec_for).
    codec: str = field(default="auto", metadata=_opt(_one_of("auto", "f64", "f32", "f16", "q8", "q4")))
    pull_on_join: bool = True
    far_behind_versions: int = field(default=0, metadata=_opt(_non_negative))
    # Merge rule (meshd/core/merge.py, docs/learning.md section 8): "pushsum" merges shares as they come;
    # "clipped" clips them towards the local model and quarantines peers whose shares stay far off.
    merge: str = field(default="clipped", metadata=_opt(_one_of("pushsum", "clipped")))
    clip_factor: float = field(default=4.0, metadata=_opt(_between(0.1, 100.0)))  # radius / lower third of distances
    max_peer_shares: float = field(default=1.0, metadata=_opt(_between(0.5, 100.0)))  # per peer per round
    max_version_step: int = field(default=16, metadata=_opt(_between(1, 1024)))  # version raise per merge
    stale_versions: int = field(default=16, metadata=_opt(_between(1, 1_000_000)))  # behind the peers' median
    max_share_weight: float = field(default=1.0, metadata=_opt(_between(0.01, 100.0)))  # x the receiver's weight
    quarantine_after: int = field(default=3, metadata=_opt(_between(1, 1000)))  # strikes in a row
    quarantine_s: float = field(default=120.0, metadata=_opt(_positive))  # seconds a quarantine lasts
    # Pull answers give weight away at once (docs/protocol.md section 8, Pull): one answered per peer per
    # pull_interval_s, max_pulls_per_min from all peers together; an answer carries pull_fraction of the free
    # weight, and none is given when the weight left would be below pull_min_weight (a tenth of a domain's 1).
    pull_interval_s: float = field(default=5.0, metadata=_opt(_non_negative))  # pulls answered per peer
    max_pulls_per_min: float = field(default=30.0, metadata=_opt(_between(1.0, 1e6)))
    pull_fraction: float = field(default=0.25, metadata=_opt(_between(0.01, 0.5)))
    pull_min_weight: float = field(default=0.1, metadata=_opt(_between(0.0, 1.0)))
    connect_timeout_s: float = field(default=3.0, metadata=_opt(_positive))
    request_timeout_s: float = field(default=20.0, metadata=_opt(_positive))
    retries: int = field(default=2, metadata=_opt(_between(0, 10)))


@dataclass(frozen=True)
class MembershipConfig:
    ping_after_s: float = field(default=2.0, metadata=_opt(_positive))
    suspect_after_s: float = field(default=5.0, metadata=_opt(_positive))
    dead_after_s: float = field(default=15.0, metadata=_opt(_positive))
    # Longest pause between probes of an address that does not answer, or of a dead peer (backoff doubles).
    probe_max_s: float = field(default=300.0, metadata=_opt(_positive))
    # A peer dead (or left) this long leaves the peer table, unless [[peers]] or the registry lists it.
    reap_after_s: float = field(default=3600.0, metadata=_opt(_positive))


@dataclass(frozen=True)
class LimitsConfig:
    max_message_mib: float = field(default=64.0, metadata=_opt(_between(0.01, 1024), restart=True))
    max_skew_s: float = field(default=60.0, metadata=_opt(_positive))
    replay_window: int = field(default=64, metadata=_opt(_between(1, 4096)))
    max_connections_per_ip: int = field(default=64, metadata=_opt(_between(1, 4096), restart=True))
    # Peer connections in all; at the cap the oldest idle connection that never carried an authenticated
    # envelope is closed to admit a new one (trusted peers' connections are kept).
    max_connections: int = field(default=512, metadata=_opt(_between(16, 65_536), restart=True))
    # Request body bytes held at once, across all connections, before their envelopes are authenticated
    # (bodies of 64 KiB and less are not counted); 0 means 2 x max_message_mib. Beyond it: 503 busy, unread.
    max_pending_mib: float = field(default=0.0, metadata=_opt(_between(0, 65_536), restart=True))
    read_timeout_s: float = field(default=30.0, metadata=_opt(_positive, restart=True))
    max_param_abs: float = field(default=1e6, metadata=_opt(_positive))


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default="mlp", metadata=_opt(_model_name, restart=True))
    # What the model learns (docs/learning.md, "Tasks"): class labels (num_classes logits, cross-entropy), a binary
    # label (one logit, BCE; accuracy, ROC AUC, F1) or a number (one output, MSE; RMSE, MAE). Part of the model
    # fingerprint: domains with different tasks refuse each other as incompatible.
    task: str = field(default="classification", metadata=_opt(_one_of("classification", "binary", "regression"),
                                                              restart=True))
    hidden: tuple[int, ...] = field(default=(64,), metadata=_opt(_positive_ints, restart=True))
    channels: tuple[int, ...] = field(default=(16, 32), metadata=_opt(_positive_ints, restart=True))
    kernel_size: int = field(default=5, metadata=_opt(_between(1, 64), restart=True))
    num_classes: int = field(default=10, metadata=_opt(_between(2, 100_000), restart=True))
    # Every domain of a mesh must start from the same weights: they depend only on the model spec and this
    # mesh-wide seed, never on the domain (different starting points cost accuracy that gossip never recovers).
    init_seed: int = field(default=0, metadata=_opt(_non_negative, "mesh-wide seed of the initial weights",
                                                    restart=True))


#: Feature types of a typed schema ([[data.columns]]); docs/data.md.
COLUMN_TYPES = ("numeric", "categorical", "boolean")
#: What a missing cell becomes, per type: numeric and boolean columns take the column's mean or 0; a categorical
#: one sets no category ("zero") or its unknown column; "error" refuses the data product.
MISSING_BY_TYPE = {"numeric": ("error", "mean", "zero"), "boolean": ("error", "mean", "zero"),
                   "categorical": ("error", "zero", "unknown")}


@dataclass(frozen=True)
class ColumnConfig:
    """One feature column of a typed schema: its type, its encoding and what a missing cell becomes."""

    name: str = field(default="", metadata=_opt(doc="column name in the data product"))
    type: str = field(default="numeric", metadata=_opt(_one_of(*COLUMN_TYPES)))
    # categorical: the values, one-hot encoded in this order ("country=FR"); or, instead, hash buckets.
    categories: tuple[str, ...] = ()
    buckets: int = field(default=0, metadata=_opt(_between(0, 1 << 20)))
    unknown: bool = False  # categorical with categories: one more column for values not in the list
    missing: str = field(default="error", metadata=_opt(_one_of("error", "mean", "zero", "unknown")))
    indicator: bool = False  # one more column, 1 where the cell was missing ("amount:missing")


@dataclass(frozen=True)
class DataConfig:
    path: Path | None = field(default=None, metadata=_opt(restart=True))
    label: str = field(default="label", metadata=_opt(restart=True))
    features: tuple[str, ...] = field(default=(), metadata=_opt(restart=True))
    # A typed schema: the feature columns in order, each with its type; replaces `features` when set.
    columns: tuple[ColumnConfig, ...] = field(default=(), metadata=_opt(restart=True))
    holdout: float = field(default=0.2, metadata=_opt(_between(0.0, 0.9), restart=True))
    test_path: Path | None = field(default=None, metadata=_opt(restart=True))
    # "mesh": numeric inputs scaled by the mesh's mean and standard deviation, estimated by gossip before
    # training (docs/data.md); part of the schema fingerprint. "none": inputs as read.
    standardize: str = field(default="none", metadata=_opt(_one_of("none", "mesh"), restart=True))
    # Seconds between two looks at data.path for a change (a file added, replaced, rewritten); a change seen
    # at two looks in a row is read in the background and trained on without a restart; 0 = read once.
    reload_check_s: float = field(default=30.0, metadata=_opt(_non_negative))


@dataclass(frozen=True)
class TrainingConfig:
    enabled: bool = True
    # "epoch": one pass over this domain's training rows per round (FedAvg's one local epoch per round),
    # or a fixed number of SGD steps; 0 = no training.
    steps_per_round: int | str = field(default="epoch", metadata=_opt(_steps_per_round))
    weighting: str = field(default="rows", metadata=_opt(_one_of("rows", "equal")))
    pace: str = field(default="mesh", metadata=_opt(_one_of("mesh", "free")))
    # The optimizer is built when a task opens: a change to these restarts the task (from its final checkpoint).
    batch_size: int = field(default=32, metadata=_opt(_between(1, 1_000_000), restart=True))
    lr: float = field(default=0.05, metadata=_opt(_positive, restart=True))
    momentum: float = field(default=0.0, metadata=_opt(_between(0.0, 0.999), restart=True))
    weight_decay: float = field(default=0.0, metadata=_opt(_non_negative, restart=True))
    seed: int = field(default=0, metadata=_opt(_non_negative, restart=True))
    eval_interval_s: float = field(default=5.0, metadata=_opt(_positive))
    local_baseline: bool = field(default=True, metadata=_opt(restart=True))
    # The local-only baseline stops training once its holdout accuracy has not risen by half a point for this
    # many epochs (it has converged on the domain's own rows); 0 = it trains as long as the task does.
    local_baseline_patience: float = field(default=5.0, metadata=_opt(_non_negative))
    threads: int = field(default=1, metadata=_opt(_between(1, 256), restart=True))


@dataclass(frozen=True)
class CheckpointConfig:
    interval_s: float = field(default=30.0, metadata=_opt(_positive))
    keep: int = field(default=2, metadata=_opt(_between(1, 100)))


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD for one task (docs/privacy.md). The budget keys apply on reload; the mechanism restarts the task."""

    enabled: bool = field(default=False, metadata=_opt(doc="train with DP-SGD and keep a ledger", restart=True))
    # The budget (epsilon, delta) this task may spend over its whole life; training stops when the next step
    # would exceed it. Raising it is an explicit config edit (applied on reload).
    epsilon: float = field(default=8.0, metadata=_opt(_positive, "privacy budget: total epsilon"))
    delta: float = field(default=1e-5, metadata=_opt(_between(1e-12, 0.1), "privacy budget: delta"))
    max_grad_norm: float = field(default=1.0, metadata=_opt(_positive, "per-sample gradient clip (L2)",
                                                            restart=True))
    # Gaussian noise std / max_grad_norm; 0 = calibrated so that `planned_steps` steps spend exactly `epsilon`.
    noise_multiplier: float = field(default=0.0, metadata=_opt(_between(0.0, 1000.0), "noise std / clip",
                                                               restart=True))
    planned_steps: int = field(default=0, metadata=_opt(_between(0, 100_000_000), "steps the budget must last "
                                                        "(with noise_multiplier = 0)", restart=True))
    accountant: str = field(default="rdp", metadata=_opt(_one_of("rdp", "prv"), restart=True))
    # Refuse shares (and pulls) from peers whose advertised budget or spent epsilon is above this; 0 = off.
    require_epsilon_at_most: float = field(default=0.0, metadata=_opt(_non_negative, "weakest peer accepted"))


#: Gossip keys that belong to the mesh (its transport), not to a task: a ``[task.gossip]`` table may not set them.
MESH_GOSSIP_KEYS = ("connect_timeout_s", "request_timeout_s", "retries")
#: The sections a ``[[task]]`` table may hold; the top-level sections of the same name are their defaults.
TASK_SECTIONS = ("model", "data", "training", "gossip", "checkpoint", "privacy")
#: The name of the one task of a config without ``[[task]]`` tables (today's single-model form).
DEFAULT_TASK = "default"
MAX_TASKS = 32


def _task_name(v: Any) -> str | None:
    if _DOMAIN_RE.match(v):
        return None
    return "must be 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"


def _cohort(v: Any) -> str | None:
    if not v:
        return "is empty; list domain names or peer ids, or [\"*\"] for every trusted peer that runs this task"
    for i, item in enumerate(v):
        if item != "*" and not _PEER_ID_RE.match(item) and not _DOMAIN_RE.match(item):
            return f"item {i} is neither '*', a domain name nor a peer id (64 lowercase hex characters)"
    if "*" in v and len(v) > 1:
        return "'*' already means every trusted peer; list either '*' or names and ids"
    return None


@dataclass(frozen=True)
class TaskConfig:
    """One learning task: its own model, data product, training, gossip and checkpoints, and its cohort."""

    name: str = field(default=DEFAULT_TASK, metadata=_opt(_task_name, "this task's name, unique in the domain"))
    # The domains this task learns with: domain names or peer ids (of trusted peers), or "*": every trusted
    # peer that runs a task of this name with the same model and schema fingerprints.
    cohort: tuple[str, ...] = field(default=("*",), metadata=_opt(_cohort, "domains this task learns with"))
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    gossip: GossipConfig = GossipConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    privacy: PrivacyConfig = PrivacyConfig()


@dataclass(frozen=True)
class Config:
    node: NodeConfig = NodeConfig()
    listen: ListenConfig = ListenConfig()
    log: LogConfig = LogConfig()
    mesh: MeshConfig = MeshConfig()
    trust: TrustConfig = TrustConfig()
    peers: tuple[StaticPeerConfig, ...] = ()
    discovery: DiscoveryConfig = DiscoveryConfig()
    gossip: GossipConfig = GossipConfig()
    membership: MembershipConfig = MembershipConfig()
    limits: LimitsConfig = LimitsConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    # [[task]] tables; none = one implicit task named "default" made of the top-level sections above.
    task: tuple[TaskConfig, ...] = ()
    source: Path | None = field(default=None, compare=False)

    @property
    def tasks(self) -> tuple[TaskConfig, ...]:
        """The tasks this domain runs: the ``[[task]]`` tables, or the implicit single task."""
        if self.task:
            return self.task
        return (TaskConfig(name=DEFAULT_TASK, cohort=("*",), model=self.model, data=self.data,
                           training=self.training, gossip=self.gossip, checkpoint=self.checkpoint,
                           privacy=self.privacy),)


# --- public API -----------------------------------------------------------------------------------------


def codec_for(task: TaskConfig) -> str:
    """The task's wire codec: ``gossip.codec``, with ``"auto"`` resolved by the model's task kind. A classifier
    only needs the right logit to be the largest, and q4's rounding costs it nothing on the learning bench; a
    regression's output is the number itself, and q4 doubled its RMSE (bench/task_kinds.py), q8 did not."""
    if task.gossip.codec != "auto":
        return task.gossip.codec
    return "q8" if task.model.task == "regression" else "q4"


def split_host_port(text: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port); raises ValueError saying what is wrong."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError("must be HOST:PORT")
    host, _, port_s = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError("must be HOST:PORT (host is empty)")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError("port must be a number 0-65535")
    return host, int(port_s)


def load(path: Path) -> Config:
    """Read and validate a config file; raises ConfigError listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found; create one with `meshd init --dir {path.parent}`"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read ({exc})"], str(path)) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    return from_dict(raw, base_dir=path.parent, source=path)


def from_dict(raw: Mapping[str, Any], *, base_dir: Path, source: Path | None = None) -> Config:
    problems: list[str] = []
    raw = _with_task_defaults(raw, problems)
    values = _build(Config, raw, "", base_dir, problems)
    if not problems:
        cfg = Config(**values, source=source)
        problems.extend(_cross_checks(cfg))
        if not problems:
            return cfg
    raise ConfigError(problems, str(source) if source else None)


def restart_keys() -> set[str]:
    """Dotted keys whose change takes effect only after a restart."""
    keys: set[str] = set()
    _walk_restart(Config, "", keys)
    return keys


def diff(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    return sorted(_diff(old, new, ""))


def pending_restart(old: Config, new: Config) -> list[str]:
    """Changed keys that a reload cannot apply. A task's own keys are not among them: a change to one of its
    restart-only keys (model, data...) restarts that task alone (:func:`task_needs_restart`)."""
    rk = restart_keys()
    own = (*TASK_SECTIONS, "task")
    return [k for k in diff(old, new)
            if (k in rk or k.split(".")[0] in rk) and k.split(".")[0].split("[")[0] not in own]


def task_needs_restart(old: TaskConfig, new: TaskConfig) -> list[str]:
    """A task's changed keys that only a restart of the task applies (its model, data product, seed...)."""
    keys: set[str] = set()
    _walk_restart(TaskConfig, "", keys)
    # an item of a list of tables (data.columns[2].type) restarts with its list
    return [k for k in sorted(_diff(old, new, "")) if k in keys or k.split("[")[0] in keys]


def field_docs() -> dict[str, str]:
    """Every leaf key of the schema (dotted), for the example-config test."""
    out: dict[str, str] = {}
    _walk_docs(Config, "", out)
    return out


# --- helpers --------------------------------------------------------------------------------------------


def _with_task_defaults(raw: Mapping[str, Any], problems: list[str]) -> Mapping[str, Any]:
    """Each ``[[task]]`` table, with the top-level model/data/training/gossip/checkpoint keys it does not set."""
    tasks = raw.get("task")
    if not isinstance(tasks, list):
        return raw
    merged = []
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            merged.append(task)
            continue
        task = dict(task)
        for section in TASK_SECTIONS:
            base, own = raw.get(section, {}), task.get(section, {})
            if not isinstance(base, Mapping) or not isinstance(own, Mapping):
                continue
            if section == "gossip":
                for key in MESH_GOSSIP_KEYS:
                    if key in own:
                        problems.append(f"task[{i}].gossip.{key}: is mesh-wide (the transport is shared by every "
                                        f"task); set it in the top-level [gossip] table")
                own = {k: v for k, v in own.items() if k not in MESH_GOSSIP_KEYS}
            if base or own:
                task[section] = {**base, **own}
        merged.append(task)
    return {**raw, "task": merged}


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}.get(
        tp, str(tp)
    )


def _is_dc(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Any, prefix: str, base_dir: Path, problems: list[str]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        problems.append(f"{prefix.rstrip('.') or '<root>'}: must be a table (got {raw!r})")
        return {}
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "source" or f.name not in raw:
            continue
        key = prefix + f.name
        value = _convert(hints[f.name], raw[f.name], key, base_dir, problems)
        if value is _BAD:
            continue
        check = f.metadata.get("check")
        if check is not None:
            why = check(value)
            if why:
                problems.append(f"{key}: {why} (got {raw[f.name]!r})")
                continue
        out[f.name] = value
    return out


_BAD = object()


def _convert(tp: Any, value: Any, key: str, base_dir: Path, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if value == "":
            return None
        return _convert(inner, value, key, base_dir, problems)
    if origin in (types.UnionType, typing.Union):  # e.g. int | str: the first member that takes the value
        for member in args:
            trial: list[str] = []
            conv = _convert(member, value, key, base_dir, trial)
            if not trial:
                return conv
        problems.append(f"{key}: must be {' or '.join(_type_name(a) for a in args)} (got {value!r})")
        return _BAD
    if _is_dc(tp):
        sub = _build(tp, value, key + ".", base_dir, problems)
        try:
            return tp(**sub)
        except TypeError:
            return _BAD
    if origin is tuple:
        item_tp = args[0]
        if not isinstance(value, list):
            problems.append(f"{key}: must be a list (got {value!r})")
            return _BAD
        items = []
        for i, item in enumerate(value):
            conv = _convert(item_tp, item, f"{key}[{i}]", base_dir, problems)
            if conv is _BAD:
                return _BAD
            items.append(conv)
        return tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path and isinstance(value, str) and value:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    problems.append(f"{key}: must be {_type_name(tp)} (got {value!r})")
    return _BAD


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    if not cfg.node.domain:
        problems.append("node.domain: is required (got nothing); set it to this domain's name, e.g. 'payments'")
    if cfg.membership.dead_after_s <= cfg.membership.suspect_after_s:
        problems.append(
            f"membership.dead_after_s: must be > membership.suspect_after_s (got {cfg.membership.dead_after_s})"
        )
    if 0 < cfg.limits.max_pending_mib < cfg.limits.max_message_mib:
        problems.append(
            f"limits.max_pending_mib: must be 0 (2 x limits.max_message_mib) or at least limits.max_message_mib "
            f"({cfg.limits.max_message_mib}), else no message that large is ever read "
            f"(got {cfg.limits.max_pending_mib})"
        )
    if cfg.membership.probe_max_s < cfg.membership.ping_after_s:
        problems.append(
            f"membership.probe_max_s: must be >= membership.ping_after_s (got {cfg.membership.probe_max_s})"
        )
    host, _ = split_host_port(cfg.listen.status)
    if not cfg.listen.allow_public_status and not _is_loopback(host):
        problems.append(
            f"listen.status: binds a non-loopback address (got {cfg.listen.status!r}); "
            "set listen.allow_public_status = true if that is intended"
        )
    if cfg.peers:
        seen: set[str] = set()
        for i, p in enumerate(cfg.peers):
            for name in ("domain", "address", "peer_id"):
                if not getattr(p, name):
                    problems.append(f"peers[{i}].{name}: is required (got nothing)")
            if p.peer_id in seen:
                problems.append(f"peers[{i}].peer_id: listed twice (got {p.peer_id!r})")
            seen.add(p.peer_id)
    names: set[str] = set()
    if len(cfg.task) > MAX_TASKS:
        problems.append(f"task: at most {MAX_TASKS} tasks per domain (got {len(cfg.task)})")
    for i, task in enumerate(cfg.task):
        if task.name in names:
            problems.append(f"task[{i}].name: another task is named {task.name!r}; task names are unique in a domain")
        names.add(task.name)
    for prefix, task in ([("", t) for t in cfg.tasks] if not cfg.task
                         else [(f"task[{i}].", t) for i, t in enumerate(cfg.task)]):
        problems.extend(column_problems(task.data, f"{prefix}data."))
        pv = task.privacy
        if pv.enabled and pv.noise_multiplier == 0 and pv.planned_steps == 0:
            problems.append(f"{prefix}privacy.noise_multiplier: is 0 and {prefix}privacy.planned_steps is 0; set "
                            f"noise_multiplier (e.g. 1.0), or planned_steps (the SGD steps the epsilon budget must "
                            f"last) to calibrate the noise")
    # A domain without a data product just averages; the daemon reports that task's training as idle.
    return problems


def column_problems(data: DataConfig, prefix: str = "data.") -> list[str]:
    """What is wrong with a typed schema (``data.columns``), each naming its key and the fix."""
    problems: list[str] = []
    if data.columns and data.features:
        problems.append(f"{prefix}features: set either {prefix}features (untyped, all numeric) or {prefix}columns "
                        f"(typed), not both; the columns list is the feature list, in order")
    seen: set[str] = set()
    for i, col in enumerate(data.columns):
        key = f"{prefix}columns[{i}]"
        if not col.name:
            problems.append(f"{key}.name: is required (got nothing); the name of a column of the data product")
        elif col.name in seen:
            problems.append(f"{key}.name: column {col.name!r} is declared twice")
        elif col.name == data.label:
            problems.append(f"{key}.name: {col.name!r} is the label column ({prefix}label); it cannot be a feature")
        seen.add(col.name)
        allowed = MISSING_BY_TYPE[col.type]
        if col.missing not in allowed:
            problems.append(f"{key}.missing: a {col.type} column takes " + " | ".join(f'"{m}"' for m in allowed)
                            + f" (got {col.missing!r})")
        if col.type != "categorical":
            for name, value in (("categories", col.categories), ("buckets", col.buckets), ("unknown", col.unknown)):
                if value:
                    problems.append(f"{key}.{name}: only a categorical column has {name}; remove it or set "
                                    f"type = \"categorical\" (got {value!r})")
            continue
        if not col.categories and not col.buckets:
            problems.append(f"{key}.categories: a categorical column needs its category list (categories = "
                            f"[\"a\", \"b\"], one-hot encoded) or a number of hash buckets (buckets = 64); "
                            f"`meshd data describe PATH` prints the list it finds")
        elif col.categories and col.buckets:
            problems.append(f"{key}.buckets: set either categories (one-hot) or buckets (hashed), not both")
        if len(set(col.categories)) != len(col.categories):
            problems.append(f"{key}.categories: lists the same value twice")
        if col.buckets and col.unknown:
            problems.append(f"{key}.unknown: a hashed column (buckets) has no unknown column: every value falls "
                            f"in a bucket; remove unknown")
        if col.missing == "unknown" and not (col.unknown and col.categories):
            problems.append(f"{key}.missing: \"unknown\" puts missing cells in the unknown column, which needs "
                            f"unknown = true and a categories list; or use missing = \"zero\" or \"error\"")
    return problems


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _diff(old: Any, new: Any, prefix: str) -> set[str]:
    out: set[str] = set()
    for f in dataclasses.fields(old):
        if f.name == "source":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if _is_dc(type(a)) and type(a) is type(b):
            out |= _diff(a, b, prefix + f.name + ".")
        elif (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and a != b
              and all(_is_dc(type(x)) and type(x) is type(y) for x, y in zip(a, b, strict=True))):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):  # e.g. task[1].training.lr
                out |= _diff(x, y, f"{prefix}{f.name}[{i}].")
        elif a != b:
            out.add(prefix + f.name)
    return out


def _walk_restart(cls: type, prefix: str, out: set[str]) -> None:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dc(tp):
            _walk_restart(tp, prefix + f.name + ".", out)
        elif f.metadata.get("restart"):
            out.add(prefix + f.name)


def _walk_docs(cls: type, prefix: str, out: dict[str, str]) -> None:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        tp = hints[f.name]
        if _is_dc(tp):
            _walk_docs(tp, prefix + f.name + ".", out)
        elif typing.get_origin(tp) is tuple and _is_dc(typing.get_args(tp)[0]):
            _walk_docs(typing.get_args(tp)[0], prefix + f.name + "[].", out)
        else:
            out[prefix + f.name] = str(f.metadata.get("doc", ""))
