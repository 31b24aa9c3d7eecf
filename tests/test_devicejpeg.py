"""JPEG training images decoded where the model runs (`finetune --device-decode`, data/devicejpeg.py).

On the CPU the same code runs with the CPU as the device: the workers read bytes and draw the crops,
the batch is decoded by torchvision and resized by torch. Images are 90-140 px (large: above the
64 px of the tensor path), and the model is a two-layer CNN, so each test takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from chanprune_cli.checkpoint import save_chanprune
from chanprune_cli.cli import app
from chanprune_cli.data import open_dataset
from chanprune_cli.data.devicejpeg import DeviceJpegDecoder
from chanprune_cli.errors import UserError
from chanprune_cli.models import build_model, parse_arch
from chanprune_cli.train import TrainConfig, Trainer
from chanprune_cli.train.sampling import KeyedDataset, KeyedEncoded, collate_encoded, collate_labels

runner = CliRunner()


def _write_images(root: Path, *, gray: bool = False, classes: int = 2, per_class: int = 8, suffix: str = ".jpg") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(90, 140, size=2))
            yy, xx = np.mgrid[0:h, 0:w]
            rgb = np.stack([xx * 255 / w, yy * 255 / h, ((xx + yy) % 32) * 8], -1) + rng.normal(0, 8, (h, w, 3)) + 20 * c
            image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
            (image.convert("L") if gray else image).save(root / f"c{c}" / f"{i}{suffix}", quality=90)
    return root


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_images(tmp_path_factory.mktemp("rgb") / "train")


def _batches(ds: Any, items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loader path's batch and the device-decode path's batch of the same keyed items."""
    loader_x, loader_y = collate_labels([KeyedDataset(ds)[item] for item in items])
    indices, encoded, boxes, flips, labels = collate_encoded([KeyedEncoded(ds)[item] for item in items])
    return loader_x, loader_y, DeviceJpegDecoder(ds, torch.device("cpu")).batch(indices, encoded, boxes, flips), labels


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_device_decoded_batches_are_the_loader_batches_within_rounding(tmp_path: Path, gray: bool, train: bool) -> None:
    # Same crops and flips (the data set's draws, seeded per item); pixels differ by PIL's
    # resampling against torch's antialiased bilinear resize, rounded to whole grey levels.
    root = _write_images(tmp_path / "imgs", gray=gray)
    ds = open_dataset(str(root), input_shape=(1 if gray else 3, 72, 72), train=train)
    loader_x, loader_y, device_x, device_y = _batches(ds, [(123, i) for i in range(len(ds))])
    assert device_x.shape == loader_x.shape == (16, 1 if gray else 3, 72, 72)
    assert torch.equal(device_y, loader_y)
    grey_levels = ((device_x - loader_x) * ds._std_t * 255).abs()
    assert grey_levels.mean() < 0.5
    assert grey_levels.flatten().quantile(0.99) <= 1.5
    if train:  # a different key draws other crops: the draws are really applied
        _, _, other_x, _ = _batches(ds, [(124, i) for i in range(len(ds))])
        assert ((other_x - device_x) * ds._std_t * 255).abs().mean() > 5


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _fit(ds: Any, **cfg: Any) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _SmallCNN()
    options = {"max_steps": 4, "batch_size": 8, "lr": 0.05, "progress": False, "save_every": None, **cfg}
    trainer = Trainer(model, ds, TrainConfig(**options), device=torch.device("cpu"))
    return trainer.inputs.kind, trainer.fit().model.state_dict()


def test_device_decode_trains_reproducibly_whatever_the_workers(rgb_folder: Path) -> None:
    ds = open_dataset(str(rgb_folder), input_shape=(3, 72, 72), train=True)
    kind, in_process = _fit(ds, device_decode=True, workers=0)
    _, with_workers = _fit(ds, device_decode=True, workers=2)
    assert kind == "device-decode"
    assert all(torch.equal(in_process[k], with_workers[k]) for k in in_process)
    _, loader = _fit(ds, workers=0)  # the loader path: other pixels, so other (close) weights
    assert not all(torch.equal(in_process[k], loader[k]) for k in in_process)


