"""Push-sum gossip averaging with local SGD between exchanges. Pure: no clock, no I/O, no asyncio.

The maths is push-sum (Kempe, Dobra, Gehrke 2003) with local training applied to the numerator between
exchanges, as in Stochastic Gradient Push (Assran et al. 2019), made tolerant of lost messages by
*acknowledged shares*.

A node holds a numerator ``s`` (flat float64 vector) and a weight ``w``; its model is ``z = s / w``.
The mesh-wide sums ``S = sum(s)`` and ``W = sum(w)`` are the *mass*; gossip only moves mass between
nodes, so every node's ``z`` converges to ``S / W``, which (training off) is the exact mean of the
starting models.

Sending (push) is two-phase, so that a lost message loses no mass:

1. ``shares = ps.prepare(k)`` builds ``k`` shares of ``1/(k+1)`` of the node's *free* mass each (free =
   weight not already promised to pending shares, so ``w`` can never reach 0). A share carries
   ``values`` = ``z`` quantized by the codec (exactly what the receiver will decode) and a ``weight``.
   Nothing is subtracted yet.
2. The caller sends ``codec.encode(share.values, ps.codec)``, ``share.weight`` and ``share.version``.
   When the peer acknowledges, ``ps.confirm(share.id)`` subtracts ``share.values * share.weight`` and
   ``share.weight`` -- exactly what the receiver's ``merge`` added, whatever happened to the local state
   in between, so the mass is conserved. When the send fails, ``ps.abandon(share.id)`` and nothing
   changes. Unknown ids are a no-op returning ``False``.

A message delivered twice would be merged twice and *create* mass; the wire's replay guard drops the
duplicate, this module does not (and cannot) detect it.

Receiving: ``ps.merge(values, weight, version)`` adds ``values * weight`` to ``s`` and ``weight`` to ``w``
after checking the values (finite, float64, right length, ``|v| <= max_abs``) and the weight (finite, in
``(0, max_weight]``); on failure it raises ``RejectedUpdate("bad_values")`` and the state is untouched.
It returns the consensus distance of the incoming model to the local one and keeps a running mean of
the last ``DISTANCE_WINDOW`` of them (``mean_distance``).

Training: the caller trains a copy of ``ps.estimate()`` (in a worker thread) and then calls
``ps.apply_update(z_trained - z_start)``, which adds ``delta * w`` to ``s``: the local model moves by
``delta`` and merges that happened during training are kept. ``version`` counts updates (+1 each, up to
``MAX_VERSION`` = 2**53); a merge takes ``max(version, incoming)`` but raises it by at most ``MAX_VERSION_STEP``
(versions above ``MAX_VERSION`` are refused); ``is_far_behind(v, threshold)`` tells a node to pull.

Pull (late joiner): the responder calls ``share = ps.split_for_pull(fraction, floor)``, which subtracts
``fraction`` (at most a half) of its free mass immediately (the response is one-shot: if it is lost, that
mass is lost), or returns ``None`` and changes nothing when the free weight left would fall below
``floor``: repeated pulls cannot drain a node's weight towards 0, where ``s / w`` loses precision and an
answer would carry weight 0. A fresh node (no
checkpoint: its random init carries nothing the mesh should average in) calls ``adopt(values, weight,
version)``, which replaces its state; a node with real state calls ``merge`` instead.

Data weighting (FedAvg's "weighted by examples", without a central party): each domain's local update
is applied with the scale ``rows_i / mean_rows`` (:func:`data_scale`), so that the mesh-wide mass moves by
``sum_i (rows_i / mean_rows) * delta_i * w_i``; with ``w_i`` near 1 at consensus, the mean model moves by
``sum_i (rows_i / sum_j rows_j) * delta_i``: each domain's update counts in proportion to its examples, as in
FedAvg's weighted average, whatever number of steps each domain takes. The mesh's
mean number of rows is itself estimated by push-sum, in the same messages: every node also holds a *rows
numerator* ``r`` (initially ``rows_i * w_i``); a share carries ``rows = r / w`` and moves ``rows * weight``
exactly as the model's mass moves (added on merge, subtracted on confirm), so ``r_i / w_i`` converges to
``sum(rows) / sum(w)``, the mean rows per domain, and no node learns another's row count once the first
exchanges have mixed. ``inject_rows(n)`` adds a change of the domain's own rows (a data product that grew).

Serving (``ServedModel``): a domain's push-sum estimate right after local steps on its own (often 2-3-class)
data leans towards its own classes; on a skewed split that costs tens of points on every class it lacks,
although the mesh's average model (``S / W``) is good. The model a domain serves is therefore its estimate
blended with the models its peers sent it. By default (``kind = "peers"``) it is the mean of the estimate and
of one entry for each of the last ``window`` distinct peers heard: that peer's models smoothed in time (an EMA
with time constant ``smooth_s``: a peer heard often counts with its models of about the last ``smooth_s``
seconds, one heard rarely with its latest). Every peer counts once however often it sends (the big domains
exchange most often, and an average over every share received leaned towards their classes), and no peer's
entry lags it by more than about ``smooth_s`` (an EMA over every share lagged the mesh by about ``window / 2``
exchanges). Peers' leanings point to different classes and largely cancel, so the
served model tracks the mesh average. ``kind = "ema"`` is the older blend, ``(z + window * ema) / (window +
1)``. With training off it converges to the same consensus as the estimate. It is never sent: gossip and
training use the estimate, so the averaging maths above is unchanged.

Checkpoints: ``ps.state()`` -> ``PushSumState`` (numerator, weight, version, rows numerator), restored with
``PushSum.from_state(state)``. Pending shares are not part of it: a checkpoint counts their mass as
still held (as if abandoned).

Public API::

    Share(id, values: Tensor, weight, version, rows, encoded: (codec, bytes) | None)  # frozen
    PushSumState(numerator: Tensor, weight: float, version: int, rows: float)      # frozen
    RejectedUpdate(reason: str, detail: str = "")                        # MeshdError, ValueError
    consensus_distance(z_self, z_other, eps=1e-12) -> float              # relative L2
    SERVE_KINDS = ("peers", "ema")
    ServedModel(window, kind="peers", stale_s=60.0, smooth_s=0.0)        # what a domain serves
        .observe(values, peer=b"", now=0.0) .settle(values) .unsettle() .value(own, now=None) -> Tensor
        .reset() .reconfigure(window, kind, smooth_s) -> bool .window .kind .observed .settled
    data_scale(own_rows, mean_rows) -> float                              # rows / mean, clamped
    PushSum(values, weight=1.0, version=0, *, max_abs=1e6, max_weight=1e9, codec="f32",
            max_pending=64, rows=0.0)
        .dim .codec .weight .version .merges .rounds .pending .mean_distance .mean_rows  (read-only)
        .estimate() -> Tensor                  # float64 copy of s / w
        .numerator() -> Tensor                 # float64 copy of s
        .prepare(k, at_most=None, keep=0.0) -> list[Share]  # may return fewer than k (pending bound), or []
        .confirm(share_id) -> bool
        .abandon(share_id) -> bool
        .abandon_all() -> int
        .merge(values, weight, version, rows=None) -> float
        .apply_update(delta, scale=1.0) -> None
        .inject_rows(rows) -> None
        .split_for_pull(fraction=0.5, floor=0.0) -> Share | None
        .adopt(values, weight, version, rows=None, keep_own_weight=False) -> None
        .check(values, weight, what="merge") -> None  # merge's validation alone (merge rules screen first)
        .limit_weight(ceiling) -> float        # scale the free mass down to w <= ceiling; model unchanged
        .is_far_behind(incoming_version, threshold) -> bool
        .state() -> PushSumState
        PushSum.from_state(state, **options) -> PushSum
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from meshd.core.codec import CODECS, CodecName, quantize_encoded
from meshd.errors import MeshdError

DISTANCE_WINDOW = 16
_MIN_SHARE_WEIGHT = 1e-200  # below this a share is pointless (and s / w would lose precision)
MAX_ROWS = 1e12  # a rows estimate beyond this is refused (no data product has a trillion rows per domain)
# Bounds of the data-weighting scale: a domain never counts for more than 64 average domains, or for less
# than 1/64 of one, whatever the estimate says (it is far off only before the first exchanges).
SCALE_MIN, SCALE_MAX = 1.0 / 64, 64.0
# Versions count local updates. They stay far below 2**63 (msgpack's int range, checkpoint encoding): a
# version above MAX_VERSION is refused, a merge raises the local version by at most MAX_VERSION_STEP (an
# honest peer is at most a few rounds of updates ahead; a hostile one cannot fast-forward us), and local
# updates stop counting at MAX_VERSION (2**53: a thousand updates a second for 285,000 years).
MAX_VERSION = 2**53
MAX_VERSION_STEP = 1024


class RejectedUpdate(MeshdError, ValueError):
    """An incoming model or local update was refused; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class Share:
    """Mass to send: ``values`` (float64, already codec-quantized) carried with ``weight``."""

    id: int
    values: torch.Tensor
    weight: float
    version: int
    rows: float = 0.0  # the sender's estimate of the mesh's mean rows per domain; moves rows * weight
    encoded: tuple[str, bytes] | None = None  # (codec, ``values`` encoded in it), from the quantizing pass


