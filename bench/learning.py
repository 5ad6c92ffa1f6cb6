"""Learning parity: meshd (real daemons) against centralized, local-only and FedAvg on the same split.

Two scenarios, each on one split that every method trains on, with the same optimizer (SGD lr 0.01,
momentum 0.9, batch 32) and the same initial weights (``models.initial_seed``, mesh seed 0):

- ``mnist1d``: MNIST-1D (``meshd.task.datasets.load_mnist1d_dataset``, 40,000 samples, seed 0), a shared test set of
  8,000 rows, the rest split over 16 domains by a Dirichlet(0.1) label split (seed 0); model ``cnn1d``.
- ``digits``: scikit-learn's digits, 20 % shared test set, 8 domains, Dirichlet(0.1); model ``mlp``.

Methods:

(a) ``centralized``: one model on the pooled training rows. Its x position at S steps is S / domains (the same
    total compute as S local steps in every domain).
(b) ``local_only``: every domain alone, one local epoch per round, never averaged.
(c) ``fedavg``: in process, a central server: each round every domain starts from the global model and runs
    one local epoch; the server averages the results weighted by examples. Bytes per domain per round =
    2 x the model at f32 (down + up). Time = the sequential training time on one thread (no evaluation).
(d) ``meshd``: real ``meshd run`` daemons on loopback (:class:`meshd.ops.localmesh.LocalMesh`), **default config**
    apart from model, data, optimizer, evaluation interval and logging. The daemons start with training off;
    when all run, one config reload turns it on everywhere (t = 0). Accuracy is each domain's own model (the
    one ``/status``, ``meshd export`` and ``GET /v1/model`` serve): every ``sample_interval_s`` the bench fetches
    every domain's served model (``GET /v1/model``, with the local SGD steps it was served at) and its
    ``/status``, and scores the models on the shared test set after the daemons have stopped, as FedAvg's
    time leaves its evaluation out (scoring 8,000 rows in 16 daemons every 3 s took about 15 % of this
    machine's cores from the training it measures). Its x position is the mean over domains of the steps the
    served models were fetched at; bytes = the mean over domains of whole envelopes sent + received (pings
    and pulls included). Time = elapsed wall time of all daemons sharing this machine's cores (crypto, HTTP
    and the bench's fetches included).

Comparisons, all from this one run: accuracy (mean and worst domain) at equal local steps per domain (linear
interpolation between measured points), bytes per domain to reach the accuracy FedAvg has after its last
round, and wall time to a target mean accuracy. The steps each daemon actually did are recorded.

    .venv/bin/python bench/learning.py [--scenario mnist1d|digits|all] [--quick] [--out DIR]

Writes ``DIR/learning.json`` and ``DIR/learning.png`` (default ``bench/results``) and prints tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load

from meshd.ops.config_template import set_key
from meshd.ops.localmesh import LocalMesh, MeshLayout, build_mesh, get_status, load_dataset
from meshd.task import models
from meshd.task.data import DataProduct, load_data_product
from meshd.task.learner import Learner, TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
BATCH, LR, MOMENTUM = 32, 0.01, 0.9
F32 = 4
OVERRIDES: dict[str, dict[str, str]] = {}  # --set: daemon config keys that differ from the defaults
NO_EVAL_S = 3600.0  # meshd: the daemons score their model once, at start; the bench scores what they serve
SETTLE_S = 6.0  # meshd: seconds of gossip alone after training is switched off ("after consensus")


@dataclass(frozen=True)
class Scenario:
    name: str
    dataset: str
    samples: int
    domains: int
    alpha: float
    model: str
    test_fraction: float
    min_per_domain: int
    rounds: int  # FedAvg / local-only rounds (one local epoch each)
    marks: tuple[int, ...]  # local SGD steps per domain at which methods are compared
    target_accuracy: float | None  # wall time to this mean accuracy
    mesh_max_s: float  # meshd stops training at FedAvg's last step count, or after this long
    sample_interval_s: float  # meshd: the served models are fetched this often


MNIST1D = Scenario("mnist1d", "mnist1d", 40_000, 16, 0.1, "cnn1d", 0.2, 50, 100, (1000, 2000, 4000), 0.90,
                   900.0, 2.0)
DIGITS = Scenario("digits", "digits", 0, 8, 0.1, "mlp", 0.2, 20, 100, (100, 200, 400), None, 300.0, 0.5)
QUICK = {"mnist1d": Scenario("mnist1d", "mnist1d", 10_000, 16, 0.1, "cnn1d", 0.2, 20, 60, (200, 400, 800), 0.70,
                             240.0, 2.0),
         "digits": DIGITS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("mnist1d", "digits", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="MNIST-1D with 10,000 samples and 60 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=TOML",
                        help="override a daemon config key (recorded in the results); default: none")
    args = parser.parse_args()
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.rpartition(".")
        OVERRIDES.setdefault(section, {})[name] = value
    torch.set_num_threads(1)  # like every daemon (training.threads = 1)
    names = ("mnist1d", "digits") if args.scenario == "all" else (args.scenario,)
    scenarios = [QUICK[n] if args.quick else {"mnist1d": MNIST1D, "digits": DIGITS}[n] for n in names]
    started = time.monotonic()
    out: dict[str, Any] = {
        "bench": "learning", "mode": "quick" if args.quick else "full",
        "optimizer": {"lr": LR, "momentum": MOMENTUM, "batch_size": BATCH, "init": "models.initial_seed(mesh seed 0)"},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpus": os.cpu_count(), "load_average_at_start": _loadavg()},
        "overrides": OVERRIDES,
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        for sc in scenarios:
            print(f"\n=== {sc.name}: {sc.domains} domains, Dirichlet {sc.alpha}, {sc.model} ===", flush=True)
            out["scenarios"][sc.name] = bench(sc, Path(tmp) / sc.name)
            print(summary(sc.name, out["scenarios"][sc.name]), flush=True)
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning.json").write_text(json.dumps(out, indent=1))
    plot(args.out / "learning.png", out)
    print(f"\nwrote {args.out / 'learning.json'} and {args.out / 'learning.png'} ({out['elapsed_s']:.0f} s in all)")
    return 0


# --- one scenario ------------------------------------------------------------------------------------------------


def bench(sc: Scenario, workdir: Path) -> dict[str, Any]:
    data = load_dataset(sc.dataset, SEED, sc.samples) if sc.samples else load_dataset(sc.dataset, SEED)
    num_classes = int(data[1].max()) + 1
    settings = {
        "model": {"name": f'"{sc.model}"'},
        "data": {"holdout": "0.0"},
        "training": {"enabled": "false", "lr": str(LR), "momentum": str(MOMENTUM), "batch_size": str(BATCH),
                     "eval_interval_s": str(NO_EVAL_S), "local_baseline": "false"},
        "log": {"level": '"warning"'},
    }
    for section, kv in OVERRIDES.items():
        settings.setdefault(section, {}).update(kv)
    layout = build_mesh(workdir, sc.domains, dataset=sc.dataset, alpha=sc.alpha, seed=SEED,
                        min_per_domain=sc.min_per_domain, settings=settings, data=data,
                        test_fraction=sc.test_fraction)
    domains = [load_data_product(d.directory / "data.npz", "label", None, 0.0, num_classes, SEED + i)
               for i, d in enumerate(layout.domains)]
    test = load_data_product(layout.test_path, "label", None, 0.0, num_classes, SEED)
    spec = models.ModelSpec(name=sc.model, num_classes=num_classes)
    init = models.flatten(models.build_model(spec, test.input_dim, models.initial_seed(spec, test.input_dim, 0)))
    model_bytes = int(init.numel()) * F32
    rows = [d.num_train for d in domains]
    print(f"rows per domain {min(rows)}..{max(rows)} (pooled {sum(rows)}), test {test.num_train}; "
          f"{sc.model}: {init.numel()} parameters", flush=True)
    res: dict[str, Any] = {"scenario": asdict(sc), "parameters": int(init.numel()), "domain_rows": rows,
                           "domain_classes": [list(d.classes) for d in layout.domains]}
    res["fedavg"] = run_fedavg(spec, init, domains, test, sc, model_bytes)
    print(_line("fedavg", res["fedavg"]), flush=True)
    res["centralized"] = run_centralized(spec, init, domains, test, sc)
    print(_line("centralized", res["centralized"]), flush=True)
    res["local_only"] = run_local_only(spec, init, domains, test, sc)
    print(_line("local_only", res["local_only"]), flush=True)
    fed_steps = res["fedavg"]["curve"][-1]["steps"]
    res["meshd"] = run_meshd(layout, sc, fed_steps, spec, test)
    print(_line("meshd", res["meshd"]), flush=True)
    res["comparison"] = compare(res, sc)
    return res


def _learners(spec: models.ModelSpec, domains: list[DataProduct]) -> list[Learner]:
    cfgs = [TrainConfig(batch_size=BATCH, lr=LR, momentum=MOMENTUM, seed=SEED + i) for i in range(len(domains))]
    return [Learner(models.build_model(spec, d.input_dim, 0), d, c) for d, c in zip(domains, cfgs, strict=True)]


def _epoch_steps(d: DataProduct) -> int:
    return math.ceil(d.num_train / BATCH)


def run_fedavg(spec: models.ModelSpec, init: torch.Tensor, domains: list[DataProduct], test: DataProduct,
               sc: Scenario, model_bytes: int) -> dict[str, Any]:
    learners = _learners(spec, domains)
    weights = torch.tensor([d.num_train for d in domains], dtype=torch.float64)
    weights = weights / weights.sum()
    steps = [_epoch_steps(d) for d in domains]
    mean_steps = sum(steps) / len(steps)
    g = init.clone()
    curve = [_point(0.0, 0.0, 0, [_eval(learners[0], g, test)])]
    t_train = 0.0
    for rnd in range(1, sc.rounds + 1):
        t = time.perf_counter()
        local = [lr.train(g, k)[0] for lr, k in zip(learners, steps, strict=True)]
        g = torch.stack(local).mul(weights.unsqueeze(1)).sum(dim=0)
        t_train += time.perf_counter() - t
        curve.append(_point(t_train, rnd * mean_steps, rnd * 2 * model_bytes, [_eval(learners[0], g, test)], rnd))
    return {"curve": curve, "steps_per_round_per_domain": steps,
            "note": "central server, synchronous, one local epoch per round, weighted by examples; simulated on "
                    "one thread; bytes = 2 x model (f32) per domain per round"}


def run_centralized(spec: models.ModelSpec, init: torch.Tensor, domains: list[DataProduct], test: DataProduct,
                    sc: Scenario) -> dict[str, Any]:
    import dataclasses

    pooled = dataclasses.replace(domains[0], train_x=torch.cat([d.train_x for d in domains]),
                                 train_y=torch.cat([d.train_y for d in domains]))
    (learner,) = _learners(spec, [pooled])
    per_round = sum(_epoch_steps(d) for d in domains)  # the same total compute as one FedAvg round
    flat = init.clone()
    curve = [_point(0.0, 0.0, 0, [_eval(learner, flat, test)])]
    t_train = 0.0
    for rnd in range(1, sc.rounds + 1):
        t = time.perf_counter()
        flat, _ = learner.train(flat, per_round)
        t_train += time.perf_counter() - t
        if rnd % 2 == 0 or rnd == sc.rounds:
            curve.append(_point(t_train, rnd * per_round / len(domains), 0, [_eval(learner, flat, test)], rnd))
    return {"curve": curve, "note": "one model on the pooled rows; x = its steps / domains (equal total compute); "
                                    "moving the raw data is not counted in bytes"}


def run_local_only(spec: models.ModelSpec, init: torch.Tensor, domains: list[DataProduct], test: DataProduct,
                   sc: Scenario) -> dict[str, Any]:
    learners = _learners(spec, domains)
    steps = [_epoch_steps(d) for d in domains]
    mean_steps = sum(steps) / len(steps)
    flats = [init.clone() for _ in domains]
    curve = [_point(0.0, 0.0, 0, [_eval(learners[0], init, test)] * len(domains))]
    t_train = 0.0
    every = max(1, sc.rounds // 10)
    for rnd in range(1, sc.rounds + 1):
        t = time.perf_counter()
        flats = [lr.train(f, k)[0] for lr, f, k in zip(learners, flats, steps, strict=True)]
        t_train += time.perf_counter() - t
        if rnd % every == 0 or rnd == sc.rounds:
            accs = [_eval(lr, f, test) for lr, f in zip(learners, flats, strict=True)]
            curve.append(_point(t_train, rnd * mean_steps, 0, accs, rnd))
    return {"curve": curve, "note": "every domain alone, one epoch per round, never averaged"}


def run_meshd(layout: MeshLayout, sc: Scenario, stop_steps: float, spec: models.ModelSpec,
              test: DataProduct) -> dict[str, Any]:
    mesh = LocalMesh(layout)
    ticks: list[tuple[float, dict[str, dict[str, Any]], dict[str, bytes]]] = []
    final: dict[str, bytes] = {}
    last: dict[str, dict[str, Any]] = {}
    try:
        t_launch = time.monotonic()
        mesh.start()
        mesh.wait_running(timeout=300.0)
        startup = time.monotonic() - t_launch
        print(f"  meshd: {len(layout.domains)} daemons running after {startup:.1f} s; training on (reload)", flush=True)
        _set_training(mesh, layout, True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < sc.mesh_max_s:  # bounded by mesh_max_s; ends early at FedAvg's steps
            time.sleep(sc.sample_interval_s)  # the measurement's interval
            t = time.monotonic() - t0
            statuses = {d.name: get_status(d.status_url, timeout=5.0) for d in layout.domains}
            served = {d.name: get_model(d.status_url) for d in layout.domains}
            if any(s is None for s in statuses.values()) or any(m is None for m in served.values()):
                continue
            last = {n: s for n, s in statuses.items() if s is not None}
            ticks.append((t, last, {n: m for n, m in served.items() if m is not None}))
            if sum(_model_steps(m) for m in ticks[-1][2].values()) / len(served) >= stop_steps:
                break
        _set_training(mesh, layout, False)
        time.sleep(SETTLE_S)  # gossip alone ("after consensus")
        final = {d.name: m for d in layout.domains if (m := get_model(d.status_url)) is not None}
    finally:
        codes = mesh.stop(timeout=30.0)
    if not ticks:
        raise RuntimeError("meshd: no daemon served a model")
    print(f"  meshd: scoring {len(ticks)} x {len(layout.domains)} served models on the test set", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)  # the daemons are gone: the scoring may use every core
    module = models.build_model(spec, test.input_dim, 0)
    scorer = Learner(models.build_model(spec, test.input_dim, 0), test, TrainConfig(batch_size=BATCH))
    curve = []
    for t, at_tick, models_at in ticks:
        accs = [_eval(scorer, _model_flat(m, module), test) for m in models_at.values()]
        steps = [_model_steps(m) for m in models_at.values()]
        nbytes = sum(_bytes(s) for s in at_tick.values()) / len(at_tick)
        per = {n: [round(a, 4), k] for n, a, k in zip(models_at, accs, steps, strict=True)}
        curve.append(_point(t, sum(steps) / len(steps), nbytes, accs) | {"domains": per})
    torch.set_num_threads(1)
    accs = [_eval(scorer, _model_flat(m, module), test) for m in final.values()]
    after = {"mean": sum(accs) / len(accs), "worst": min(accs), "settle_s": SETTLE_S} if accs else {}
    per_domain = [{"domain": n, "rows": s["training"]["train_rows"], "steps": s["training"]["steps"],
                   "epochs": s["training"]["epochs"], "paced_waits": s["training"]["paced_waits"],
                   "gossip_rounds": s["gossip"]["rounds"], "bytes": _bytes(s),
                   "rejected": s["gossip"]["rejected"], "threads": s["training"]["threads"]}
                  for n, s in last.items()]
    return {"curve": curve, "after_consensus": after, "startup_s": round(startup, 1), "exit_codes": codes,
            "per_domain": per_domain,
            "note": "real daemons on loopback sharing this machine, default config; accuracy = each domain's own "
                    "served model, fetched from GET /v1/model during the run and scored after the daemons stopped"}


def get_model(status_url: str, timeout: float = 5.0) -> bytes | None:
    """The daemon's served model now (``GET /v1/model``: safetensors), or ``None`` when it does not answer."""
    try:
        with urllib.request.urlopen(status_url + "/v1/model", timeout=timeout) as resp:
            body: bytes = resp.read()
            return body
    except (urllib.error.URLError, OSError):
        return None


