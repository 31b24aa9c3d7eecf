"""`chanprune export`: ONNX / TorchScript parity on pruned models at two batch sizes, the safetensors
export loaded by plain PyTorch (no chanprune), mismatches that leave nothing behind, bad inputs.

The exports are re-checked here independently of export.py's own check (fresh random inputs,
onnxruntime / torch.jit.load / a subprocess that never imports chanprune).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from chanprune_cli.checkpoint import load_checkpoint, save_chanprune
from chanprune_cli.cli import app
from chanprune_cli.deploy import export as exporter
from chanprune_cli.engine.allocate import AllocationOptions
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.models import build_model, parse_arch
from chanprune_cli.prune import pruning
from engine_helpers import randomize

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()

MODELS = {"digits": (1, 8, 8), "resnet20": (3, 32, 32)}


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pruned chanprune files of digits_cnn, cifar_resnet20 (option-A shortcuts) and torchvision resnet18,
    made from models with random BN statistics and biases (so every layer matters), plus a pickled module.
    (`chanprune prune` itself is tested elsewhere; the library is faster here.)"""
    d = tmp_path_factory.mktemp("pruned")
    torch.manual_seed(0)
    specs = {"digits": (parse_arch("digits_cnn"), (1, 8, 8)), "resnet20": (parse_arch("cifar_resnet20"), (3, 32, 32)),
             "resnet18": (parse_arch("torchvision:resnet18", {"num_classes": 10}), (3, 32, 32))}
    sources = {name: (build_model(spec), spec, shape) for name, (spec, shape) in specs.items()}
    out = {}
    for name, (model, spec, shape) in sources.items():
        # Random scores (not a criterion: fast, and the kept channels are scattered), verified surgery.
        randomize(model)
        graph = build_graph(model, shape)
        scores = {g.id: torch.rand(g.channels) for g in graph.prunable_groups()}
        outcome = pruning.prune(model, graph, scores, shape, criterion="random", options=AllocationOptions(ratio=0.4))
        assert outcome.verify is not None and outcome.verify.passed
        out[name] = d / f"{name}.pruned.safetensors"
        save_chanprune(out[name], outcome.model, spec, input_shape=shape, history=[], plans=[outcome.plan_record])
    torch.save(sources["digits"][0], d / "whole.pt")
    out["whole"] = d / "whole.pt"
    return out


def _reference(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_checkpoint(ckpt).model.eval()(x)


def _jit_load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated (FutureWarning), still what TorchScript users call
        return torch.jit.load(str(path))


def _tolerance(ref: torch.Tensor) -> float:
    return 1e-4 * max(1.0, float(ref.abs().max()))


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_parity_on_pruned_models(pruned: dict[str, Path], tmp_path: Path, name: str, fmt: str) -> None:
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.ts")
    result = cli("export", pruned[name], "--format", fmt, "--out", out, "--json", tmp_path / "export.json")
    assert result.exit_code == 0, result.stderr
    assert "passed" in result.stdout
    doc = json.loads((tmp_path / "export.json").read_text())
    assert doc["command"] == "export"
    assert doc["format"] == fmt and doc["path"] == str(out) and doc["passed"] is True
    assert doc["input_shape"] == list(MODELS[name]) and doc["batch_sizes"] == [1, 3]
    assert 0 <= doc["max_abs_diff"] <= doc["tolerance"] and doc["rtol"] == 1e-4
    assert set(doc["max_abs_diff_per_batch"]) == {"1", "3"}
    assert doc["opset"] == (17 if fmt == "onnx" else None)
    assert doc["torchscript_method"] == (None if fmt == "onnx" else "script")
    assert doc["size_mb"] == pytest.approx(out.stat().st_size / 2**20, rel=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "export.json"])  # no temp files

    # Independent check: fresh inputs, batch sizes 1 and 3 (the export was traced at 2).
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        graph = onnx.load(str(out)).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    else:
        loaded = _jit_load(out)

        def run(x: torch.Tensor) -> torch.Tensor:
            return loaded(x).detach()
    for batch in (1, 3):
        x = torch.randn(batch, *MODELS[name], generator=torch.Generator().manual_seed(100 + batch))
        ref = _reference(pruned[name], x)
        got = run(x)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= _tolerance(ref)