@dataclass(frozen=True)
class PushSumState:
    """What a checkpoint needs: numerator, weight, version and the rows numerator."""

    numerator: torch.Tensor
    weight: float
    version: int
    rows: float = 0.0


def consensus_distance(z_self: torch.Tensor, z_other: torch.Tensor, eps: float = 1e-12) -> float:
    """``||z_self - z_other|| / max(||z_other||, eps)``: relative L2 distance."""
    diff = float(torch.linalg.vector_norm(z_self - z_other))
    return diff / max(float(torch.linalg.vector_norm(z_other)), eps)


def data_scale(own_rows: float, mean_rows: float) -> float:
    """The scale of a domain's local update: ``own_rows / mean_rows``, clamped to ``[SCALE_MIN, SCALE_MAX]``.

    1.0 when either is not positive (no estimate yet, or a domain with no rows): equal weighting.
    """
    if not (own_rows > 0 and mean_rows > 0 and math.isfinite(own_rows) and math.isfinite(mean_rows)):
        return 1.0
    return min(SCALE_MAX, max(SCALE_MIN, own_rows / mean_rows))


def _check_rows(rows: object) -> float:
    if not _is_real(rows) or not (0.0 <= float(rows) <= MAX_ROWS):  # type: ignore[arg-type]
        raise RejectedUpdate("bad_values", f"rows must be a number in [0, {MAX_ROWS:g}], got {rows!r}")
    return float(rows)  # type: ignore[arg-type]


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise RejectedUpdate("bad_values", f"version must be an int in [0, 2**53], got {version!r}")
    return version


