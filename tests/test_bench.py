"""`chanprune bench`: JSON fields, comparisons with the reference, gates and exit codes, --plot.

Everything uses the built-in `digits_cnn` (1x8x8) on `digits:test`, one thread and a few timed
runs, so timings are noise: the tests check how numbers relate (speed-up = reference median /
model median), never that pruning made anything faster.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from chanprune_cli.cli import app
from chanprune_cli.deploy import benchmark, runtimes
from chanprune_cli.models import build_model, parse_arch

ARCH = ("--arch", "digits_cnn")
DATA = ("--data", "digits:test", "--mean", "0.5", "--std", "0.5")
FAST = ("--threads", "1", "--warmup", "1", "--repeats", "3", "--batch-sizes", "1,4")
runner = CliRunner()


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


def _train(model: torch.nn.Module) -> None:
    from chanprune_cli.data import make_loader

    loader = make_loader("digits:train", batch_size=64, shuffle=True, train=True, input_shape=(1, 8, 8),
                         mean=(0.5,), std=(0.5,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(4):  # about 97 % test top-1
            for images, labels in loader:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`good` (trained), `pruned` (chanprune prune of it, half the channels), `broken` (always predicts class 0)."""
    d = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = build_model(parse_arch("digits_cnn"))
    _train(model)
    torch.save({"state_dict": model.state_dict(), "arch": "digits_cnn"}, d / "good.pt")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["fc2.weight"].zero_()
    sd["fc2.bias"].copy_(torch.eye(10)[0])
    torch.save(sd, d / "broken.pt")
    result = cli("prune", d / "good.pt", *ARCH, "--ratio", "0.5", "--out", d / "pruned.safetensors")
    assert result.exit_code == 0, result.stderr
    return {"good": d / "good.pt", "pruned": d / "pruned.safetensors", "broken": d / "broken.pt"}


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    return lines[-1]


# --------------------------------------------------------------------------------------------
# JSON