def _model_steps(body: bytes) -> int:
    return int(_safetensors_meta(body)["meshd.steps"])


def _safetensors_meta(body: bytes) -> dict[str, str]:
    size = int.from_bytes(body[:8], "little")
    meta: dict[str, str] = json.loads(body[8:8 + size]).get("__metadata__", {})
    return meta


def _model_flat(body: bytes, module: torch.nn.Module) -> torch.Tensor:
    """The flat model (``models.flatten`` layout) of a ``GET /v1/model`` body, through ``module``."""
    tensors = safetensors_load(body)
    module.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("input.")})
    return models.flatten(module)


def _bytes(status: dict[str, Any]) -> int:
    g = status["gossip"]
    return int(g.get("bytes_sent", 0)) + int(g.get("bytes_received", 0))


def _set_training(mesh: LocalMesh, layout: MeshLayout, on: bool) -> None:
    for d in layout.domains:
        d.config.write_text(set_key(d.config.read_text(), "training", "enabled", "true" if on else "false"))
        mesh.procs[d.name].send_signal(signal.SIGHUP)


# --- comparisons ----------------------------------------------------------------------------------------------


def compare(res: dict[str, Any], sc: Scenario) -> dict[str, Any]:
    methods = ("centralized", "fedavg", "meshd", "local_only")
    at_steps = {str(m): {k: _at(res[k]["curve"], "steps", m) for k in methods} for m in sc.marks}
    fed_last = res["fedavg"]["curve"][-1]
    target = fed_last["mean"]
    mesh_bytes = _first_reaching(res["meshd"]["curve"], target, "bytes_per_domain")
    out: dict[str, Any] = {
        "at_steps": at_steps,
        "bytes": {"target": f"FedAvg's accuracy after {sc.rounds} rounds", "target_accuracy": target,
                  "fedavg_bytes": fed_last["bytes_per_domain"], "meshd_bytes": mesh_bytes,
                  "ratio": None if mesh_bytes is None else mesh_bytes / fed_last["bytes_per_domain"]},
        "meshd_steps_done": {"mean": res["meshd"]["curve"][-1]["steps"],
                             "per_domain": {d["domain"]: d["steps"] for d in res["meshd"]["per_domain"]}},
    }
    if sc.target_accuracy is not None:
        fed_t = _first_reaching(res["fedavg"]["curve"], sc.target_accuracy, "t_s")
        mesh_t = _first_reaching(res["meshd"]["curve"], sc.target_accuracy, "t_s")
        out["time"] = {"target_accuracy": sc.target_accuracy, "fedavg_sequential_s": fed_t, "meshd_s": mesh_t,
                       "ratio": None if fed_t is None or mesh_t is None else mesh_t / fed_t}
    return out


