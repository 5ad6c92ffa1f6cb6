"""The commented config that `meshd init` writes; config/meshd.example.toml is this, rendered for 'payments'."""

from __future__ import annotations

from meshd.config import MESH_GOSSIP_KEYS, TASK_SECTIONS

TEMPLATE = """\
# meshd configuration for domain '{domain}'.
# Every key is optional except node.domain; the values below are the defaults unless noted.
# Relative paths resolve against the folder of this file.
# Reload without restart: `systemctl reload meshd` (SIGHUP) or just save the file.
# Keys marked [restart] only take effect after a restart; /status lists them under config.pending_restart
# (except in a [[task]]: see below).

[node]
domain = "{domain}"              # [restart] this domain's name (a-z, 0-9, '-', '_'; at most 63)
identity = "{identity}"          # [restart] Ed25519 key file (mode 0600), made by `meshd init` / `meshd keygen`
state_dir = "{state_dir}"        # [restart] checkpoints, replay state and sequence counter (created 0700)

[listen]
peer = "{peer_addr}"             # [restart] HOST:PORT of the gossip listener (signed, encrypted envelopes only)
status = "{status_addr}"         # [restart] HOST:PORT of the local status API (/status, /metrics, /healthz)
advertise = ""                   # [restart] HOST:PORT peers should dial; "" = the peer listener's address
allow_public_status = false      # [restart] must be true to bind the status API to a non-loopback address

[log]
level = "info"                   # debug | info | warning | error
format = "auto"                  # auto (console on a terminal, JSON lines otherwise) | json | console

[mesh]
enabled = true                   # false: send a signed 'leave', stop gossiping and advertising; keep the model

[trust]
# Peer ids (Ed25519 public keys, hex) that governance trusts. Only these may gossip with this domain.
# `meshd trust add --domain NAME --peer-id ID [--address HOST:PORT]` edits this list (and [[peers]]).
peers = []
# Optional registry file shipped by governance: [[peers]] with domain, peer_id and (optional) address.
# Every peer listed there is trusted, and its address is used for gossip.
registry = ""

# Static peer addresses (for peers outside this LAN); trust still comes only from [trust].
# [[peers]]
# domain = "sales"
# address = "10.0.0.2:7452"
# peer_id = "<64 hex characters printed by `meshd id` on that domain>"

[discovery.mdns]
enabled = true                   # advertise and browse _meshd._tcp.local. on the LAN
interfaces = []                  # IPv4 addresses of the interfaces to use; [] = all interfaces

[gossip]
# The mesh's transport, shared by every task. The other gossip keys are per task: see [task.gossip] below
# (set here, they would be defaults for every task).
connect_timeout_s = 3.0          # seconds to open a connection to a peer
request_timeout_s = 20.0         # seconds for one whole exchange
retries = 2                      # retries of one exchange (same envelope; a replay answer means delivered)

[membership]
ping_after_s = 2.0               # silence before an idle peer gets a signed ping (x 1.5 from the larger id)
suspect_after_s = 5.0            # silence after which a peer is 'suspect'
dead_after_s = 15.0              # silence after which a peer is 'dead' (no longer a gossip target)
probe_max_s = 300.0              # longest pause between probes of a silent address or a dead peer
reap_after_s = 3600.0            # a peer dead or left this long leaves the table (unless listed here)

[limits]
max_message_mib = 64.0           # [restart] largest envelope accepted or sent, in MiB
max_skew_s = 60.0                # accepted clock difference between peers, seconds
replay_window = 64               # out-of-order sequence numbers accepted per sender
max_connections_per_ip = 64      # [restart] concurrent peer connections from one address; peers behind one
                                 # NAT (or on one host) share it, and each peer keeps up to 2 open
max_connections = 512            # [restart] peer connections in all; at the cap the oldest idle one that never
                                 # carried an authenticated envelope is closed (trusted peers' are kept)
max_pending_mib = 0.0            # [restart] request bodies held before authentication, in MiB, all connections
                                 # together (0 = 2 x max_message_mib; bodies <= 64 KiB not counted); 503 beyond
read_timeout_s = 30.0            # [restart] deadline to receive a request's headers and body
max_param_abs = 1000000.0        # model values beyond this magnitude are refused, never merged

# --- learning tasks -----------------------------------------------------------------------------------------------
# Each [[task]] table is one model this domain learns with a cohort of peers: its own model, data product,
# training, gossip and checkpoints (in <state_dir>/tasks/<name>). Tasks run independently: one that fails or
# restarts leaves the mesh and the other tasks running; /status shows each under "tasks".
# Top-level [model], [data], [training], [gossip], [checkpoint] and [privacy] tables (none are written here) act
# as defaults for every task, key by key: a key set in a task's own [task.*] table wins. A config without [[task]]
# tables runs one task named "default" made of those top-level tables.
# In a task, a change to a [restart] key restarts that task alone on reload.

[[task]]
name = "default"                 # this task's name, unique in the domain (a-z, 0-9, '-', '_'); peers gossip per
                                 # task name. "default" is the task of single-model configs and keeps their
                                 # checkpoints; a renamed task starts afresh
cohort = ["*"]                   # domains this task learns with: ["*"] = every trusted peer that runs a task of
                                 # this name with the same model and data schema; or domain names and peer ids

[task.model]
name = "mlp"                     # [restart] logreg | mlp | cnn1d | package.module:factory
task = "classification"          # [restart] classification (num_classes outputs, cross-entropy; accuracy) | binary
                                 # (labels 0/1 or true/false; one logit, BCE; accuracy, ROC AUC, F1) | regression
                                 # (numeric labels; one output, MSE; RMSE, MAE). Domains must agree on it
hidden = [64]                    # [restart] mlp hidden layer sizes
channels = [16, 32]              # [restart] cnn1d convolution channels
kernel_size = 5                  # [restart] cnn1d kernel size
num_classes = 10                 # [restart] number of label values (labels are 0 .. num_classes-1); classification only
init_seed = 0                    # [restart] mesh-wide seed of the initial weights: the same on every domain

[task.data]
path = "{data_path}"             # [restart] the domain's data product: .parquet (or a folder of them, hive partitions
                                 # like country=FR/ included), .feather/.arrow, .csv with a header, or .npz; "" = none
label = "label"                  # [restart] label column (or array, in an .npz)
features = []                    # [restart] feature columns, all numeric; [] = every column but the label
holdout = 0.2                    # [restart] fraction kept for this domain's own evaluation, never sent
test_path = ""                   # [restart] optional extra evaluation set (same format), e.g. a shared test set
standardize = "none"             # [restart] "mesh": numeric inputs scaled by the mesh's mean and std, estimated
                                 # by gossip before training (docs/data.md); every domain must agree | "none"
reload_check_s = 30.0            # seconds between looks at `path` for a change (a file added or replaced): a change
                                 # seen twice in a row is read and trained on, model kept (docs/data.md); 0 = never
columns = []                     # [restart] a typed schema instead of `features`: the feature columns in order, each
                                 # with its type; `meshd data describe PATH` prints one for a data product. Names,
                                 # types, order and categories are part of the schema fingerprint: every domain of a
                                 # mesh declares the same (docs/data.md). For example:
# columns = [
#   {{ name = "amount", type = "numeric", missing = "mean", indicator = true }},
#   {{ name = "country", type = "categorical", categories = ["DE", "FR"], unknown = true, missing = "unknown" }},
#   {{ name = "merchant", type = "categorical", buckets = 64, missing = "zero" }},
#   {{ name = "vip", type = "boolean" }},
# ]
# A column's keys:
#   name        its name in the data product
#   type        numeric | categorical | boolean (true/false, yes/no, t/f, 1/0)
#   categories  categorical: its values, one-hot encoded in this order (columns country=DE, country=FR)
#   buckets     categorical, instead of categories: hash the values into this many columns (merchant#0 ...)
#   unknown     categorical with categories: true adds a column country=<unknown> for values not listed
#               (false, the default: such a value refuses the data product)
#   missing     a missing cell (empty, null; NaN in a numeric column): "error" (the default) refuses the data
#               product; numeric and boolean: "mean" | "zero"; categorical: "zero" (no category) | "unknown"
#   indicator   true adds a column amount:missing, 1 where the cell was missing

[task.training]
enabled = true                   # local SGD training, back to back in a worker thread (needs data.path)
steps_per_round = "epoch"        # "epoch" (one pass over this domain's rows, as FedAvg) or a number of SGD steps
weighting = "rows"               # rows: an update counts in proportion to this domain's rows (FedAvg's weighting,
                                 # against the mesh's mean rows, estimated by gossip) | equal
pace = "mesh"                    # mesh: wait when more than half an epoch ahead of the peers' median, so steps
                                 # are proportional to rows, as in FedAvg | free: never wait
batch_size = 32                  # [restart] rows per SGD step
lr = 0.05                        # [restart] learning rate
momentum = 0.0                   # [restart] SGD momentum
weight_decay = 0.0               # [restart] L2 penalty
seed = 0                         # [restart] seeds the holdout split and the minibatch order
eval_interval_s = 5.0            # seconds between holdout evaluations
local_baseline = true            # [restart] also train a never-averaged copy, to report local-only accuracy (2x CPU)
local_baseline_patience = 5.0    # epochs without a half-point holdout gain after which the baseline stops (0 = never)
threads = 1                      # [restart] torch CPU threads for training

[task.gossip]
interval_s = 1.0                 # seconds between gossip rounds (jittered) while not training; training asks sooner
every_steps = 8                  # local SGD steps between two gossip rounds while training (0 = use per_round)
per_round = 8                    # with every_steps = 0: exchanges per training round, the round trained in this
                                 # many parts, each followed by one gossip round (both 0 = by interval_s only)
overlap = false                  # true: the next part trains while the last part's gossip round is in flight
settle = 0                       # more gossip rounds at the end of each training round, with no training in
                                 # between; the model they leave is the one served until the next round
exchange = "pushpull"            # pushpull: a share asks for the receiver's share back (weights stay balanced;
                                 # one-way anyway with merge = "clipped" or a privacy requirement) | push
jitter = 0.25                    # fraction of interval_s added or removed at random
fanout = 1                       # peers sent a share of the model each round
topology = "exponential"         # exponential (peer 2^r places on in the ring of peer ids, round r) | random
codec = "auto"                   # auto (q4 for classification and binary, q8 for regression: q4 doubles a
                                 # regression's RMSE, docs/learning.md section 9) | q4 (4-bit blocks, ~0.58
                                 # bytes/value) | q8 (~1.08) | f16 | f32 | f64
serve = "peers"                  # the served model: peers (the mean of our estimate and each of the last
                                 # serve_window peers' recent models, serve_smooth_s below) | ema (our estimate
                                 # blended with an EMA of span serve_window of every model received)
serve_window = 16                # peers (or the EMA's span) in the served model (0 = serve our estimate itself)
serve_smooth_s = 2.0             # peers: a peer's entry averages its models over about this many seconds (a
                                 # peer heard less often counts with its latest model; 0 = always the latest)
pull_on_join = true              # a task with no checkpoint first pulls the mesh model from a peer
far_behind_versions = 0          # pull again when a peer's model version is this far ahead (0 = never)
merge = "clipped"                # clipped (poisoning-robust: docs/learning.md §8) | pushsum (exact averaging)
clip_factor = 4.0                # clipped: radius = this x the lower third of peers' typical distances to our model
max_peer_shares = 1.0            # clipped: shares merged from one peer per gossip round of ours (at most 2 in a row)
max_version_step = 16            # clipped: a merge raises our model version by at most this
stale_versions = 16              # clipped: a share this many versions behind the peers' median is refused
max_share_weight = 1.0           # clipped: a share's weight is merged up to this x our own weight
quarantine_after = 3             # clipped: far-off shares (or push-pull asks unanswered) in a row: quarantine
quarantine_s = 120.0             # clipped: seconds a quarantined peer's shares are refused (then on probation)
pull_interval_s = 5.0            # one pull answered per peer per this many seconds (0 = no per-peer limit)
max_pulls_per_min = 30.0         # pulls answered per minute from all peers together (bursts up to this many)
pull_fraction = 0.25             # share of this domain's free weight a pull answer carries (at most 0.5)
pull_min_weight = 0.1            # no pull answer (429 weight_low) when it would leave the weight below this

[task.checkpoint]
interval_s = 30.0                # seconds between checkpoints (also written at shutdown)
keep = 2                         # checkpoints kept; a corrupt newest one falls back to the previous

[task.privacy]
# Differential privacy (DP-SGD with Opacus) and a durable epsilon ledger in <state_dir>/tasks/<name>; docs/privacy.md.
enabled = false                  # [restart] train with per-sample clipping and Gaussian noise, spend a budget
epsilon = 8.0                    # the budget: total epsilon over the task's life; training stops before exceeding it
delta = 1e-05                    # the budget's delta
max_grad_norm = 1.0              # [restart] per-sample gradient clip (L2 norm)
noise_multiplier = 0.0           # [restart] noise std / max_grad_norm; 0 = calibrated from epsilon and planned_steps
planned_steps = 0                # [restart] SGD steps the budget must last (used when noise_multiplier = 0)
accountant = "rdp"               # [restart] rdp | prv (Opacus's accountants)
require_epsilon_at_most = 0.0    # refuse peers advertising a weaker budget (or more spent) than this; 0 = off

# A second task: another model on another data product, learned with two domains only. A task's [task.*] tables
# follow its [[task]] line; keys it leaves out come from the top-level tables, then from the defaults.
# [[task]]
# name = "churn"
# cohort = ["sales", "support"]  # domain names or peer ids (of trusted peers)
#
# [task.model]
# name = "logreg"
# task = "binary"                # churned or not: labels 0/1 or true/false; reports accuracy, ROC AUC and F1
#
# [task.data]
# path = "/srv/data/churn.csv"
# label = "churned"
#
# [task.training]
# lr = 0.1
"""


