"""Checkpoint reading in every form, the chanprune format, and refusal of bad/unsafe files."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chanprune_cli.checkpoint import (
    load_checkpoint,
    load_state_dict_file,
    nonfinite_tensors,
    safetensors_metadata,
    save_chanprune,
    tool_version,
)
from chanprune_cli.errors import UserError
from chanprune_cli.models import ArchSpec, build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DIGITS = ArchSpec("digits_cnn")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so a wrongly loaded buffer changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


@pytest.fixture()
def digits() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(build_model(DIGITS))


@pytest.fixture()
def x_digits() -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


def one_line_error(info: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------- state dicts and wrappers


def test_bare_state_dict(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    path = tmp_path / "bare.pt"
    torch.save(digits.state_dict(), path)
    ckpt = load_checkpoint(path, arch="digits_cnn")
    assert ckpt.arch == DIGITS and ckpt.source_format == "state_dict"
    assert not ckpt.model.training
    assert ckpt.history == [] and ckpt.plans == [] and ckpt.input_shape is None
    assert same_outputs(ckpt.model, digits, x_digits)


@pytest.mark.parametrize("key", ["state_dict", "model", "net", "model_state_dict"])
def test_wrapped_state_dict(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor, key: str) -> None:
    optimizer = torch.optim.SGD(digits.parameters(), lr=0.1, momentum=0.9)
    digits(x_digits).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    path = tmp_path / f"{key}.pth"
    torch.save({key: digits.state_dict(), "epoch": 3, "best_acc": torch.tensor(91.5), "optimizer": optimizer.state_dict()}, path)
    assert same_outputs(load_checkpoint(path, arch="digits_cnn").model, digits, x_digits)


def test_nested_wrapper_and_lone_unknown_key(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    path = tmp_path / "nested.pt"
    torch.save({"checkpoint": {"model": {"state_dict": digits.state_dict()}}, "step": 10}, path)
    assert same_outputs(load_checkpoint(path, arch="digits_cnn").model, digits, x_digits)


def test_ambiguous_weights_refused(tmp_path: Path, digits: nn.Module) -> None:
    path = tmp_path / "two.pt"
    torch.save({"a": digits.state_dict(), "b": digits.state_dict()}, path)
    with pytest.raises(UserError, match="several sets of weights") as info:
        load_checkpoint(path, arch="digits_cnn")
    one_line_error(info)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "net.module.", "module._orig_mod.", "model."])
def test_prefixes_stripped(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor, prefix: str) -> None:
    path = tmp_path / "prefixed.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in digits.state_dict().items()}}, path)
    assert same_outputs(load_checkpoint(path, arch="digits_cnn").model, digits, x_digits)


def test_num_batches_tracked_missing_or_extra(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    sd = {k: v for k, v in digits.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "no_nbt.pt")
    assert same_outputs(load_checkpoint(tmp_path / "no_nbt.pt", arch="digits_cnn").model, digits, x_digits)
    sd["extra.num_batches_tracked"] = torch.tensor(5)
    torch.save(sd, tmp_path / "extra_nbt.pt")
    assert same_outputs(load_checkpoint(tmp_path / "extra_nbt.pt", arch="digits_cnn").model, digits, x_digits)


def test_numpy_and_namespace_extras_load_safely(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    path = tmp_path / "extras.pt"
    torch.save({"state_dict": digits.state_dict(), "best_prec1": np.float64(91.7), "args": argparse.Namespace(lr=0.1),
                "hist": np.zeros(3)}, path)
    assert same_outputs(load_checkpoint(path, arch="digits_cnn").model, digits, x_digits)


def test_legacy_torch_format(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": digits.state_dict()}, path, _use_new_zipfile_serialization=False)
    assert same_outputs(load_checkpoint(path, arch="digits_cnn").model, digits, x_digits)


def test_cuda_saved_tensors_map_to_cpu(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    # Record every storage as living on cuda:0, as a GPU training run would.
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"state_dict": digits.state_dict()}, tmp_path / "cuda.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.load(tmp_path / "cuda.pt", weights_only=True)
    ckpt = load_checkpoint(tmp_path / "cuda.pt", arch="digits_cnn")
    assert all(p.device.type == "cpu" for p in ckpt.model.parameters())
    assert same_outputs(ckpt.model, digits, x_digits)


def test_state_dict_without_arch(tmp_path: Path, digits: nn.Module) -> None:
    path = tmp_path / "w.pt"
    torch.save({"state_dict": digits.state_dict(), "arch": "digits_cnn"}, path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    msg = one_line_error(info)
    assert str(path) in msg and "holds only weights" in msg and "--arch" in msg
    assert "cifar_resnet56" in msg and "torchvision:resnet18" in msg
    assert "'digits_cnn'" in msg  # the file's own hint is passed on


def test_arch_kwargs_applied(tmp_path: Path, x_digits: torch.Tensor) -> None:
    wide = randomize_bn(build_model(ArchSpec("digits_cnn", {"width": 2})))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    ckpt = load_checkpoint(tmp_path / "wide.pt", arch="digits_cnn", arch_kwargs='{"width": 2}')
    assert ckpt.arch == ArchSpec("digits_cnn", {"width": 2})
    assert same_outputs(ckpt.model, wide, x_digits)


def test_mismatched_weights_name_keys(tmp_path: Path) -> None:
    wide = build_model(ArchSpec("digits_cnn", {"width": 2}))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(UserError) as info:
        load_checkpoint(tmp_path / "wide.pt", arch="digits_cnn")
    msg = one_line_error(info)
    assert "conv1.weight (file [32, 1, 3, 3] vs model [16, 1, 3, 3])" in msg
    assert "more)" in msg  # only the first few are named

    sd = build_model(DIGITS).state_dict()
    del sd["fc2.weight"], sd["fc2.bias"]
    sd["head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "renamed.pt")
    with pytest.raises(UserError) as info:
        load_checkpoint(tmp_path / "renamed.pt", arch="digits_cnn")
    msg = one_line_error(info)
    assert "2 missing key(s): fc2.weight, fc2.bias" in msg
    assert "1 unexpected key(s): head.weight" in msg


def test_wrong_builtin_for_resnet(tmp_path: Path) -> None:
    state = build_model(ArchSpec("cifar_resnet20")).state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "r20.th")
    with pytest.raises(UserError, match=r"missing key\(s\): layer1\.3\.conv1\.weight"):
        load_checkpoint(tmp_path / "r20.th", arch="cifar_resnet32")


# ---------------------------------------------------------------- safetensors


def test_plain_safetensors(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    path = tmp_path / "weights.bin"  # detected by content, not extension
    save_file({k: v.contiguous() for k, v in digits.state_dict().items()}, str(path), metadata={"format": "pt"})
    with pytest.raises(UserError, match="--arch"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, arch="digits_cnn")
    assert ckpt.source_format == "safetensors"
    assert same_outputs(ckpt.model, digits, x_digits)
    assert set(load_state_dict_file(path)) == set(digits.state_dict())
    assert safetensors_metadata(path) == {"format": "pt"}


def _raw_safetensors(path: Path, header: dict[str, Any], data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "header_len", "match"),
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**15, "implausible header"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 5000, "truncated"),
        ({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}, b"\0" * 8, None, "outside the file"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, None, "does not match"),
        ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
        ({"w": [1, 2]}, b"", None, "malformed"),
        ({"__metadata__": {"a": 1}}, b"", None, "metadata"),
    ],
)
def test_lying_safetensors_headers(tmp_path: Path, header: dict, data: bytes, header_len: int | None, match: str) -> None:
    path = _raw_safetensors(tmp_path / "lie.safetensors", header, data, header_len)
    with pytest.raises(UserError, match=match) as info:
        load_checkpoint(path, arch="digits_cnn")
    assert str(path) in one_line_error(info)


def test_truncated_safetensors(tmp_path: Path, digits: nn.Module) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in digits.state_dict().items()}, str(path))
    data = path.read_bytes()
    for cut in (len(data) - 100, 200, 12):
        path.write_bytes(data[:cut])
        with pytest.raises(UserError) as info:
            load_checkpoint(path, arch="digits_cnn")
        one_line_error(info)


# ---------------------------------------------------------------- pickles


def test_whole_module_pickle_needs_trust(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    path = tmp_path / "whole.pt"
    torch.save(digits, path)
    with pytest.raises(UserError, match="--trust-pickle") as info:
        load_checkpoint(path)
    assert "pickled code/objects" in one_line_error(info)
    with pytest.raises(UserError, match="--trust-pickle"):
        load_checkpoint(path, arch="digits_cnn")
    ckpt = load_checkpoint(path, trust_pickle=True)
    assert ckpt.arch is None and ckpt.source_format == "pickle"
    assert not ckpt.model.training
    assert same_outputs(ckpt.model, digits, x_digits)
    # With --arch the pickled module's weights go into the named architecture (so it can be saved).
    ckpt = load_checkpoint(path, arch="digits_cnn", trust_pickle=True)
    assert ckpt.arch == DIGITS
    assert same_outputs(ckpt.model, digits, x_digits)


def test_module_inside_dict_with_trust(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    path = tmp_path / "wrapped_module.pt"
    torch.save({"model": digits, "epoch": 1}, path)
    ckpt = load_checkpoint(path, trust_pickle=True)
    assert ckpt.arch is None
    assert same_outputs(ckpt.model, digits, x_digits)


def test_trusted_pickle_of_unimportable_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "gone_mod_8c1f.py").write_text("import torch.nn as nn\nclass Net(nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(code))
    import gone_mod_8c1f  # type: ignore[import-not-found]

    torch.save(gone_mod_8c1f.Net(2, 2), tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "gone_mod_8c1f")
    (code / "gone_mod_8c1f.py").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="cannot be imported") as info:
        load_checkpoint(tmp_path / "net.pt", trust_pickle=True)
    one_line_error(info)


def test_trusted_pickle_of_a_package_that_is_not_installed_names_it_and_its_version(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint dict records the version of the library that made it (ultralytics' do): the
    one line names that package and version."""
    package = tmp_path / "code" / "yolofake_8c1f"
    (package / "nn").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nn" / "__init__.py").write_text("import torch.nn as nn\nclass Net(nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    import yolofake_8c1f.nn  # type: ignore[import-not-found]

    torch.save({"model": yolofake_8c1f.nn.Net(2, 2), "version": "9.9.9", "train_args": {}}, tmp_path / "net.pt")
    for name in ("yolofake_8c1f", "yolofake_8c1f.nn"):
        monkeypatch.delitem(sys.modules, name)
    (package / "nn" / "__init__.py").unlink()
    (package / "__init__.py").unlink()
    (package / "nn").rmdir()
    package.rmdir()
    with pytest.raises(UserError) as info:
        load_checkpoint(tmp_path / "net.pt", trust_pickle=True)
    line = one_line_error(info)
    assert "saved with yolofake_8c1f 9.9.9, which is not installed" in line
    assert "pip install 'yolofake_8c1f==9.9.9'" in line


def test_a_training_checkpoint_is_read_from_its_ema_and_written_without_optimizer_state(
        tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    """ultralytics' last.pt: 'model' None, the model under 'ema', an optimizer state; ultralytics
    loads the EMA, so chanprune reads that one and writes the result under 'model'."""
    from chanprune_cli.checkpoint import save_model

    state = torch.optim.SGD(digits.parameters(), lr=0.1, momentum=0.9).state_dict()
    path = tmp_path / "last.pt"
    torch.save({"epoch": 3, "model": None, "ema": digits, "optimizer": state, "train_args": {"task": "classify"},
                "updates": 7}, path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert loaded.arch is None and same_outputs(loaded.model, digits, x_digits)
    out = tmp_path / "out.pt"
    save_model(out, loaded.model, loaded, input_shape=(1, 8, 8), history=[], plans=[])
    raw = torch.load(out, weights_only=False)
    assert isinstance(raw["model"], nn.Module) and raw["ema"] is None and raw["optimizer"] is None
    assert raw["epoch"] == 3 and raw["updates"] == 7 and raw["train_args"] == {"task": "classify"}


def test_trust_pickle_still_prefers_safe_load(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    torch.save(digits.state_dict(), tmp_path / "sd.pt")
    ckpt = load_checkpoint(tmp_path / "sd.pt", arch="digits_cnn", trust_pickle=True)
    assert ckpt.source_format == "state_dict"
    assert same_outputs(ckpt.model, digits, x_digits)


class _Evil:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "plain_pickle"])
def test_malicious_pickle_never_runs(tmp_path: Path, digits: nn.Module, writer: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": digits.state_dict(), "extra": _Evil(marker)}
    if writer == "torch_zip":
        torch.save(payload, path)
    elif writer == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    for call in (lambda: load_checkpoint(path, arch="digits_cnn"), lambda: load_checkpoint(path), lambda: load_state_dict_file(path)):
        with pytest.raises(UserError) as info:
            call()
        one_line_error(info)
        assert not marker.exists()
    if writer == "torch_zip":
        assert "--trust-pickle" in str(info.value)


# ---------------------------------------------------------------- broken files


def _corrupt(tmp_path: Path, digits: nn.Module, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif kind in ("truncated_zip", "truncated_legacy"):
        torch.save(digits.state_dict(), path, _use_new_zipfile_serialization=kind == "truncated_zip")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    elif kind == "list_of_ints":
        torch.save([1, 2, 3], path)
    elif kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated, but such files exist
            torch.jit.script(nn.Linear(2, 2)).save(str(path))
    return path


@pytest.mark.parametrize(
    "kind", ["empty", "random", "text", "truncated_zip", "truncated_legacy", "directory", "missing", "list_of_ints", "torchscript"]
)
def test_broken_files_are_user_errors(tmp_path: Path, digits: nn.Module, kind: str) -> None:
    path = _corrupt(tmp_path, digits, kind)
    with pytest.raises(UserError) as info:
        load_checkpoint(path, arch="digits_cnn")
    msg = one_line_error(info)
    assert str(path) in msg
    with pytest.raises(UserError):
        load_state_dict_file(path)


# ---------------------------------------------------------------- chanprune format


def shrink_digits(model: nn.Module, keep1: int = 10, keep3: int = 20) -> nn.Module:
    """Hand-pruned digits_cnn: conv1 16→keep1 channels, conv3 32→keep3 (fc1 inputs follow)."""
    m = model
    idx1 = torch.arange(keep1) * 16 // keep1  # spread-out channel subset
    idx3 = torch.arange(keep3)

    def cut_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> None:
        bn.weight = nn.Parameter(bn.weight.data[idx].clone())
        bn.bias = nn.Parameter(bn.bias.data[idx].clone())
        bn.running_mean = bn.running_mean[idx].clone()
        bn.running_var = bn.running_var[idx].clone()
        bn.num_features = len(idx)

    m.conv1.weight = nn.Parameter(m.conv1.weight.data[idx1].clone())
    m.conv1.out_channels = keep1
    cut_bn(m.bn1, idx1)
    m.conv2.weight = nn.Parameter(m.conv2.weight.data[:, idx1].clone())
    m.conv2.in_channels = keep1
    m.conv3.weight = nn.Parameter(m.conv3.weight.data[idx3].clone())
    m.conv3.out_channels = keep3
    cut_bn(m.bn3, idx3)
    w = m.fc1.weight.data.view(m.fc1.out_features, 32, 4, 4)[:, idx3].reshape(m.fc1.out_features, -1)
    m.fc1.weight = nn.Parameter(w.clone())
    m.fc1.in_features = keep3 * 16
    return m


def test_chanprune_round_trip(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    pruned = shrink_digits(digits)
    with torch.no_grad():
        pruned(x_digits)  # the hand-pruned model is consistent
    path = tmp_path / "pruned.safetensors"
    history = [{"criterion": "l1", "ratio": 0.3}]
    plans = [{"groups": {"conv1": [0, 1, 3]}, "kept": torch.tensor([1, 2])}]
    meta = {"classes": ["a", "b"], "mean": [0.5], "std": [0.25]}
    save_chanprune(path, pruned, DIGITS, input_shape=(1, 8, 8), history=history, plans=plans, meta=meta)
    assert sorted(os.listdir(tmp_path)) == ["pruned.safetensors"]  # no temp files left behind

    ckpt = load_checkpoint(path)  # no --arch needed
    assert ckpt.source_format == "chanprune" and ckpt.arch == DIGITS
    assert ckpt.input_shape == (1, 8, 8)
    assert ckpt.history == history
    assert ckpt.plans == [{"groups": {"conv1": [0, 1, 3]}, "kept": [1, 2]}]
    assert ckpt.meta == meta
    assert ckpt.model.conv1.out_channels == 10 and ckpt.model.fc1.in_features == 320
    assert same_outputs(ckpt.model, pruned, x_digits)
    # A passed --arch does not override what the file records.
    assert same_outputs(load_checkpoint(path, arch="cifar_resnet20").model, pruned, x_digits)

    doc = json.loads(safetensors_metadata(path)["chanprune"])  # type: ignore[index]
    assert doc["format"] == "chanprune" and doc["format_version"] == 1
    assert doc["tool_version"] == tool_version() and doc["torch_version"] == torch.__version__
    assert doc["module_shapes"]["conv1"]["out_channels"] == 10


def test_chanprune_round_trip_resnet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(build_model(ArchSpec("cifar_resnet20")))
    block = model.layer2[1]
    idx = torch.tensor([0, 3, 5, 8, 13, 21, 30])
    block.conv1.weight = nn.Parameter(block.conv1.weight.data[idx].clone())
    block.conv1.out_channels = len(idx)
    bn = block.bn1
    bn.weight, bn.bias = nn.Parameter(bn.weight.data[idx].clone()), nn.Parameter(bn.bias.data[idx].clone())
    bn.running_mean, bn.running_var, bn.num_features = bn.running_mean[idx].clone(), bn.running_var[idx].clone(), len(idx)
    block.conv2.weight = nn.Parameter(block.conv2.weight.data[:, idx].clone())
    block.conv2.in_channels = len(idx)
    path = tmp_path / "r20.safetensors"
    save_chanprune(path, model, ArchSpec("cifar_resnet20"), input_shape=(3, 32, 32), history=[], plans=[])
    loaded = load_checkpoint(path).model
    x = torch.randn(2, 3, 32, 32)
    assert same_outputs(loaded, model, x)
    assert loaded.layer2[0].shortcut.pad_front == 8


def test_save_shared_storage_and_noncontiguous(tmp_path: Path, digits: nn.Module, x_digits: torch.Tensor) -> None:
    # running_mean shares storage with running_var; fc2.weight is a transposed (strided) view.
    digits.bn1.running_mean = digits.bn1.running_var[:]
    digits.fc2.weight = nn.Parameter(digits.fc2.weight.data.t().contiguous().t())
    assert not digits.fc2.weight.is_contiguous()
    path = tmp_path / "shared.safetensors"
    save_chanprune(path, digits, DIGITS, input_shape=None, history=[], plans=[])
    ckpt = load_checkpoint(path)
    assert ckpt.input_shape is None
    assert same_outputs(ckpt.model, digits, x_digits)


def test_save_is_byte_identical_every_time(tmp_path: Path, digits: nn.Module) -> None:
    # safetensors writes its metadata in hash order; the same model must give the same bytes.
    paths = [tmp_path / f"same{i}.safetensors" for i in range(12)]
    for path in paths:
        save_chanprune(path, digits, DIGITS, input_shape=(1, 8, 8), history=[{"seed": 0}], plans=[])
    assert len({path.read_bytes() for path in paths}) == 1
    assert set(safetensors_metadata(paths[0]) or {}) == {"chanprune", "format"}


def test_save_refuses_overwrite_and_dir(tmp_path: Path, digits: nn.Module) -> None:
    path = tmp_path / "out.safetensors"
    path.write_text("precious")
    with pytest.raises(UserError, match="--force"):
        save_chanprune(path, digits, DIGITS, input_shape=None, history=[], plans=[])
    assert path.read_text() == "precious"
    save_chanprune(path, digits, DIGITS, input_shape=None, history=[], plans=[], force=True)
    assert load_checkpoint(path).source_format == "chanprune"
    with pytest.raises(UserError):
        save_chanprune(tmp_path / "nodir" / "x.safetensors", digits, DIGITS, input_shape=None, history=[], plans=[])
    with pytest.raises(UserError, match="architecture"):
        save_chanprune(tmp_path / "noarch.safetensors", digits, None, input_shape=None, history=[], plans=[])


def _rewrite(path: Path, edit_doc: Any = None, edit_tensors: Any = None) -> None:
    tensors = load_file(str(path))
    meta = safetensors_metadata(path) or {}
    doc = json.loads(meta["chanprune"])
    if edit_doc:
        edit_doc(doc)
    if edit_tensors:
        edit_tensors(tensors)
    meta["chanprune"] = json.dumps(doc)
    path.unlink()
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture()
def saved(tmp_path: Path, digits: nn.Module) -> Path:
    path = tmp_path / "c.safetensors"
    save_chanprune(path, shrink_digits(digits), DIGITS, input_shape=(1, 8, 8), history=[], plans=[])
    return path


def test_newer_format_refused(saved: Path) -> None:
    _rewrite(saved, edit_doc=lambda d: d.update(format_version=2))
    with pytest.raises(UserError, match=r"newer chanprune \(format 2\); upgrade chanprune") as info:
        load_checkpoint(saved)
    one_line_error(info)


def test_plan_weights_mismatch(saved: Path) -> None:
    _rewrite(saved, edit_tensors=lambda t: t.update({"conv2.weight": t["conv2.weight"][:, :5].contiguous()}))
    with pytest.raises(UserError, match="do not fit") as info:
        load_checkpoint(saved)
    assert "conv2.weight" in one_line_error(info)


def test_consistent_layer_but_inconsistent_neighbours(saved: Path) -> None:
    # conv2's record and weight agree with each other but not with conv1's 10 outputs.
    _rewrite(
        saved,
        edit_doc=lambda d: d["module_shapes"]["conv2"].update(in_channels=5),
        edit_tensors=lambda t: t.update({"conv2.weight": t["conv2.weight"][:, :5].contiguous()}),
    )
    with pytest.raises(UserError, match="forward pass fails") as info:
        load_checkpoint(saved)
    one_line_error(info)


def test_unknown_module_in_record(saved: Path) -> None:
    _rewrite(saved, edit_doc=lambda d: d["module_shapes"].update({"ghost": {"out_channels": 3}}))
    with pytest.raises(UserError, match="ghost"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(format="other"),
        lambda d: d.update(format_version="1"),
        lambda d: d.update(arch="digits_cnn"),
        lambda d: d.update(input_shape=[1, 8]),
        lambda d: d.update(history={"a": 1}),
        lambda d: d.update(module_shapes={"conv1": 3}),
        lambda d: d["module_shapes"]["conv1"].update(out_channels="x"),
    ],
)
def test_malformed_chanprune_metadata(saved: Path, edit: Any) -> None:
    _rewrite(saved, edit_doc=edit)
    with pytest.raises(UserError) as info:
        load_checkpoint(saved)
    one_line_error(info)


def test_chanprune_records_unbuildable_arch(saved: Path) -> None:
    _rewrite(saved, edit_doc=lambda d: d.update(arch={"name": "missing_pkg_q.mod:make", "kwargs": {}}))
    with pytest.raises(UserError, match="records architecture missing_pkg_q.mod:make") as info:
        load_checkpoint(saved)
    one_line_error(info)


def test_chanprune_metadata_not_json(saved: Path) -> None:
    tensors = load_file(str(saved))
    saved.unlink()
    save_file(tensors, str(saved), metadata={"chanprune": "{not json"})
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(saved)


# ---------------------------------------------------------------- non-finite weights


def test_nonfinite_weights_load_and_are_reported(tmp_path: Path, digits: nn.Module) -> None:
    with torch.no_grad():
        digits.conv2.weight[0, 0, 0, 0] = float("nan")
        digits.bn3.running_var[1] = float("inf")
    torch.save(digits.state_dict(), tmp_path / "nan.pt")
    ckpt = load_checkpoint(tmp_path / "nan.pt", arch="digits_cnn")
    assert nonfinite_tensors(ckpt.model) == ["conv2.weight", "bn3.running_var"]
    assert nonfinite_tensors(build_model(DIGITS)) == []


# ---------------------------------------------------------------- the shared pretrained checkpoints


@pytest.mark.parametrize(
    ("filename", "arch"),
    [("resnet20-12fca82f.th", "cifar_resnet20"), ("resnet56-cifar10jpeg.pt", "cifar_resnet56"), ("resnet56-4bfd9763.th", "cifar_resnet56")],
)
def test_shared_pretrained_checkpoints_load_strictly(filename: str, arch: str) -> None:
    path = SHARED / "checkpoints" / filename
    if not path.is_file():
        pytest.skip(f"{path} not available")
    ckpt = load_checkpoint(path, arch=arch)
    raw = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    raw = {k.removeprefix("module."): v for k, v in raw.items()}
    model_sd = ckpt.model.state_dict()
    # Every tensor of the file landed in the model, and nothing but num_batches_tracked is left over.
    assert set(model_sd) - set(raw) <= {k for k in model_sd if k.endswith("num_batches_tracked")}
    for k, v in raw.items():
        assert torch.equal(model_sd[k], v), k
    assert nonfinite_tensors(ckpt.model) == []
    with torch.no_grad():
        assert torch.isfinite(ckpt.model(torch.randn(2, 3, 32, 32))).all()


def test_state_dict_module_versions_survive_loading(tmp_path: Path) -> None:
    # MNASNet's _load_from_state_dict refuses a missing module version; torch.save records the
    # versions on the state dict (`_metadata`), and wrapped/prefixed copies lose them.
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pth"
    torch.save(model.state_dict(), plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        loaded = load_checkpoint(path, arch="torchvision:mnasnet0_5").model
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