def _at(curve: list[dict[str, Any]], key: str, x: float) -> dict[str, float] | None:
    """Mean and worst accuracy at ``x`` (linear interpolation between the two measured points around it)."""
    for a, b in itertools.pairwise(curve):
        if a[key] <= x <= b[key]:
            f = 0.0 if b[key] == a[key] else (x - a[key]) / (b[key] - a[key])
            return {k: a[k] + f * (b[k] - a[k]) for k in ("mean", "worst")}
    return None


def _first_reaching(curve: list[dict[str, Any]], accuracy: float, key: str) -> float | None:
    """``key`` (bytes or time) where the mean accuracy first reaches ``accuracy``, interpolated."""
    for a, b in itertools.pairwise(curve):
        if b["mean"] >= accuracy:
            if a["mean"] >= accuracy:
                return float(a[key])
            f = (accuracy - a["mean"]) / (b["mean"] - a["mean"])
            return float(a[key] + f * (b[key] - a[key]))
    return None


# --- helpers ----------------------------------------------------------------------------------------------------


def _eval(learner: Learner, flat: torch.Tensor, test: DataProduct) -> float:
    return learner.evaluate(flat, test.train_x, test.train_y)


def _point(t: float, steps: float, nbytes: float, accs: list[float], rnd: int | None = None) -> dict[str, Any]:
    p = {"t_s": round(t, 3), "steps": round(steps, 1), "bytes_per_domain": int(nbytes),
         "mean": float(np.mean(accs)), "worst": float(min(accs))}
    if rnd is not None:
        p["round"] = rnd
    return p