def test_trace_fallback_keeps_the_batch_axis_dynamic(pruned: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that cannot be scripted is traced (at batch 2); the option-A shortcut's slicing and padding
    must still work at batch 1 and 3."""
    def no_script(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("not scriptable")

    monkeypatch.setattr(torch.jit, "script", no_script)
    out = tmp_path / "traced.pt"
    result = cli("export", pruned["resnet20"], "--out", out, "--json", "-")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["format"] == "torchscript" and doc["torchscript_method"] == "trace" and doc["passed"]
    x = torch.randn(5, 3, 32, 32)
    ref = _reference(pruned["resnet20"], x)
    with torch.no_grad():
        assert float((_jit_load(out)(x) - ref).abs().max()) <= _tolerance(ref)


# --------------------------------------------------------------------------------------------
# safetensors: loadable with plain PyTorch


def test_safetensors_export_loads_without_chanprune(pruned: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    result = cli("export", pruned["resnet18"], "--format", "safetensors", "--out", out, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.stderr
    spec_path = tmp_path / "model.safetensors.json"
    spec = json.loads(spec_path.read_text())
    assert spec["arch"] == {"name": "torchvision:resnet18", "kwargs": {"num_classes": 10}}
    assert spec["input_shape"] == [3, 32, 32]
    assert spec["module_shapes"]["layer1.0.conv1"]["out_channels"] < 64  # pruned widths are recorded
    assert "fc" in spec["module_shapes"] and spec["module_shapes"]["fc"]["in_features"] < 512
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["format"] == "safetensors" and doc["spec_path"] == str(spec_path) and doc["passed"]
    assert doc["max_abs_diff"] == 0.0

    # A plain state dict: tensor names are the model's keys; no chanprune header.
    from safetensors import safe_open

    model = load_checkpoint(pruned["resnet18"]).model.eval()
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        assert "chanprune" not in (f.metadata() or {})

    # The documented snippet, run by a Python that never imports chanprune.
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    from safetensors.torch import load_file, save_file

    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    code = exporter.LOAD_SNIPPET.format(weights=out.name, spec=spec_path.name) + (
        "import sys\n"
        "assert not any(m.startswith('chanprune') for m in sys.modules), 'chanprune was imported'\n"
        "with torch.no_grad():\n"
        "    y = model(load_file('x.safetensors')['x'])\n"
        "from safetensors.torch import save_file\n"
        "save_file({'y': y}, 'y.safetensors')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    y = load_file(str(tmp_path / "y.safetensors"))["y"]
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(y, ref)


def test_readme_shows_the_load_snippet() -> None:
    text = README.read_text(encoding="utf-8")
    assert "### `chanprune export" in text
    for line in exporter.LOAD_SNIPPET.format(weights="model.safetensors", spec="model.safetensors.json").splitlines():
        if line.strip():
            assert line in text, f"README's loading snippet lacks: {line}"


def test_pickled_module_exports_to_onnx_without_arch(pruned: dict[str, Path], tmp_path: Path) -> None:
    result = cli("export", pruned["whole"], "--trust-pickle", "--input-shape", "1,8,8", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.stderr


def test_format_from_suffix_and_opset_warning(pruned: dict[str, Path], tmp_path: Path) -> None:
    result = cli("export", pruned["digits"], "--out", tmp_path / "m.pt", "--opset", "13", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "torchscript"
    assert result.stderr.strip().splitlines()[0] == "warning: --opset only applies to --format onnx; ignored for torchscript"


def test_force_overwrites_both_safetensors_files(pruned: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_text("old")
    (tmp_path / "m.safetensors.json").write_text("old")
    result = cli("export", pruned["digits"], "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 2 and "already exists; pass --force" in one_error_line(result.stderr)
    result = cli("export", pruned["digits"], "--out", tmp_path / "m.safetensors", "--force")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "m.safetensors.json").read_text())["arch"]["name"] == "digits_cnn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.safetensors.json"]


# --------------------------------------------------------------------------------------------
# a mismatch is an error and nothing is left behind


@pytest.mark.parametrize("fmt", exporter.FORMATS)
def test_mismatch_exits_1_and_leaves_nothing(pruned: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             fmt: str) -> None:
    real = exporter._outputs
    monkeypatch.setattr(exporter, "_outputs", lambda run, x: [t + 0.5 for t in real(run, x)])
    out = tmp_path / {"onnx": "model.onnx", "torchscript": "model.ts", "safetensors": "model.safetensors"}[fmt]
    result = cli("export", pruned["digits"], "--format", fmt, "--out", out, "--json", tmp_path / "e.json")
    assert result.exit_code == 1, result.stderr
    line = one_error_line(result.stderr)
    assert f"the {fmt} export does not match the PyTorch model: max |difference| = 0.5" in line
    assert "nothing was written" in line
    assert list(tmp_path.iterdir()) == []


def test_export_failure_is_one_line(pruned: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("Unsupported: ONNX export of operator foo\nmore details")

    monkeypatch.setattr(torch.onnx, "export", broken)
    result = cli("export", pruned["digits"], "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1
    expected = "cannot export this model to ONNX opset 17 (RuntimeError: Unsupported: ONNX export of operator foo)"
    assert expected in one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# bad inputs (the shared catalogue in test_bad_inputs.py covers bad checkpoints and outputs)


BAD = [
    ("no-checkpoint", lambda p, t: ["export"], "give a checkpoint"),
    ("no-out", lambda p, t: ["export", p["digits"], "--format", "onnx"], "give an output file"),
    ("unknown-format", lambda p, t: ["export", p["digits"], "--format", "tflite", "--out", t / "m.tflite"],
     "unknown --format 'tflite'; choose onnx, torchscript or safetensors"),
    ("format-not-inferable", lambda p, t: ["export", p["digits"], "--out", t / "model.bin"], "cannot tell the export format"),
    ("opset-too-high", lambda p, t: ["export", p["digits"], "--out", t / "m.onnx", "--opset", "99"], "--opset 99 is not supported"),
    ("tolerance-zero", lambda p, t: ["export", p["digits"], "--out", t / "m.onnx", "--tolerance", "0"], "--tolerance must be a positive"),
    ("tolerance-nan", lambda p, t: ["export", p["digits"], "--out", t / "m.onnx", "--tolerance", "nan"], "--tolerance must be a positive"),
    ("wrong-input-shape", lambda p, t: ["export", p["digits"], "--out", t / "m.onnx", "--input-shape", "3,8,8"], "check --input-shape"),
    ("pickle-to-safetensors", lambda p, t: ["export", p["whole"], "--trust-pickle", "--input-shape", "1,8,8", "--out", t / "m.safetensors"],
     "records no architecture"),
    ("json-is-spec-file", lambda p, t: ["export", p["digits"], "--out", t / "m.safetensors", "--json", t / "m.safetensors.json"],
     "both name"),
    ("spec-file-exists", lambda p, t: ["export", p["digits"], "--out", t / "m.safetensors"],
     "m.safetensors.json already exists; pass --force"),
    ("spatial-axes-unknown", lambda p, t: ["export", p["digits"], "--out", t / "m.onnx", "--spatial-axes", "sideways"],
     "unknown --spatial-axes 'sideways'; choose auto, dynamic or fixed"),
    ("spatial-axes-dynamic-size-bound", lambda p, t: ["export", p["digits"], "--out", t / "m.onnx", "--spatial-axes", "dynamic"],
     "the model fails on inputs of shape 1,16,16"),
]


@pytest.mark.parametrize(("case", "build", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(pruned: dict[str, Path], tmp_path: Path, case: str, build: Any, fragment: str) -> None:
    if case == "spec-file-exists":
        (tmp_path / "m.safetensors.json").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(*build(pruned, tmp_path))
    assert result.exit_code == 2, result.stderr
    assert fragment in one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_onnx_dependencies_missing(pruned: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   missing: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    result = cli("export", pruned["digits"], "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert f"needs {missing}" in line and "pip install onnx onnxruntime" in line
    assert list(tmp_path.iterdir()) == []


def test_exported_outputs_numpy_flatten() -> None:
    """onnxruntime returns numpy arrays; the comparison reads them like tensors."""
    got = exporter._outputs(lambda x: [np.ones((2, 3), dtype=np.float32)], torch.zeros(1))
    assert len(got) == 1 and got[0].dtype == torch.float64 and got[0].shape == (2, 3)


# --------------------------------------------------------------------------------------------
# ONNX height and width: dynamic for fully convolutional models, checked at two sizes

FCN_SOURCE = '''
import torch.nn as nn


def make():  # fully convolutional: a segmentation-like head, any input size
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 2, 1))
'''


def _onnx_dims(path: Path) -> list[str | int]:
    import onnx

    return [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]


def test_fully_convolutional_onnx_takes_any_size(tmp_path: Path) -> None:
    """Pruned at 12x12, the ONNX graph must run at 100x100 as PyTorch does."""
    import onnxruntime as ort

    Path("fcn_net.py").write_text(FCN_SOURCE)  # the working directory is importable (pkg.mod:factory)
    torch.manual_seed(0)
    model = build_model(parse_arch("fcn_net:make"))
    randomize(model)
    torch.save(model.state_dict(), tmp_path / "fcn.pt")
    pruned_path = tmp_path / "fcn.pruned.safetensors"
    result = cli("prune", tmp_path / "fcn.pt", "--arch", "fcn_net:make", "--input-shape", "3,12,12", "--ratio", "0.5",
                 "--out", pruned_path)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "fcn.onnx"
    result = cli("export", pruned_path, "--arch", "fcn_net:make", "--out", out, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.stderr
    assert "height and width dynamic" in result.stdout
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["spatial_axes"] == "dynamic" and set(doc["max_abs_diff_per_size"]) == {"24x24"} and doc["passed"]
    assert _onnx_dims(out) == ["batch", 3, "input_height", "input_width"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = load_checkpoint(pruned_path, arch="fcn_net:make").model.eval()
    for size in ((100, 100), (12, 12), (37, 64)):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[0]))
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            ref = reference(x)
        assert got.shape == ref.shape == (2, 2, *size)
        assert float((got - ref).abs().max()) <= _tolerance(ref)

    fixed = tmp_path / "fixed.onnx"
    result = cli("export", pruned_path, "--arch", "fcn_net:make", "--out", fixed, "--spatial-axes", "fixed", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["spatial_axes"] == "fixed" and _onnx_dims(fixed) == ["batch", 3, 12, 12]


def test_classifiers_keep_their_size_unless_asked(pruned: dict[str, Path], tmp_path: Path) -> None:
    """A classifier's output does not follow the input size: auto keeps height and width fixed;
    --spatial-axes dynamic makes them dynamic where the graph allows it, checked at twice the size."""
    import onnxruntime as ort

    result = cli("export", pruned["resnet20"], "--out", tmp_path / "auto.onnx", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["spatial_axes"] == "fixed" and _onnx_dims(tmp_path / "auto.onnx") == ["batch", 3, 32, 32]
    result = cli("export", pruned["resnet20"], "--out", tmp_path / "dyn.onnx", "--spatial-axes", "dynamic", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["max_abs_diff_per_size"].keys() == {"64x64"}
    session = ort.InferenceSession(str(tmp_path / "dyn.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    ref = _reference(pruned["resnet20"], x)
    assert float((torch.from_numpy(session.run(None, {"input": x.numpy()})[0]) - ref).abs().max()) <= _tolerance(ref)


def test_dynamic_size_mismatch_exits_1_and_leaves_nothing(pruned: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that bakes the input size in passes at the export size and fails at the other one."""
    real = exporter._outputs
    monkeypatch.setattr(exporter, "_outputs", lambda run, x: [t + (0.5 if x.shape[-1] == 64 else 0) for t in real(run, x)])
    result = cli("export", pruned["resnet20"], "--out", tmp_path / "m.onnx", "--spatial-axes", "dynamic")
    assert result.exit_code == 1, result.stderr
    line = one_error_line(result.stderr)
    assert "does not match the PyTorch model at 64x64" in line and "use --spatial-axes fixed" in line
    assert list(tmp_path.iterdir()) == []


def test_spatial_axes_warns_off_onnx(pruned: dict[str, Path], tmp_path: Path) -> None:
    result = cli("export", pruned["digits"], "--out", tmp_path / "m.ts", "--spatial-axes", "dynamic")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip().splitlines()[0] == "warning: --spatial-axes only applies to --format onnx; ignored for torchscript"