SERVE_KINDS = ("peers", "ema")


class ServedModel:
    """The model a domain serves: its estimate blended with the models peers sent (see the module docstring).

    ``kind = "peers"``: the mean of the estimate and one entry for each of the last ``window`` distinct peers
    heard, its models smoothed with time constant ``smooth_s`` (0: its latest model; a peer silent for
    ``stale_s`` drops out). ``kind = "ema"``: the estimate blended with an EMA
    of every model received, ``(z + window * ema) / (window + 1)``. ``window = 0``: the estimate itself."""

    def __init__(self, window: int, kind: str = "peers", stale_s: float = 60.0, smooth_s: float = 0.0) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an int >= 0, got {window!r}")
        if kind not in SERVE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SERVE_KINDS)}, got {kind!r}")
        self.window = window
        self.kind = kind
        self.stale_s = stale_s
        if not (math.isfinite(smooth_s) and smooth_s >= 0.0):
            raise ValueError(f"smooth_s must be a finite number >= 0, got {smooth_s!r}")
        self.smooth_s = smooth_s
        self._beta = 2.0 / (window + 1)
        self._ema: torch.Tensor | None = None
        self._latest: OrderedDict[bytes, tuple[torch.Tensor, float]] = OrderedDict()
        self._sum: torch.Tensor | None = None
        self._settled: torch.Tensor | None = None
        self.observed = 0

    def observe(self, values: torch.Tensor, peer: bytes = b"", now: float = 0.0) -> None:
        """``peer``'s model arrived at ``now`` (already checked and merged): fold it in. ``peer`` ``b""``: a
        model from before a restart (the served model a checkpoint kept), dropped once real peers are heard."""
        if self.window == 0:
            return
        vals = values.detach().to(dtype=torch.float64)
        self.observed += 1
        if self.kind == "ema":
            if self._ema is None or self._ema.shape != vals.shape:
                self._ema = vals.clone()
            else:
                self._ema.mul_(1.0 - self._beta).add_(vals, alpha=self._beta)
            return
        if self._sum is None or self._sum.shape != vals.shape:
            self._latest.clear()
            self._sum = torch.zeros_like(vals)
        if peer and b"" in self._latest and len(self._latest) >= min(self.window, 3):
            self._drop(b"")
        kept = vals.to(torch.float32)
        if peer in self._latest:
            old, then = self._latest[peer]
            self._drop(peer)
            if self.smooth_s > 0.0 and old.shape == kept.shape:
                # An EMA in time: a peer heard often is averaged over about smooth_s seconds of its models, one
                # heard rarely is its latest model.
                alpha = 1.0 - math.exp(-max(0.0, now - then) / self.smooth_s)
                kept = old + (kept - old) * alpha
        # Kept in float32 (half the memory of a window of models); the float64 sum adds and later subtracts
        # the same float32 values, so it drifts only by float64 rounding.
        self._latest[peer] = (kept, now)
        self._sum.add_(kept)
        while len(self._latest) > self.window:
            self._drop(next(iter(self._latest)))

    def _drop(self, peer: bytes) -> None:
        old, _ = self._latest.pop(peer)
        assert self._sum is not None
        self._sum.sub_(old)

    def settle(self, values: torch.Tensor) -> None:
        """The domain's estimate right after a settle phase (exchanges with no training in between): serve it
        until the next one, instead of the blend."""
        self._settled = values.detach().to(dtype=torch.float64).clone()

    def unsettle(self) -> None:
        """Training stopped: serve the blend of the (now converging) estimate again."""
        self._settled = None

    @property
    def settled(self) -> bool:
        return self._settled is not None

    def value(self, own: torch.Tensor, now: float | None = None) -> torch.Tensor:
        """The served model for the domain's current estimate ``own`` (``own`` itself before any share);
        ``now``: peers' models older than ``stale_s`` are dropped first."""
        if self._settled is not None and self._settled.shape == own.shape:
            return self._settled.clone()
        if self.kind == "ema":
            if self._ema is None or self._ema.shape != own.shape:
                return own.clone()
            return (own + self._ema * self.window) / (self.window + 1)
        if now is not None:
            for peer in [p for p, (_, t) in self._latest.items() if p and now - t > self.stale_s]:
                self._drop(peer)
        if self._sum is None or self._sum.shape != own.shape or not self._latest:
            return own.clone()
        return (own + self._sum) / (len(self._latest) + 1)

    def reset(self) -> None:
        self._ema = None
        self._latest.clear()
        self._sum = None
        self._settled = None
        self.observed = 0

    def reconfigure(self, window: int, kind: str, smooth_s: float) -> bool:
        """A reload changed ``gossip.serve*``: apply it in place; ``True`` when anything changed. A new kind
        starts from nothing (the estimate alone until peers are heard again); a smaller window drops the
        peers heard longest ago; a new ``smooth_s`` applies from the next model each peer sends."""
        fresh = ServedModel(window, kind, self.stale_s, smooth_s)  # validates, as the constructor does
        if (window, kind, smooth_s) == (self.window, self.kind, self.smooth_s):
            return False
        if kind != self.kind or window == 0:
            fresh._settled = self._settled
            self.__dict__.update(fresh.__dict__)
            return True
        self.window, self.smooth_s, self._beta = window, smooth_s, fresh._beta
        while len(self._latest) > window:
            self._drop(next(iter(self._latest)))
        return True