def _line(method: str, r: dict[str, Any]) -> str:
    last = r["curve"][-1]
    return (f"  {method:<12} mean {last['mean']:.3f} worst {last['worst']:.3f} at {last['steps']:.0f} steps/domain, "
            f"{last['t_s']:.1f} s, {last['bytes_per_domain'] / 1e6:.2f} MB/domain")


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def summary(name: str, res: dict[str, Any]) -> str:
    c = res["comparison"]
    lines = [f"\n{name}: accuracy on the shared test set at equal local SGD steps per domain (mean / worst domain)"]
    lines.append(f"  {'steps':>6}  {'centralized':>11}  {'FedAvg':>13}  {'meshd':>13}  {'local-only':>13}")
    for mark, row in c["at_steps"].items():
        cells = []
        for k in ("centralized", "fedavg", "meshd", "local_only"):
            v = row[k]
            cells.append("-" if v is None else (f"{v['mean']:.3f}" if k == "centralized"
                                                 else f"{v['mean']:.3f} / {v['worst']:.3f}"))
        lines.append(f"  {mark:>6}  {cells[0]:>11}  {cells[1]:>13}  {cells[2]:>13}  {cells[3]:>13}")
    b = c["bytes"]
    mesh_mb = None if b["meshd_bytes"] is None else b["meshd_bytes"] / 1e6
    lines.append(f"  bytes per domain to reach {b['target_accuracy']:.3f} ({b['target']}): FedAvg "
                 f"{b['fedavg_bytes'] / 1e6:.2f} MB, meshd {_f(mesh_mb, '.2f')} MB (x {_f(b['ratio'], '.2f')})")
    if "time" in c:
        t = c["time"]
        lines.append(f"  wall time to {t['target_accuracy']:.2f} mean accuracy: FedAvg (sequential, 1 thread) "
                     f"{_f(t['fedavg_sequential_s'], '.1f')} s, meshd ({len(res['domain_rows'])} daemons) "
                     f"{_f(t['meshd_s'], '.1f')} s (x {_f(t['ratio'], '.2f')})")
    m = res["meshd"]
    steps = [d["steps"] for d in m["per_domain"]]
    lines.append(f"  meshd steps per domain: mean {np.mean(steps):.0f}, min {min(steps)}, max {max(steps)} "
                 f"(rows {min(res['domain_rows'])}..{max(res['domain_rows'])}); after {SETTLE_S:g} s of gossip with "
                 f"training off: mean {_f(m['after_consensus'].get('mean'))}, "
                 f"worst {_f(m['after_consensus'].get('worst'))}")
    return "\n".join(lines)


