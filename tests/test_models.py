"""Architecture resolution: built-ins, torchvision, user factories, ArchSpec/parse_arch."""

from __future__ import annotations

import dataclasses
import math
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from chanprune_cli.errors import UserError
from chanprune_cli.models import (
    ArchSpec,
    OptionAShortcut,
    build_model,
    builtin_archs,
    default_input_shape,
    parse_arch,
)

BUILTINS = sorted(builtin_archs())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_builds_runs_and_traces(name: str) -> None:
    spec = ArchSpec(name)
    model = build_model(spec).eval()
    shape = default_input_shape(spec)
    assert shape is not None
    x = torch.randn(2, *shape)
    with torch.no_grad():
        y = model(x)
        traced = torch.fx.symbolic_trace(model)
        assert y.shape == (2, 10)
        assert torch.allclose(traced(x), y)


def test_builtin_descriptions() -> None:
    archs = builtin_archs()
    assert {"cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110", "digits_cnn"} <= set(archs)
    assert all(isinstance(d, str) and d and "\n" not in d for d in archs.values())


@pytest.mark.parametrize(("name", "count"), [("cifar_resnet20", 269722), ("cifar_resnet56", 853018)])
def test_cifar_resnet_param_counts(name: str, count: int) -> None:
    assert n_params(build_model(ArchSpec(name))) == count


def test_cifar_resnet_structure_and_keys() -> None:
    model = build_model(ArchSpec("cifar_resnet20"))
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.bn2.bias", "layer3.2.conv2.weight",
            "linear.weight", "linear.bias"} <= keys
    assert not any("shortcut" in k for k in keys)  # option A: weightless shortcuts
    for stage, planes in ((model.layer2, 32), (model.layer3, 64)):
        sc = stage[0].shortcut
        assert isinstance(sc, OptionAShortcut)
        assert (sc.pad_front, sc.pad_back) == (planes // 4, planes // 4)
        assert stage[0].conv1.stride == (2, 2)
        assert not isinstance(stage[1].shortcut, OptionAShortcut)
    assert not isinstance(model.layer1[0].shortcut, OptionAShortcut)
    # Kaiming-normal (fan_in, gain sqrt 2) like the reference: std ≈ sqrt(2 / 27) for the stem.
    std = model.conv1.weight.std().item()
    assert 0.7 * math.sqrt(2 / 27) < std < 1.3 * math.sqrt(2 / 27)


def test_cifar_resnet_num_classes_and_kwarg_checks() -> None:
    model = build_model(ArchSpec("cifar_resnet20", {"num_classes": 100}))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(UserError, match="num_classes"):
        build_model(ArchSpec("cifar_resnet20", {"depth": 3}))
    with pytest.raises(UserError, match="positive integer"):
        build_model(ArchSpec("cifar_resnet20", {"num_classes": 0}))


def test_digits_cnn_width_and_flatten_linear() -> None:
    model = build_model(ArchSpec("digits_cnn", {"width": 2, "num_classes": 5}))
    assert model.conv1.out_channels == 32
    assert model.fc1.in_features == 64 * 4 * 4
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 5)
    graph = torch.fx.symbolic_trace(model).graph
    assert any(n.op == "call_function" and n.target is torch.flatten for n in graph.nodes)
    with pytest.raises(UserError, match="width"):
        build_model(ArchSpec("digits_cnn", {"width": -1}))


def test_default_input_shape() -> None:
    assert default_input_shape(ArchSpec("cifar_resnet56")) == (3, 32, 32)
    assert default_input_shape(ArchSpec("digits_cnn")) == (1, 8, 8)
    assert default_input_shape(ArchSpec("torchvision:resnet18")) == (3, 224, 224)
    assert default_input_shape(ArchSpec("pkg.mod:factory")) is None
    assert default_input_shape(None) is None


def test_torchvision_resnet18_with_num_classes() -> None:
    model = build_model(parse_arch("torchvision:resnet18", '{"num_classes": 7}'))
    assert isinstance(model, nn.Module)
    assert model.fc.out_features == 7
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("kwargs", [{"weights": "DEFAULT"}, {"weights": "IMAGENET1K_V1"}, {"pretrained": True}])
def test_torchvision_never_downloads(kwargs: dict) -> None:
    with pytest.raises(UserError, match="download"):
        build_model(ArchSpec("torchvision:resnet18", kwargs))


