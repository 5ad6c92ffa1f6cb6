"""Model zoo: building, fingerprints, the flat-vector view and custom factories."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from meshd.errors import ModelError
from meshd.task.models import BUILTIN_MODELS, ModelSpec, build_model, fingerprint, flatten, load_flat, param_count


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_builtin_models_build_and_run(name: str) -> None:
    spec = ModelSpec(name)
    model = build_model(spec, input_dim=40, seed=0)
    out = model(torch.randn(3, 40, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (3, 10)
    assert param_count(model) == flatten(model).numel() == sum(p.numel() for p in model.parameters())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_cnn1d_layout() -> None:
    model = build_model(ModelSpec("cnn1d", channels=(4, 8), kernel_size=3), input_dim=40, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(1, 4, 1), (4, 8, 2)]
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert linear.in_features == 8 * 20  # stride 2 halves the length 40


def test_mlp_hidden_sizes() -> None:
    model = build_model(ModelSpec("mlp", hidden=(32, 16)), input_dim=64, seed=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 10)]


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_init_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    before = torch.get_rng_state()
    a = flatten(build_model(ModelSpec(name), 40, seed=7))
    b = flatten(build_model(ModelSpec(name), 40, seed=7))
    c = flatten(build_model(ModelSpec(name), 40, seed=8))
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.abs().max() <= 1.0


def test_fingerprint_same_spec_equal_and_seed_independent() -> None:
    spec = ModelSpec("mlp")
    fp1 = fingerprint(spec, build_model(spec, 64, seed=0), 64)
    fp2 = fingerprint(spec, build_model(spec, 64, seed=99), 64)
    assert fp1 == fp2
    assert len(fp1) == 32 and int(fp1, 16) >= 0


def _fp(spec: ModelSpec, input_dim: int = 64) -> str:
    return fingerprint(spec, build_model(spec, input_dim, seed=0), input_dim)


def test_fingerprint_differs_for_different_architectures() -> None:
    base = _fp(ModelSpec("mlp", hidden=(64,)))
    others = [
        _fp(ModelSpec("mlp", hidden=(32,))),
        _fp(ModelSpec("mlp", hidden=(64, 64))),
        _fp(ModelSpec("mlp", hidden=(64,), num_classes=5)),
        _fp(ModelSpec("mlp", hidden=(64,)), input_dim=40),
        _fp(ModelSpec("logreg")),
    ]
    assert len({base, *others}) == 1 + len(others)
    assert _fp(ModelSpec("cnn1d", kernel_size=3), 40) != _fp(ModelSpec("cnn1d", kernel_size=5), 40)


def test_flatten_load_flat_round_trip_is_exact() -> None:
    spec = ModelSpec("cnn1d")
    a = build_model(spec, 40, seed=1)
    b = build_model(spec, 40, seed=2)
    vec = flatten(a)
    assert vec.dtype == torch.float64 and vec.dim() == 1
    original = vec.clone()
    load_flat(b, vec)
    assert torch.equal(vec, original)  # load_flat does not touch its input
    assert torch.equal(flatten(b), vec)
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(x), b(x))
    # flatten returns a copy: editing it does not change the model
    vec.zero_()
    assert torch.equal(flatten(b), original)


def test_load_flat_rejects_bad_vectors() -> None:
    model = build_model(ModelSpec("logreg"), 8, seed=0)
    n = param_count(model)
    with pytest.raises(ModelError, match=f"has {n + 1} values, the model needs {n}"):
        load_flat(model, torch.zeros(n + 1, dtype=torch.float64))
    with pytest.raises(ModelError, match="1-D"):
        load_flat(model, torch.zeros(1, n, dtype=torch.float64))
    with pytest.raises(ModelError, match="floating point"):
        load_flat(model, torch.zeros(n, dtype=torch.int64))


class _WithBuffers(nn.Module):
    scale: torch.Tensor
    counter: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 0.5))
        self.register_buffer("counter", torch.tensor(3, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) * self.scale
        return out


def test_float_buffers_are_shared_integer_buffers_are_not() -> None:
    m = _WithBuffers()
    assert param_count(m) == 3 * 2 + 2 + 2
    vec = flatten(m)
    # state_dict order: a module's own parameters and buffers come before its children's
    assert torch.equal(vec[:2], torch.full((2,), 0.5, dtype=torch.float64))
    vec[:2] = 2.0
    load_flat(m, vec)
    assert torch.equal(m.scale, torch.full((2,), 2.0))
    assert int(m.counter) == 3


@pytest.fixture()
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"meshd_test_factory_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tiny(input_dim, num_classes):
                return nn.Sequential(nn.Linear(input_dim, 5), nn.Tanh(), nn.Linear(5, num_classes))

            def not_a_module(input_dim, num_classes):
                return 42

            def broken(input_dim, num_classes):
                raise RuntimeError("no GPU here")

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_custom_factory(factory_module: str) -> None:
    spec = ModelSpec(f"{factory_module}:tiny", num_classes=4)
    before = torch.get_rng_state()
    model = build_model(spec, input_dim=6, seed=3)
    assert torch.equal(before, torch.get_rng_state())
    assert model(torch.zeros(2, 6)).shape == (2, 4)
    assert torch.equal(flatten(model), flatten(build_model(spec, input_dim=6, seed=3)))
    assert not torch.equal(flatten(model), flatten(build_model(spec, input_dim=6, seed=4)))
    assert fingerprint(spec, model, 6) != fingerprint(ModelSpec("mlp", hidden=(5,), num_classes=4), model, 6)


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("not_a_module", "factory returned int, expected torch.nn.Module"),
        ("broken", "raised RuntimeError: no GPU here"),
        ("missing", "has no attribute 'missing'"),
        ("NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
    ],
)
def test_bad_custom_factory_errors_clearly(factory_module: str, attr: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(ModelSpec(f"{factory_module}:{attr}"), input_dim=6, seed=0)


def test_custom_factory_module_not_found() -> None:
    with pytest.raises(ModelError, match=r"cannot import module 'no_such_pkg_meshd\.mod'"):
        build_model(ModelSpec("no_such_pkg_meshd.mod:factory"), input_dim=6, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet"}, "unknown model 'resnet'"),
        ({"name": "pkg.mod:"}, "package.module:factory"),
        ({"name": ":factory"}, "package.module:factory"),
        ({"name": "mlp", "hidden": (64, 0)}, "model.hidden must hold positive integers"),
        ({"name": "cnn1d", "channels": ()}, "at least one conv layer"),
        ({"name": "cnn1d", "kernel_size": 0}, "kernel_size"),
        ({"name": "logreg", "num_classes": 1}, "num_classes must be an integer >= 2"),
    ],
)
def test_spec_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        ModelSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_accepts_lists_as_tuples() -> None:
    spec = ModelSpec("mlp", hidden=[8, 4])  # type: ignore[arg-type]
    assert spec.hidden == (8, 4)
    assert hash(spec) == hash(ModelSpec("mlp", hidden=(8, 4)))


def test_cnn1d_tiny_input_still_builds() -> None:
    model = build_model(ModelSpec("cnn1d", channels=(2, 2, 2), kernel_size=4), input_dim=1, seed=0)
    assert model(torch.zeros(2, 1)).shape == (2, 10)


def test_bad_input_dim() -> None:
    with pytest.raises(ModelError, match="input_dim"):
        build_model(ModelSpec("logreg"), input_dim=0, seed=0)