def test_json_fields_and_comparison_with_the_reference(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # the JSON asserted below is the CPU's (device, autotuning and TF32 fields)
    result = cli("bench", ckpts["good"], ckpts["pruned"], *ARCH, *DATA, *FAST, "--seed", "2", "--device", "cpu",
                 "--json", out)
    assert result.exit_code == 0, result.stderr
    for text in ("speed-up", "MACs ratio", "top-1", "(ref)", "median ms", "p90 ms"):
        assert text in result.stdout, text
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1 and doc["command"] == "bench" and doc["seed"] == 2
    assert doc["tool"]["name"] == "chanprune" and doc["torch_version"] == torch.__version__
    assert doc["reference"] == str(ckpts["good"])
    assert doc["device"] == "cpu" and doc["threads"] == 1 and doc["batch_sizes"] == [1, 4]
    timing = doc["timing"]
    assert {k: timing.pop(k) for k in ("warmup", "repeats", "max_time_s")} == {"warmup": 1, "repeats": 3, "max_time_s": 10.0}
    assert timing.pop("device_name")
    assert timing == {"dtype": "fp32", "channels_last": False, "cudnn_benchmark": False, "compile": False,
                      "cudnn_allow_tf32": None, "runtime": "torch", "interleaved": True}
    assert doc["data"]["source"] == "digits:test" and doc["data"]["images"] == 359
    assert doc["gates"] == [] and doc["passed"] is True and isinstance(doc["warnings"], list)

    ref, pruned = doc["models"]
    assert [m["path"] for m in doc["models"]] == [str(ckpts["good"]), str(ckpts["pruned"])]
    assert (ref["format"], pruned["format"]) == ("state_dict", "chanprune")
    for m in (ref, pruned):
        assert isinstance(m["params"], int) and isinstance(m["macs"], int) and m["macs"] > 0
        assert m["file_size_mb"] > 0 and m["size_mb"] > 0 and m["input_shape"] == [1, 8, 8]
        assert set(m["latency_ms"]) == {"1", "4"}
        for b, lat in m["latency_ms"].items():
            assert 0 < lat["min"] <= lat["median"] <= lat["p90"]
            assert lat["repeats"] == 3 and lat["warmup"] == 1
            assert m["throughput_ips"][b] == pytest.approx(int(b) / (lat["median"] / 1000))
        acc = m["accuracy"]
        assert 0 <= acc["top1"] <= acc["top5"] <= 100 and acc["images"] == 359
    assert ref["accuracy"]["top1"] > 90  # the trained model
    assert pruned["params"] < ref["params"] and pruned["macs"] < ref["macs"]
    assert ref["widths"]["conv2"] == 32 and pruned["widths"]["conv2"] == 16 and pruned["widths"]["fc2"] == 10

    # Everything relative to the first model.
    assert ref["vs_reference"]["macs_ratio"] == 1.0 and ref["vs_reference"]["top1_change"] == 0.0
    assert ref["vs_reference"]["speedup"] == {"1": 1.0, "4": 1.0}
    vs = pruned["vs_reference"]
    assert vs["macs_ratio"] == pytest.approx(ref["macs"] / pruned["macs"])
    assert vs["params_ratio"] == pytest.approx(ref["params"] / pruned["params"])
    assert vs["top1_change"] == pytest.approx(pruned["accuracy"]["top1"] - ref["accuracy"]["top1"])
    assert vs["top5_change"] == pytest.approx(pruned["accuracy"]["top5"] - ref["accuracy"]["top5"])
    for b in ("1", "4"):
        speedup = ref["latency_ms"][b]["median"] / pruned["latency_ms"][b]["median"]
        assert vs["speedup"][b] == pytest.approx(speedup)
        assert vs["speedup_vs_macs_ratio"][b] == pytest.approx(speedup / vs["macs_ratio"])


def test_json_on_stdout_without_data(ckpts: dict[str, Path]) -> None:
    result = cli("bench", ckpts["pruned"], *FAST, "--json", "-")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # stdout is only the JSON document; the tables went to stderr
    assert "speed-up" in result.stderr
    (model,) = doc["models"]
    assert model["accuracy"] is None and doc["data"] is None
    assert model["latency_ms"]["4"]["median"] > 0


# --------------------------------------------------------------------------------------------
# gates


def test_gates_pass(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = cli("bench", ckpts["good"], ckpts["pruned"], ckpts["good"], *ARCH, *DATA, *FAST,
                 "--max-acc-drop", "100", "--min-speedup", "0.001", "--gate-batch", "1", "--json", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("passed") == 4
    doc = json.loads(out.read_text())
    assert doc["passed"] is True and doc["gate_batch"] == 1
    assert [(g["name"], g["model"]) for g in doc["gates"]] == [
        ("max-acc-drop", str(ckpts["pruned"])), ("min-speedup", str(ckpts["pruned"])),
        ("max-acc-drop", str(ckpts["good"])), ("min-speedup", str(ckpts["good"]))]
    models = doc["models"]
    for g, m in zip(doc["gates"], [models[1], models[1], models[2], models[2]]):
        assert g["passed"] is True
        if g["name"] == "max-acc-drop":
            assert g["limit"] == 100 and g["batch_size"] is None
            assert g["value"] == pytest.approx(-m["vs_reference"]["top1_change"])
        else:
            assert g["limit"] == 0.001 and g["batch_size"] == 1
            assert g["value"] == pytest.approx(m["vs_reference"]["speedup"]["1"])
    assert doc["gates"][2]["value"] == 0.0  # the reference again: same accuracy


def test_violated_gates_exit_3_name_the_gate_and_keep_the_json(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = cli("bench", ckpts["good"], ckpts["broken"], *ARCH, *DATA, *FAST,
                 "--max-acc-drop", "1", "--min-speedup", "1000", "--json", out)
    assert result.exit_code == 3, result.stderr
    line = _error_line(result.stderr)
    assert "2 gate(s) failed" in line
    doc = json.loads(out.read_text())  # written although the gates failed: CI keeps the artifact
    assert doc["passed"] is False
    acc_gate, speed_gate = doc["gates"]
    assert (acc_gate["name"], acc_gate["passed"], acc_gate["limit"]) == ("max-acc-drop", False, 1)
    assert acc_gate["value"] > 50  # always predicting one class of ten
    assert f"--max-acc-drop 1: {ckpts['broken']} loses {acc_gate['value']:.2f} pts top-1" in line
    assert f"{acc_gate['value'] - 1:.2f} pts over the limit" in line
    assert (speed_gate["name"], speed_gate["passed"], speed_gate["batch_size"]) == ("min-speedup", False, 4)
    assert f"--min-speedup 1000: {ckpts['broken']} is {speed_gate['value']:.2f}x as fast" in line
    assert f"{1000 - speed_gate['value']:.2f}x short" in line
    assert "FAILED" in result.stdout  # the table was printed too


def test_max_latency_ratio_gate(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """The pruned model's latency over the reference's, at the gate batch: a generous limit passes, an
    impossible one fails with exit 3 after the report is written."""
    passed = cli("bench", ckpts["good"], ckpts["pruned"], *ARCH, *FAST, "--max-latency-ratio", "100")
    assert passed.exit_code == 0, passed.stderr
    out = tmp_path / "b.json"
    failed = cli("bench", ckpts["good"], ckpts["pruned"], *ARCH, *FAST, "--max-latency-ratio", "0.0001", "--json", out)
    assert failed.exit_code == 3, failed.stderr
    assert "1 gate(s) failed: --max-latency-ratio 0.0001: " in _error_line(failed.stderr)
    [gate] = json.loads(out.read_text())["gates"]
    assert gate["name"] == "max-latency-ratio" and gate["batch_size"] == 4 and gate["passed"] is False
    doc = json.loads(out.read_text())
    medians = [m["latency_ms"]["4"]["median"] for m in doc["models"]]
    assert gate["value"] == pytest.approx(medians[1] / medians[0])


def test_onnxruntime_times_the_checked_export(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ort.json"
    result = cli("bench", ckpts["good"], ckpts["pruned"], *ARCH, *FAST, "--runtime", "onnxruntime", "--json", out)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["timing"]["runtime"] == "onnxruntime" and doc["timing"]["interleaved"] is True
    assert all(m["latency_ms"]["1"]["repeats"] == 3 for m in doc["models"])
    assert "onnxruntime, fp32" in " ".join(result.stdout.split())


def test_one_failed_gate_of_two(ckpts: dict[str, Path]) -> None:
    result = cli("bench", ckpts["good"], ckpts["broken"], *ARCH, *DATA, *FAST, "--max-acc-drop", "1",
                 "--min-speedup", "0.001")
    assert result.exit_code == 3, result.stderr
    line = _error_line(result.stderr)
    assert "1 gate(s) failed: --max-acc-drop 1" in line and "--min-speedup" not in line


@pytest.mark.parametrize(("extra", "fragment"), [
    (("--min-speedup", "1.5"), "--min-speedup compares models with the first checkpoint"),
    (("--max-latency-ratio", "0.8"), "--max-latency-ratio compares models with the first checkpoint"),
    (("--max-acc-drop", "1", "--data", "digits:test"), "give at least two checkpoints"),
])
def test_gates_need_two_models(ckpts: dict[str, Path], tmp_path: Path, extra: tuple[str, ...], fragment: str) -> None:
    result = cli("bench", ckpts["good"], *ARCH, *extra, "--json", tmp_path / "b.json")
    assert result.exit_code == 2
    assert fragment in _error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("extra", "fragment"), [
    (("--max-acc-drop", "1"), "--max-acc-drop needs accuracy: pass --data"),
    (("--max-acc-drop", "-1", *DATA), "--max-acc-drop must be 0 or more"),
    (("--max-acc-drop", "nan", *DATA), "--max-acc-drop must be a finite number"),
    (("--min-speedup", "0"), "--min-speedup must be positive"),
    (("--gate-batch", "8"), "--gate-batch 8 is not one of --batch-sizes"),
    (("--batch-sizes", "1,x"), "--batch-sizes '1,x': expected comma-separated positive integers"),
    (("--batch-sizes", "0"), "expected comma-separated positive integers"),
    (("--repeats", "0"), "--repeats"),
    (("--threads", "0"), "--threads"),
    (("--plot", "chart.gif"), "unknown image type '.gif'; use a file name ending in .png"),
    (("--max-latency-ratio", "0"), "--max-latency-ratio must be positive"),
    (("--runtime", "tflite"), "--runtime must be one of torch, onnxruntime, tensorrt"),
    (("--runtime", "tensorrt", "--device", "cpu"), "--runtime tensorrt needs a CUDA GPU"),
    (("--runtime", "onnxruntime", "--dtype", "bf16"), "runs the float32 ONNX export"),
])
def test_bad_bench_options_fail_before_loading(load_spy: list[str], ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               extra: tuple[str, ...], fragment: str) -> None:
    calls = load_spy
    result = cli("bench", ckpts["good"], ckpts["pruned"], *ARCH, *extra)
    assert result.exit_code == 2, result.stderr
    assert fragment in _error_line(result.stderr)
    assert calls == []


def test_missing_checkpoint_argument() -> None:
    result = cli("bench")
    assert result.exit_code == 2
    assert "give at least one checkpoint" in _error_line(result.stderr)


def test_models_with_different_inputs_are_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    torch.save(build_model(parse_arch("cifar_resnet20")).state_dict(), tmp_path / "r20.pt")
    result = cli("bench", ckpts["pruned"], tmp_path / "r20.pt", "--arch", "cifar_resnet20")
    assert result.exit_code == 2
    assert "takes input 3x32x32 but the reference" in _error_line(result.stderr)


# --------------------------------------------------------------------------------------------
# library pieces


def test_time_model_bounds_runs_by_time() -> None:
    model = torch.nn.Linear(4, 4)
    bounded = benchmark.time_model(model, (4,), 2, "cpu", warmup=50, repeats=10_000, threads=1, max_time=1e-9)
    assert bounded["repeats"] == benchmark.MIN_REPEATS and bounded["warmup"] == 2  # the probe only
    exact = benchmark.time_model(model, (4,), 2, "cpu", warmup=2, repeats=7, threads=1, max_time=0)
    assert (exact["repeats"], exact["warmup"]) == (7, 2)
    assert exact["threads"] == 1 and exact["median_ms"] > 0


def test_deployed_timing_settings_in_the_json(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "deployed.json"
    result = cli("bench", ckpts["good"], ckpts["pruned"], *ARCH, *FAST, "--max-time", "0", "--dtype", "bf16",
                 "--channels-last", "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.stderr
    timing = json.loads(out.read_text())["timing"]
    assert timing["dtype"] == "bf16" and timing["channels_last"] is True
    assert timing["cudnn_benchmark"] is False and timing["compile"] is False  # autotuning is CUDA's
    assert timing["device_name"] and timing["cudnn_allow_tf32"] is None
    assert "bf16, channels-last" in result.stdout


def test_deployed_copy_leaves_the_model_alone() -> None:
    model = build_model(parse_arch("digits_cnn")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timed = benchmark.deployed(model, benchmark.Deployment(dtype="bf16", channels_last=True), torch.device("cpu"),
                               (1, 8, 8))
    assert next(timed.parameters()).dtype == torch.bfloat16
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    result = benchmark.time_model(timed, (1, 8, 8), 2, "cpu", warmup=1, repeats=2, threads=1, max_time=0,
                                  settings=benchmark.Deployment(dtype="bf16", channels_last=True))
    assert result["repeats"] == 2 and result["median_ms"] > 0


def test_fp16_on_the_cpu_warns_and_a_bad_dtype_fails_before_loading(load_spy: list[str], ckpts: dict[str, Path]) -> None:
    warned = cli("bench", ckpts["good"], *ARCH, *FAST, "--max-time", "0", "--dtype", "fp16", "--device", "cpu")
    assert warned.exit_code == 0, warned.stderr
    assert [ln for ln in warned.stderr.splitlines() if ln.startswith("warning: --dtype fp16 on the CPU")]
    load_spy.clear()
    bad = cli("bench", ckpts["good"], *ARCH, "--dtype", "fp8")
    assert bad.exit_code == 2 and "--dtype must be one of fp32, fp16, bf16" in _error_line(bad.stderr)
    assert load_spy == []


def test_cudnn_autotuning_is_scoped_to_the_timing() -> None:
    before = torch.backends.cudnn.benchmark
    with benchmark.cudnn_autotune(not before):
        assert torch.backends.cudnn.benchmark is (not before)
    assert torch.backends.cudnn.benchmark is before
    assert benchmark.Deployment().autotune(torch.device("cpu")) is False
    assert benchmark.Deployment().autotune(torch.device("cuda")) is True
    assert benchmark.Deployment(cudnn_benchmark=False).autotune(torch.device("cuda")) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_deployed_latency(dtype: str) -> None:
    model = build_model(parse_arch("cifar_resnet20")).eval()
    settings = benchmark.Deployment(dtype=dtype, channels_last=True)
    before = torch.backends.cudnn.benchmark
    timed = benchmark.deployed(model, settings, torch.device("cuda"), (3, 32, 32))
    result = benchmark.time_model(timed, (3, 32, 32), 8, "cuda", warmup=0, repeats=3, threads=None, max_time=0,
                                  settings=settings)
    assert result["warmup"] >= 2 and result["median_ms"] > 0  # autotuning needs its warm-up runs
    assert torch.backends.cudnn.benchmark is before
    assert next(model.parameters()).device.type == "cpu"
    described = settings.to_json(torch.device("cuda"))
    assert described["device_name"] == torch.cuda.get_device_name(0) and described["cudnn_benchmark"] is True


def test_a_pruned_model_slower_than_its_reference_is_said(ckpts: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = runtimes.LatencyTarget.prepare
    full = sum(p.numel() for p in build_model(parse_arch("digits_cnn")).parameters())

    def pruned_made_slow(self: runtimes.LatencyTarget, model: torch.nn.Module, shape: Any) -> Any:
        runner_for = real(self, model, shape)
        if sum(p.numel() for p in model.parameters()) == full:
            return runner_for

        def slow(batch: int) -> Any:  # the pruned one: 20 ms more per run than it needs
            run = runner_for(batch)
            return lambda: (run(), time.sleep(0.02))
        return slow

    monkeypatch.setattr(runtimes.LatencyTarget, "prepare", pruned_made_slow)
    out = tmp_path / "bench.json"
    result = cli("bench", ckpts["good"], ckpts["pruned"], *ARCH, *FAST, "--device", "cpu", "--json", out)  # the CPU's cause
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    macs_ratio = doc["models"][1]["vs_reference"]["macs_ratio"]
    [line] = [w for w in doc["warnings"] if "fewer MACs" in w]  # (a busy machine may add a noisy-timings line)
    assert line.startswith(f"{ckpts['pruned']} does {macs_ratio:.2f}x fewer MACs than the reference but runs slower (batch 1: ")
    assert "batch 4: " in line and line.endswith("overhead and memory traffic rather than MACs (most at small batches)")
    assert f"warning: {line}" in " ".join(result.stderr.split())  # also said on stderr (maybe wrapped)


def test_slowdown_cause_on_a_gpu_counts_unaligned_widths() -> None:
    def result(widths: dict[str, int]) -> benchmark.ModelResult:
        return benchmark.ModelResult("p.pt", "chanprune", None, (3, 8, 8), 10, 10, 1, 0.1, widths)

    same = benchmark.Comparison(1.0, 1.0, {1: 1.0}, None, None)
    slower = benchmark.Comparison(2.0, 2.0, {1: 0.6, 64: 1.3}, None, None)
    cuda = torch.device("cuda")
    [line] = benchmark.slowdowns([result({}), result({"a": 12, "b": 16, "c": 10})], [same, slower], cuda)
    assert line == ("p.pt does 2.00x fewer MACs than the reference but runs slower (batch 1: 0.60x as fast); 2 of its 3 "
                    "layers have widths that are not multiples of 8 and miss the GPU's tensor-core kernels: prune with "
                    "--round-to 8")
    [line] = benchmark.slowdowns([result({}), result({"a": 16})], [same, slower], cuda)
    assert line.endswith("its widths are multiples of 8, so cuDNN's kernel choice for the new shapes is the likely cause")
    faster = benchmark.Comparison(2.0, 2.0, {1: 1.1, 64: 1.3}, None, None)
    bigger = benchmark.Comparison(0.5, 0.5, {1: 0.5}, None, None)  # more work: slower is expected
    assert benchmark.slowdowns([result({}), result({}), result({})], [same, faster, bigger], cuda) == []


def test_gate_descriptions() -> None:
    failed = benchmark.Gate("max-acc-drop", "p.pt", 1.0, 3.25, False)
    assert failed.describe() == "--max-acc-drop 1: p.pt loses 3.25 pts top-1 vs the reference, 2.25 pts over the limit"
    gained = benchmark.Gate("max-acc-drop", "p.pt", 1.0, -0.5, True)
    assert gained.describe() == "--max-acc-drop 1: p.pt gains 0.50 pts top-1 vs the reference"
    slow = benchmark.Gate("min-speedup", "p.pt", 2.0, 1.25, False, batch_size=32)
    assert slow.describe() == "--min-speedup 2: p.pt is 1.25x as fast as the reference at batch 32, 0.75x short"
    assert benchmark.gate_failure([gained]) is None
    assert benchmark.gate_failure([gained, failed, slow]) == "2 gate(s) failed: " + failed.describe() + "; " + slow.describe()


def test_original_widths_of_a_pruned_file(ckpts: dict[str, Path]) -> None:
    from chanprune_cli.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpts["pruned"])
    assert benchmark.original_widths(loaded) == {"conv1": 16, "conv2": 32, "conv3": 32, "fc1": 64, "fc2": 10}
    assert benchmark.layer_widths(loaded.model)["conv2"] == 16
    assert benchmark.original_widths(load_checkpoint(ckpts["good"], arch="digits_cnn")) is None  # not pruned


# --------------------------------------------------------------------------------------------
# --plot


def test_plot_writes_an_image(ckpts: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    several, single = tmp_path / "bench.png", tmp_path / "single.svg"
    result = cli("bench", ckpts["good"], ckpts["pruned"], ckpts["broken"], *ARCH, *DATA, *FAST, "--plot", several,
                 "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.stderr
    data = several.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert json.loads((tmp_path / "b.json").read_text())["plot"] == str(several)
    result = cli("bench", ckpts["pruned"], *FAST, "--plot", single)  # one pruned file: before = its architecture
    assert result.exit_code == 0, result.stderr
    svg = single.read_text()
    assert "<svg" in svg and "unpruned architecture" in svg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "bench.png", "single.svg"]


def test_plot_without_matplotlib_fails_before_measuring(load_spy: list[str], ckpts: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    calls = load_spy
    result = cli("bench", ckpts["good"], ckpts["pruned"], *ARCH, *FAST, "--plot", tmp_path / "b.png",
                 "--json", tmp_path / "b.json")
    assert result.exit_code == 2
    assert "plots need matplotlib: pip install 'chanprune[plot]'" in _error_line(result.stderr)
    assert calls == [] and list(tmp_path.iterdir()) == []
    result = cli("bench", ckpts["pruned"], "--threads", "1", "--warmup", "0", "--repeats", "1", "--batch-sizes", "1")
    assert result.exit_code == 0, result.stderr  # without --plot, matplotlib is not needed


def test_plot_existing_file_needs_force(load_spy: list[str], ckpts: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "b.png"
    target.write_text("mine")
    calls = load_spy
    result = cli("bench", ckpts["pruned"], *FAST, "--plot", target)
    assert result.exit_code == 2
    assert "already exists; pass --force" in _error_line(result.stderr)
    assert target.read_text() == "mine" and calls == []
    result = cli("bench", ckpts["pruned"], *FAST, "--plot", target, "--json", target, "--force")
    assert result.exit_code == 2
    assert "--json and --plot both name" in _error_line(result.stderr)


def test_ctrl_c_while_drawing_leaves_no_partial_image(ckpts: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    real = Figure.savefig

    def cut(self: Any, fname: Any, *args: Any, **kwargs: Any) -> None:
        real(self, fname, *args, **kwargs)
        Path(fname).write_bytes(Path(fname).read_bytes()[:50])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", cut)
    result = cli("bench", ckpts["pruned"], *FAST, "--plot", tmp_path / "b.png")
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_outputs_never_overwrite_a_compared_checkpoint(ckpts: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "good.pt"
    copy.write_bytes(ckpts["good"].read_bytes())
    result = cli("bench", ckpts["pruned"], copy, *ARCH, "--json", copy, "--force")
    assert result.exit_code == 2
    assert "--json" in _error_line(result.stderr) and "is one of the checkpoints" in _error_line(result.stderr)
    assert copy.read_bytes() == ckpts["good"].read_bytes()
