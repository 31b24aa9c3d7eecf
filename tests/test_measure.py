"""Parameters, MACs, accuracy, latency and device resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chanprune_cli.errors import UserError
from chanprune_cli.measure import (
    count_macs,
    count_params,
    evaluate,
    file_size_mb,
    measure_latency,
    per_module_macs,
)
from chanprune_cli.support.device import resolve_device


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 3*8*9 = 216 params
        nn.BatchNorm2d(8),  # 16 params (γ, β)
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, stride=2),  # 8*4 + 4 = 36 params
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),  # 40 + 10 = 50 params
    )


# Hand count at 3×16×16 (fvcore's convention: one multiply-add = one MAC; eval-mode BN with
# affine = 2 per element; adaptive average pooling = 1 per input element; biases are free).
CONV1 = 3 * 8 * 9 * 16 * 16  # 55 296
BN = 2 * 8 * 16 * 16  # 4 096
CONV2 = 8 * 4 * 8 * 8  # 2 048
POOL = 4 * 8 * 8  # 256
LINEAR = 4 * 10  # 40
TOTAL = CONV1 + BN + CONV2 + POOL + LINEAR


def test_count_params() -> None:
    assert count_params(_small_net()) == 216 + 16 + 36 + 50


def test_count_macs_hand_computed_and_model_untouched() -> None:
    net = _small_net()
    net.train()
    net[1].eval()  # mixed per-module flags must come back exactly
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert count_macs(net, (3, 16, 16)) == TOTAL
    assert net.training and not net[1].training and net[3].training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN stats unchanged
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_per_module_macs_leaves_only() -> None:
    macs = per_module_macs(_small_net(), [3, 16, 16])
    assert macs == {"0": CONV1, "1": BN, "2": 0, "3": CONV2, "4": POOL, "5": 0, "6": LINEAR}


def test_count_macs_bad_shape_is_user_error() -> None:
    with pytest.raises(UserError, match="input shape"):
        count_macs(_small_net(), (1, 16, 16))


def test_cifar_resnet56_macs() -> None:
    from chanprune_cli.models import ArchSpec, build_model

    model = build_model(ArchSpec("cifar_resnet56", {}))
    assert count_params(model) == 853_018
    assert abs(count_macs(model, (3, 32, 32)) / 1e6 - 126.6) < 0.1


class _Identity(nn.Module):
    """Logits are the inputs themselves: accuracy is known exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _loader(logits: torch.Tensor, labels: list[int], batch_size: int = 3) -> DataLoader:
    return DataLoader(TensorDataset(logits, torch.tensor(labels)), batch_size=batch_size)


def test_evaluate_exact_top1_top5_and_loss() -> None:
    # 6 classes; the true class's rank per sample: 1, 1, 2, 6, 1, 5.
    base = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # class 0 ranks first ... class 5 last
    logits = base.repeat(6, 1)
    labels = [0, 0, 1, 5, 0, 4]
    result = evaluate(_Identity(), _loader(logits, labels), "cpu", progress=False)
    assert result["images"] == 6
    assert result["top1"] == pytest.approx(100.0 * 3 / 6)
    assert result["top5"] == pytest.approx(100.0 * 5 / 6)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, torch.tensor(labels)).item(), rel=1e-6)


def test_evaluate_few_classes_and_max_batches() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    result = evaluate(_Identity(), _loader(logits, [0, 0, 0, 1], batch_size=2), "cpu", progress=False)
    assert result["top1"] == pytest.approx(50.0) and result["top5"] == pytest.approx(100.0)  # top-2 of 2
    limited = evaluate(_Identity(), _loader(logits, [0, 0, 0, 1], batch_size=2), "cpu", max_batches=1, progress=False)
    assert limited["images"] == 2 and limited["top1"] == pytest.approx(50.0)


def test_evaluate_restores_mode_and_checks_labels() -> None:
    net = _small_net()
    net.train()
    data = torch.randn(4, 3, 8, 8)
    result = evaluate(net, _loader(data, [0, 1, 2, 3]), torch.device("cpu"))
    assert net.training and result["images"] == 4 and 0.0 <= result["top1"] <= 100.0
    with pytest.raises(UserError, match="model outputs 10"):
        evaluate(net, _loader(data, [0, 1, 2, 10]), "cpu", progress=False)


def test_measure_latency() -> None:
    net = _small_net()
    threads = torch.get_num_threads()
    result = measure_latency(net, (3, 16, 16), 4, "cpu", warmup=1, repeats=5, threads=1)
    assert torch.get_num_threads() == threads
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["mean_ms"] > 0 and result["throughput_ips"] > 0
    assert net.training
    with pytest.raises(UserError):
        measure_latency(net, (3, 16, 16), 0, "cpu")


def test_file_size_mb(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"\0" * (1 << 19))
    assert file_size_mb(path) == pytest.approx(0.5)
    with pytest.raises(UserError):
        file_size_mb(tmp_path / "missing")


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown --device"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match="1 CUDA device"):
        resolve_device("cuda:1")