def render(
    domain: str,
    *,
    peer_addr: str = "0.0.0.0:7452",
    status_addr: str = "127.0.0.1:7453",
    identity: str = "identity.key",
    state_dir: str = "state",
    data_path: str = "",
) -> str:
    return TEMPLATE.format(
        domain=domain,
        peer_addr=peer_addr,
        status_addr=status_addr,
        identity=identity,
        state_dir=state_dir,
        data_path=data_path,
    )


def set_key(text: str, section: str, key: str, value: str) -> str:
    """Set `key = value` (value is TOML text) inside `[section]` of a rendered template, keeping comments;
    appends the key to the section (or a new section) if it is not there.

    A task's own section (model, data, training, per-task gossip keys, checkpoint) is set where it takes
    effect: in every ``[task.SECTION]`` sub-table of the text (a key set there beats the top-level default),
    and also in the top-level ``[SECTION]`` when some ``[[task]]`` has no such sub-table (it inherits from it).
    Without ``[[task]]`` tables, or for the mesh-wide gossip keys, the top-level section is set as before."""
    if section in TASK_SECTIONS and not (section == "gossip" and key in MESH_GOSSIP_KEYS):
        headers = [line.strip() for line in text.splitlines()]
        n_tasks = headers.count("[[task]]")
        n_sub = headers.count(f"[task.{section}]")
        if n_tasks and n_sub:
            for index in range(n_sub):
                text = _set_in(text, f"task.{section}", key, value, occurrence=index)
            if n_sub >= n_tasks:
                return text
    return _set_in(text, section, key, value)