class PushSum:
    """One node's push-sum state; see the module docstring for the protocol.

    Not thread-safe: call it from one thread (the event loop); train on a copy of ``estimate()``.
    """

    def __init__(
        self,
        values: torch.Tensor,
        weight: float = 1.0,
        version: int = 0,
        *,
        max_abs: float = 1e6,
        max_weight: float = 1e9,
        codec: CodecName = "f32",
        max_pending: int = 64,
        rows: float = 0.0,
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r} (expected one of {', '.join(CODECS)})")
        if not (math.isfinite(max_abs) and max_abs > 0 and math.isfinite(max_weight) and max_weight > 0):
            raise ValueError("max_abs and max_weight must be finite and > 0")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or not values.is_floating_point():
            raise ValueError("values must be a 1-D floating-point tensor")
        self.codec: CodecName = codec
        self._max_abs = float(max_abs)
        self._max_weight = float(max_weight)
        self._max_pending = max_pending
        self._dim = int(values.shape[0])
        vals = values.detach().to(device="cpu", dtype=torch.float64)
        self._check(vals, weight, "initial state")
        version = _check_version(version)
        self._w = float(weight)
        self._s = vals * self._w
        self._version = version
        self._r = _check_rows(rows) * self._w
        self._merges = 0
        self._rounds = 0
        self._pending: dict[int, Share] = {}
        self._next_id = 1
        self._distances: deque[float] = deque(maxlen=DISTANCE_WINDOW)

    # -- read-only views ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Length of the flat model vector."""
        return self._dim

    @property
    def weight(self) -> float:
        """Current push-sum weight ``w`` (pending shares not yet subtracted)."""
        return self._w

    @property
    def version(self) -> int:
        """Update counter: +1 per ``apply_update``, ``max`` on merge."""
        return self._version

    @property
    def merges(self) -> int:
        """Number of accepted merges."""
        return self._merges

    @property
    def rounds(self) -> int:
        """Number of ``prepare`` calls that produced shares."""
        return self._rounds

    @property
    def pending(self) -> int:
        """Number of shares prepared and neither confirmed nor abandoned."""
        return len(self._pending)

    @property
    def mean_distance(self) -> float | None:
        """Mean consensus distance over the last ``DISTANCE_WINDOW`` merges; ``None`` before any."""
        if not self._distances:
            return None
        return math.fsum(self._distances) / len(self._distances)

    @property
    def mean_rows(self) -> float:
        """This node's push-sum estimate of the mesh's mean training rows per domain (``r / w``)."""
        return self._r / self._w

    def estimate(self) -> torch.Tensor:
        """The model ``z = s / w`` (a float64 copy)."""
        return self._s / self._w

    def numerator(self) -> torch.Tensor:
        """The numerator ``s`` (a float64 copy)."""
        return self._s.clone()

    def is_far_behind(self, incoming_version: int, threshold: int) -> bool:
        """True when a peer's version is more than ``threshold`` updates ahead of ours."""
        return incoming_version - self._version > threshold

    # -- validation --------------------------------------------------------------------------------

    def check(self, values: object, weight: object, what: str = "merge") -> None:
        """Raise ``RejectedUpdate("bad_values")`` unless ``values``/``weight`` are acceptable (as ``merge`` does)."""
        self._check(values, weight, what)

    def _check(self, values: object, weight: object, what: str) -> None:
        """Raise ``RejectedUpdate("bad_values")`` unless ``values``/``weight`` are acceptable."""
        if not isinstance(values, torch.Tensor):
            raise RejectedUpdate("bad_values", f"{what}: values are not a tensor")
        if values.dtype != torch.float64:
            raise RejectedUpdate("bad_values", f"{what}: dtype {values.dtype}, expected torch.float64")
        if values.dim() != 1 or int(values.shape[0]) != self._dim:
            raise RejectedUpdate("bad_values", f"{what}: shape {tuple(values.shape)}, expected ({self._dim},)")
        if not bool(torch.isfinite(values).all()):
            raise RejectedUpdate("bad_values", f"{what}: non-finite values")
        if self._dim and float(values.abs().max()) > self._max_abs:
            raise RejectedUpdate("bad_values", f"{what}: |value| above max_abs={self._max_abs}")
        if not _is_real(weight):
            raise RejectedUpdate("bad_values", f"{what}: weight is not a number ({weight!r})")
        w = float(weight)  # type: ignore[arg-type]  # _is_real checked int | float
        if not (math.isfinite(w) and 0.0 < w <= self._max_weight):
            raise RejectedUpdate("bad_values", f"{what}: weight {w!r} not in (0, {self._max_weight}]")

    # -- sending -----------------------------------------------------------------------------------

    def _free_weight(self) -> float:
        return self._w - math.fsum(share.weight for share in self._pending.values())

    def _new_id(self) -> int:
        share_id = self._next_id
        self._next_id += 1
        return share_id

    def prepare(self, k: int, at_most: float | None = None, keep: float = 0.0) -> list[Share]:
        """Up to ``k`` shares of ``1/(m+1)`` of the free mass each (``m`` = number returned), each of weight at
        most ``at_most`` when given (a push-pull answer never carries more weight than the share it answers).

        Fewer than ``k`` when the pending bound is reached; ``[]`` when nothing can be sent, or when the free
        weight left once they are confirmed would be below ``keep`` (the pull floor, for push-pull answers).
        Raises ``CodecError`` if the model cannot be represented in the codec (f16 overflow).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        m = min(k, self._max_pending - len(self._pending))
        if m <= 0:
            return []
        free = self._free_weight()
        share_weight = free / (m + 1)
        if at_most is not None:
            share_weight = min(share_weight, float(at_most))
        if not share_weight >= _MIN_SHARE_WEIGHT or free - m * share_weight < keep:
            return []
        values, payload = quantize_encoded(self._s / self._w, self.codec)
        rows = self._r / self._w
        shares = [Share(self._new_id(), values, share_weight, self._version, rows, (self.codec, payload))
                  for _ in range(m)]
        for share in shares:
            self._pending[share.id] = share
        self._rounds += 1
        return shares

    def confirm(self, share_id: int) -> bool:
        """The peer acknowledged: subtract the share's mass. ``False`` for an unknown id."""
        share = self._pending.pop(share_id, None)
        if share is None:
            return False
        self._s.sub_(share.values * share.weight)
        self._w -= share.weight
        self._r = max(0.0, self._r - share.rows * share.weight)
        return True

    def abandon(self, share_id: int) -> bool:
        """The send failed: forget the share, keep the mass. ``False`` for an unknown id."""
        return self._pending.pop(share_id, None) is not None

    def abandon_all(self) -> int:
        """Abandon every pending share (e.g. on shutdown); returns how many there were."""
        count = len(self._pending)
        self._pending.clear()
        return count

    def split_for_pull(self, fraction: float = 0.5, floor: float = 0.0) -> Share | None:
        """``fraction`` of the free mass for a pulling peer, subtracted immediately (one-shot response).

        ``None`` (nothing changes) when the free weight left would be below ``floor``, or the share would be
        too light to carry anything. ``fraction`` must be in ``(0, 0.5]``: an answer never gives away more
        than the responder keeps."""
        if not 0.0 < fraction <= 0.5:
            raise ValueError(f"fraction must be in (0, 0.5], got {fraction!r}")
        free = self._free_weight()
        share_weight = free * fraction
        if not share_weight >= _MIN_SHARE_WEIGHT or free - share_weight < floor:
            return None
        values, payload = quantize_encoded(self._s / self._w, self.codec)
        rows = self._r / self._w
        self._s.sub_(values * share_weight)
        self._w -= share_weight
        self._r = max(0.0, self._r - rows * share_weight)
        return Share(self._new_id(), values, share_weight, self._version, rows, (self.codec, payload))

    # -- receiving ---------------------------------------------------------------------------------

    def merge(self, values: torch.Tensor, weight: float, version: int, rows: float | None = None) -> float:
        """Add a peer's share; returns its consensus distance to our model before the merge.

        ``rows`` is the share's mean-rows estimate; ``None`` (a peer that sends none) counts as our own
        estimate, which leaves it unchanged. Raises ``RejectedUpdate("bad_values")`` (state untouched) on
        bad values, weight, version or rows.
        """
        self._check(values, weight, "merge")
        version = _check_version(version)
        share_rows = self.mean_rows if rows is None else _check_rows(rows)
        distance = consensus_distance(self._s / self._w, values)
        self._s.add_(values.detach() * float(weight))
        self._w += float(weight)
        self._r += share_rows * float(weight)
        self._version = max(self._version, min(version, self._version + MAX_VERSION_STEP))
        self._merges += 1
        self._distances.append(distance)
        return distance

    def limit_weight(self, ceiling: float) -> float:
        """Scale the free mass (not promised to pending shares) down so that ``w <= ceiling``; the model
        after the pending shares leave is unchanged. Returns the weight removed (0.0 when under the ceiling,
        or when the pending shares alone exceed it: they leave soon)."""
        if not self._w > ceiling:
            return 0.0
        pending_w = math.fsum(share.weight for share in self._pending.values())
        free_w = self._w - pending_w
        if not (free_w > 0 and ceiling > pending_w):
            return 0.0
        factor = (ceiling - pending_w) / free_w
        pending_s = torch.zeros_like(self._s)
        for share in self._pending.values():
            pending_s.add_(share.values * share.weight)
        pending_r = math.fsum(share.rows * share.weight for share in self._pending.values())
        self._s = pending_s + (self._s - pending_s) * factor
        self._r = max(0.0, pending_r + (self._r - pending_r) * factor)
        removed = free_w * (1.0 - factor)
        self._w = pending_w + free_w * factor
        return removed

    def adopt(
        self, values: torch.Tensor, weight: float, version: int, rows: float | None = None,
        *, keep_own_weight: bool = False,
    ) -> None:
        """Replace the model with a pulled share (fresh node only: its own init is discarded).

        With ``keep_own_weight`` the node keeps its own weight too, now carrying the pulled model: the mesh's
        total weight then still counts every domain (one each), which the mean-rows estimate relies on, and
        the mesh average is unchanged (the added mass carries the mesh's own model). The node's own rows
        (its share of ``r``) are kept either way. Raises ``RejectedUpdate("bad_values")`` on bad input and
        ``RejectedUpdate("pending_shares")`` while shares are pending (their confirmation would subtract
        from the adopted mass).
        """
        self._check(values, weight, "adopt")
        version = _check_version(version)
        share_rows = self.mean_rows if rows is None else _check_rows(rows)
        if self._pending:
            raise RejectedUpdate("pending_shares", f"{len(self._pending)} shares still pending")
        own_w, own_r = self._w, self._r
        self._w = float(weight) + (own_w if keep_own_weight else 0.0)
        self._s = values.detach() * self._w
        self._r = share_rows * float(weight) + (own_r if keep_own_weight else 0.0)
        self._version = version
        self._distances.clear()

    # -- training ----------------------------------------------------------------------------------

    def apply_update(self, delta: torch.Tensor, scale: float = 1.0) -> None:
        """Local training moved the model by ``delta``: ``s += scale * delta * w``; ``version += 1``.

        ``scale`` is the data weighting (:func:`data_scale`); it must be finite and > 0.

        Raises ``RejectedUpdate("bad_update")`` (state untouched) for a non-finite or misshapen delta.
        ``w`` includes weight promised to pending shares, whose values predate the update: once they are
        confirmed the local model has moved by ``delta * w / (w - pending)`` (the mesh-wide mass moved by
        exactly ``delta * w`` either way).
        """
        if (
            not isinstance(delta, torch.Tensor)
            or delta.dim() != 1
            or int(delta.shape[0]) != self._dim
            or not delta.is_floating_point()
        ):
            raise RejectedUpdate("bad_update", f"delta must be a 1-D float tensor of length {self._dim}")
        if not (_is_real(scale) and math.isfinite(scale) and scale > 0):
            raise RejectedUpdate("bad_update", f"scale must be finite and > 0, got {scale!r}")
        step = delta.detach().to(device="cpu", dtype=torch.float64) * (self._w * float(scale))
        if not bool(torch.isfinite(step).all()):
            raise RejectedUpdate("bad_update", "non-finite delta")
        self._s.add_(step)
        self._version = min(MAX_VERSION, self._version + 1)

    def inject_rows(self, rows: float) -> None:
        """Add ``rows`` (may be negative) to this domain's contribution to the mesh's sum of rows."""
        if not (_is_real(rows) and math.isfinite(rows)):
            raise ValueError(f"rows must be a finite number, got {rows!r}")
        self._r = min(MAX_ROWS * self._w, max(0.0, self._r + float(rows)))

    # -- checkpoints -------------------------------------------------------------------------------

    def state(self) -> PushSumState:
        """Numerator, weight, version and rows numerator (pending shares counted as still held)."""
        return PushSumState(self._s.clone(), self._w, self._version, self._r)

    @classmethod
    def from_state(
        cls,
        state: PushSumState,
        *,
        max_abs: float = 1e6,
        max_weight: float = 1e9,
        codec: CodecName = "f32",
        max_pending: int = 64,
    ) -> PushSum:
        """Rebuild a node from ``state()``; raises ``RejectedUpdate("bad_values")`` on a bad state."""
        numerator, weight = state.numerator, state.weight
        if not isinstance(numerator, torch.Tensor) or numerator.dtype != torch.float64 or not _is_real(weight):
            raise RejectedUpdate("bad_values", "checkpoint: numerator must be a float64 tensor, weight a number")
        if not (math.isfinite(weight) and weight > 0):
            raise RejectedUpdate("bad_values", f"checkpoint: weight {weight!r} must be finite and > 0")
        node = cls(
            numerator / float(weight),
            float(weight),
            state.version,
            max_abs=max_abs,
            max_weight=max_weight,
            codec=codec,
            max_pending=max_pending,
        )
        node._s = numerator.detach().to(device="cpu").clone()  # bit-exact numerator, not (s / w) * w
        node._r = _check_rows(state.rows / float(weight)) * float(weight)
        return node