def plot(path: Path, out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["scenarios"])
    fig, axes = plt.subplots(len(names), 3, figsize=(16, 4.6 * len(names)), squeeze=False)
    colors = {"centralized": "black", "local_only": "tab:red", "fedavg": "tab:blue", "meshd": "tab:green"}
    for row, name in enumerate(names):
        res = out["scenarios"][name]
        for ax, key, label in zip(axes[row], ("steps", "bytes_per_domain", "t_s"),
                                  ("local SGD steps per domain", "MB per domain (sent + received)",
                                   "wall time, s (FedAvg/centralized: 1 thread; meshd: daemons sharing the cores)"),
                                  strict=True):
            for method in ("centralized", "fedavg", "meshd", "local_only"):
                if key == "bytes_per_domain" and method in ("centralized", "local_only"):
                    continue
                curve = res[method]["curve"]
                xs = [p[key] / (1e6 if key == "bytes_per_domain" else 1) for p in curve]
                ax.plot(xs, [p["mean"] for p in curve], color=colors[method], label=f"{method} mean")
                if method in ("meshd", "local_only"):
                    ax.plot(xs, [p["worst"] for p in curve], color=colors[method], ls=":", label=f"{method} worst")
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy, shared test set")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            ax.set_title(f"{name}: accuracy vs {label.split(',')[0].split(' (')[0]}")
    fig.suptitle(f"meshd learning parity ({out['mode']} run, {out['machine']['cpus']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