def _set_in(text: str, section: str, key: str, value: str, occurrence: int = 0) -> str:
    """Set the key in the ``occurrence``-th table headed ``[section]`` (0: the first)."""
    lines = text.splitlines()
    current = None
    seen = -1
    section_end: int | None = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            if current == section and section_end is None:
                section_end = i
            current = stripped.strip("[]").strip()
            if current == section:
                seen += 1
                if seen != occurrence:
                    current = None
        elif stripped.startswith("[["):
            if current == section and section_end is None:
                section_end = i
            current = None
        elif current == section and stripped.split("=")[0].strip() == key and "=" in stripped:
            comment = line[line.index("  #"):].strip() if "  #" in line else ""
            lines[i] = f"{key} = {value}" + (f"  {comment}" if comment else "")
            return "\n".join(lines) + "\n"
    if current == section and section_end is None:
        section_end = len(lines)
    if section_end is None:
        return text.rstrip("\n") + f"\n\n[{section}]\n{key} = {value}\n"
    # before the blank lines and column-0 comments (examples, notes) that close the table
    while section_end > 0 and (not lines[section_end - 1].strip() or lines[section_end - 1].startswith("#")):
        section_end -= 1
    lines.insert(section_end, f"{key} = {value}")
    return "\n".join(lines) + "\n"