def test_torchvision_weights_none_is_fine() -> None:
    assert isinstance(build_model(ArchSpec("torchvision:resnet18", {"weights": None})), nn.Module)


def test_torchvision_unknown_model() -> None:
    with pytest.raises(UserError, match="resnet18"):
        build_model(ArchSpec("torchvision:resnet81"))
    with pytest.raises(UserError, match="num_klasses|cannot build"):
        build_model(ArchSpec("torchvision:resnet18", {"num_klasses": 3}))


def _write_module(tmp_path: Path, body: str) -> str:
    name = f"userpkg_{uuid.uuid4().hex[:8]}"  # unique: sys.modules caches earlier tests' modules
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(body))
    return name


def test_user_factory_from_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _write_module(
        tmp_path,
        """
        import torch.nn as nn

        def make_net(width=4, num_classes=3):
            return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

        class Builders:
            @staticmethod
            def small():
                return make_net(2)

        not_a_model = lambda: 42
        value = 3
        """,
    )
    monkeypatch.chdir(tmp_path)
    model = build_model(parse_arch(f"{name}.nets:make_net", '{"width": 6}'))
    assert model[0].out_channels == 6
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 3)
    assert build_model(ArchSpec(f"{name}.nets:Builders.small"))[0].out_channels == 2
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        build_model(ArchSpec(f"{name}.nets:not_a_model"))
    with pytest.raises(UserError, match="not callable"):
        build_model(ArchSpec(f"{name}.nets:value"))
    with pytest.raises(UserError, match="no attribute"):
        build_model(ArchSpec(f"{name}.nets:missing"))
    with pytest.raises(UserError, match="failed"):
        build_model(ArchSpec(f"{name}.nets:make_net", {"bogus": 1}))
    with pytest.raises(UserError, match="cannot import"):
        build_model(ArchSpec("no_such_pkg_xyz.mod:make"))
    with pytest.raises(UserError, match="package.module:factory"):
        build_model(ArchSpec("bad name:make"))


def test_unknown_arch_lists_options() -> None:
    with pytest.raises(UserError) as info:
        build_model(ArchSpec("resnet_nonsense"))
    msg = str(info.value)
    assert "cifar_resnet56" in msg and "digits_cnn" in msg
    assert "torchvision:" in msg and "package.module:factory" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="cifar_resnet56"):
        build_model(ArchSpec("cifar_resnet65"))
    with pytest.raises(UserError, match="torchvision:resnet18"):
        build_model(ArchSpec("resnet18"))


def test_parse_arch() -> None:
    assert parse_arch("digits_cnn", None) == ArchSpec("digits_cnn", {})
    assert parse_arch("digits_cnn", "") == ArchSpec("digits_cnn", {})
    assert parse_arch("digits_cnn", '{"width": 2}').kwargs == {"width": 2}
    assert parse_arch("digits_cnn", {"width": 2}).kwargs == {"width": 2}
    for bad in ("{width: 2}", "[1, 2]", "3", '"x"'):
        with pytest.raises(UserError, match="arch-kwargs") as info:
            parse_arch("digits_cnn", bad)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        parse_arch("", None)


def test_archspec_json_hash_and_immutability() -> None:
    kwargs = {"num_classes": 10, "nested": {"a": [1, 2]}}
    spec = ArchSpec("cifar_resnet20", kwargs)
    kwargs["num_classes"] = 99  # the spec keeps its own copy
    assert spec.kwargs["num_classes"] == 10
    again = ArchSpec.from_json(spec.to_json())
    assert again == spec and hash(again) == hash(spec)
    assert len({spec, again, ArchSpec("cifar_resnet20", {"nested": {"a": [1, 2]}, "num_classes": 10})}) == 1
    assert ArchSpec("x", {"a": 1}) != ArchSpec("x", {"a": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(UserError):
        ArchSpec("x", {"f": object()})
    with pytest.raises(UserError):
        ArchSpec.from_json({"kwargs": {}})