def test_data_that_cannot_be_decoded_on_the_device_is_refused(tmp_path: Path, rgb_folder: Path) -> None:
    small = open_dataset(str(rgb_folder), input_shape=(3, 48, 48), train=True)
    with pytest.raises(UserError, match=r"--device-decode: .*held as one tensor instead"):
        _fit(small, device_decode=True)
    with pytest.raises(UserError, match="only image folders"):
        _fit(open_dataset("synthetic:3x72x72:2:16"), device_decode=True)
    mixed = _write_images(tmp_path / "mixed", per_class=4)
    _write_images(mixed, classes=1, per_class=1, suffix=".png")
    with pytest.raises(UserError, match=r"1 of its 9 images are not JPEG files, e\.g\. .*0\.png"):
        _fit(open_dataset(str(mixed), input_shape=(3, 72, 72), train=True), device_decode=True)
    with pytest.raises(UserError, match="two input paths"):
        _fit(open_dataset(str(rgb_folder), input_shape=(3, 72, 72), train=True), device_decode=True, tensor_cache=True)


def test_a_corrupt_jpeg_is_named(tmp_path: Path) -> None:
    root = _write_images(tmp_path / "imgs", per_class=4)
    bad = root / "c1" / "2.jpg"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)  # header intact (it is indexed), pixels gone
    bad.write_bytes(bytes(data))
    ds = open_dataset(str(root), input_shape=(3, 72, 72), train=True)
    with pytest.raises(UserError, match=r"could not decode image .*c1/2\.jpg"):
        _fit(ds, device_decode=True, batch_size=8, max_steps=2)


def test_finetune_device_decode_end_to_end(tmp_path: Path, rgb_folder: Path) -> None:
    ckpt = tmp_path / "r20.safetensors"
    spec = parse_arch("cifar_resnet20", '{"num_classes": 2, "width": 0.5}')
    torch.manual_seed(0)
    save_chanprune(ckpt, build_model(spec), spec, input_shape=(3, 72, 72), history=[], plans=[])
    out, report = tmp_path / "ft.safetensors", tmp_path / "ft.json"
    args = ["finetune", str(ckpt), "--data", str(rgb_folder), "--max-steps", "2", "--batch-size", "8",
            "--threads", "1", "--device", "cpu", "--out", str(out), "--json", str(report)]
    result = runner.invoke(app, [*args, "--device-decode"])
    assert result.exit_code == 0, result.output
    assert "decoded, cropped, resized and flipped on the device" in result.output
    assert json.loads(report.read_text())["train"]["input"] == "device-decode"
    refused = runner.invoke(app, [*args, "--device-decode", "--input-shape", "3,32,32", "--force"])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "--device-decode: the training data cannot be decoded on the device" in refused.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decoded_batches_are_the_cpu_decoded_batches_within_rounding(rgb_folder: Path) -> None:
    # nvJPEG's inverse DCT, chroma upsampling and colour conversion round differently from
    # libjpeg-turbo's (a few grey levels, more at sharp colour edges); the draws, so the crops, match.
    ds = open_dataset(str(rgb_folder), input_shape=(3, 72, 72), train=True)
    items = [(7, i) for i in range(len(ds))]
    indices, encoded, boxes, flips, _ = collate_encoded([KeyedEncoded(ds)[item] for item in items])
    on_cpu = DeviceJpegDecoder(ds, torch.device("cpu")).batch(indices, encoded, boxes, flips)
    on_cuda = DeviceJpegDecoder(ds, torch.device("cuda")).batch(indices, encoded, boxes, flips)
    assert on_cuda.device.type == "cuda"
    grey_levels = ((on_cuda.cpu() - on_cpu) * ds._std_t * 255).abs()
    assert grey_levels.mean() < 1.0 and grey_levels.flatten().quantile(0.99) <= 3
