"""Bad inputs through the real CLI: every failure is one `error:` line that says what is
wrong and what to do, with the documented exit code, no traceback and no output file.

The catalogue is data: each table row is (id, argv builder, expected exit code, message fragment).
A new command that reads checkpoints or data joins every relevant case by adding one entry to
`CKPT_COMMANDS` / `DATA_COMMANDS` (and its outputs to `WRITERS`); a new bad input is one more row.

Most cases run in-process with Typer's CliRunner on `chanprune_cli.cli.app` (fast); the cases
where the process matters (a malicious pickle per command, Ctrl-C) run `python -m chanprune_cli`.
Everything uses the built-in `digits_cnn` (1x8x8 inputs) and synthetic or tiny data, so the whole
file needs about a minute of CPU; the subprocesses of one kind run concurrently.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from chanprune_cli.cli import app
from chanprune_cli.models import build_model, parse_arch

ARCH = ("--arch", "digits_cnn")
runner = CliRunner()

# Words that make an error message actionable ("what to do"); every error line must contain one.
ACTIONS = ("pass ", "use ", "give ", "check ", "choose ", "re-", "create ", "fetch", "upgrade", "drop ", "accepted: ",
           "make ", "see ", "put ", "set ", "fix ", "must ", "expected ", "only if", "remove ", "pick ", "lower ", "ask ")


# --------------------------------------------------------------------------------------------
# helpers


@dataclass
class Ws:
    """One test's folders: `inp` for inputs made by the test, `out` for outputs (must stay empty on failure)."""

    inp: Path
    out: Path
    shared: Any  # the module-scoped `Files`

    def o(self, name: str) -> str:
        return str(self.out / name)


@pytest.fixture()
def ws(tmp_path: Path, files: Files, monkeypatch: pytest.MonkeyPatch) -> Ws:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # archives extract here, never in ~
    return Ws(tmp_path / "in", tmp_path / "out", files)


def cli(*args: str) -> Any:
    """Invoke the app in-process; CHANPRUNE_DEBUG from the caller's environment must not leak in."""
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


def error_line(stderr: str, fragment: str) -> str:
    """The single `error:` line; it names the problem (fragment) and says what to do. (A step that
    ran for a while before the failure may have logged `progress:` lines.)"""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("progress: ")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    assert any(word in line.lower() for word in ACTIONS), f"message does not say what to do: {line}"
    return line


def _results(stdout: str) -> str:
    """stdout without `chanprune run`'s stage headers ("[1/3] score: chanprune score ..."): on a
    failure nothing else may be there."""
    return "".join(line for line in stdout.splitlines(keepends=True) if not re.match(r"\[\d+/\d+\] \w+: ", line))


def assert_fails(result: Any, code: int, fragment: str, out: Path | None) -> str:
    assert result.exit_code == code, f"exit {result.exit_code} (want {code}): {result.stderr}"
    line = error_line(result.stderr, fragment)
    assert _results(result.stdout) == "", result.stdout
    if out is not None:
        assert sorted(p.name for p in out.iterdir()) == [], "a failed command left files behind"
    return line


def warning_lines(stderr: str) -> list[str]:
    """The `warning:` lines of a successful run (progress lines, e.g. finetune's steps, may surround them)."""
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def save_images(root: Path, classes: int = 2, per_class: int = 2, mode: str = "L", size: tuple[int, int] = (8, 8),
                corrupt: int = 0) -> Path:
    from PIL import Image

    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color = 30 * i + 5 * c if mode == "L" else (30 * i, 5 * c, 90)
            Image.new(mode, size, color=color).save(d / f"{i}.png")
        for i in range(corrupt):
            (d / f"broken{i}.png").write_bytes(b"\x89PNG but not really")
    return root


def raw_safetensors(path: Path, header: Any, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def rewrite_chanprune(src: Path, dst: Path, edit_doc: Callable[[dict], Any] | None = None,
                      edit_tensors: Callable[[dict], Any] | None = None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    doc = json.loads(meta["chanprune"])
    tensors = load_file(str(src))
    if edit_doc:
        edit_doc(doc)
    if edit_tensors:
        edit_tensors(tensors)
    meta["chanprune"] = json.dumps(doc)
    save_file(tensors, str(dst), metadata=meta)
    return dst


class Gadget:
    """Unpickling this calls `func(*args)`: with `open(marker, "w")` it proves code ran by creating a file."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def evil_pickle(path: Path, marker: Path, writer: str = "torch_zip", gadget: str = "open") -> Path:
    sd = build_model(parse_arch("digits_cnn")).state_dict()
    g = Gadget(open, str(marker), "w") if gadget == "open" else Gadget(os.system, f"touch {marker}")
    payload = {"state_dict": sd, "extra": g}
    if writer == "torch_zip":
        torch.save(payload, path)
    elif writer == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f, protocol=2)
    return path


# --------------------------------------------------------------------------------------------
# shared inputs (built once)


@dataclass
class Files:
    good: Path          # {'state_dict', 'arch'} of digits_cnn
    other: Path         # same architecture, other weights
    pruned: Path        # a valid chanprune file (digits_cnn, half the channels)
    scores: Path        # `chanprune score` of `good`
    resnet20: Path      # a state dict of another architecture
    whole: Path         # a whole pickled module (needs --trust-pickle)
    bomb: Path          # a zip checkpoint declaring 65 MiB in a few KB


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = build_model(parse_arch("digits_cnn"))
    torch.save({"state_dict": model.state_dict(), "arch": "digits_cnn"}, d / "good.pt")
    torch.manual_seed(1)
    torch.save(build_model(parse_arch("digits_cnn")).state_dict(), d / "other.pt")
    torch.save(build_model(parse_arch("cifar_resnet20")).state_dict(), d / "resnet20.pt")
    torch.save(model, d / "whole.pt")
    result = cli("prune", d / "good.pt", *ARCH, "--ratio", "0.5", "--out", d / "pruned.safetensors")
    assert result.exit_code == 0, result.stderr
    result = cli("score", d / "good.pt", *ARCH, "--criterion", "l1", "--out", d / "scores.safetensors")
    assert result.exit_code == 0, result.stderr
    # Zip bomb: a valid torch zip whose data record is replaced by 65 MiB of deflated zeros.
    torch.save({"w": torch.zeros(4)}, d / "small.pt")
    with zipfile.ZipFile(d / "small.pt") as zin, zipfile.ZipFile(d / "bomb.pt", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
        for info in zin.infolist():
            if info.filename.endswith("data/0"):
                with zout.open(info.filename, "w", force_zip64=True) as f:
                    for _ in range(65):
                        f.write(bytes(1 << 20))
            else:
                zout.writestr(info.filename, zin.read(info.filename))
    return Files(d / "good.pt", d / "other.pt", d / "pruned.safetensors", d / "scores.safetensors",
                 d / "resnet20.pt", d / "whole.pt", d / "bomb.pt")


# --------------------------------------------------------------------------------------------
# the commands (append a row when a command that reads checkpoints / data / writes files lands)

# bench with as little timing as it allows (one run at batch 1)
BENCH_FAST = ("--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--threads", "1")

# name -> builder(ws, ckpt, arch args) -> argv, for every command that reads a checkpoint
CKPT_COMMANDS: dict[str, Callable[[Ws, str, Sequence[str]], list[str]]] = {
    "analyze": lambda ws, ck, arch: ["analyze", ck, *arch, "--json", ws.o("report.json")],
    "score": lambda ws, ck, arch: ["score", ck, *arch, "--criterion", "l1", "--out", ws.o("scores.safetensors")],
    "prune": lambda ws, ck, arch: ["prune", ck, *arch, "--ratio", "0.5", "--out", ws.o("pruned.safetensors")],
    "finetune": lambda ws, ck, arch: ["finetune", ck, *arch, "--data", "synthetic:1x8x8:10:16", "--max-steps", "1",
                                      "--batch-size", "8", "--out", ws.o("ft.safetensors")],
    "bench": lambda ws, ck, arch: ["bench", ck, *arch, *BENCH_FAST, "--json", ws.o("bench.json")],
    "export": lambda ws, ck, arch: ["export", ck, *arch, "--format", "onnx", "--out", ws.o("model.onnx")],
    "run": lambda ws, ck, arch: ["run", _pipeline_config(ws, ck, arch), "--dir", ws.o("run")],
}


def _pipeline_config(ws: Ws, ckpt: str, arch: Sequence[str]) -> str:
    """A `chanprune run` config for `ckpt` (score + prune, then bench) in the input folder."""
    path = ws.inp / "pipeline.toml"
    options = dict(zip(arch[::2], arch[1::2]))  # ("--arch", A, "--arch-kwargs", K) -> config keys
    lines = [f"checkpoint = {json.dumps(ckpt)}"] + [f"{k[2:].replace('-', '_')} = {json.dumps(v)}" for k, v in options.items()]
    path.write_text("\n".join([*lines, "[prune]", "ratio = 0.5", "[bench]", "repeats = 1", "warmup = 0",
                               'batch_sizes = "1"', "[run]", 'stages = ["score", "prune", "bench"]', ""]))
    return str(path)

# name -> builder(ws, ckpt, data) -> argv, for every command that reads --data
DATA_COMMANDS: dict[str, Callable[[Ws, str, str], list[str]]] = {
    "analyze": lambda ws, ck, data: ["analyze", ck, *ARCH, "--data", data, "--json", ws.o("report.json")],
    "score": lambda ws, ck, data: ["score", ck, *ARCH, "--criterion", "taylor", "--data", data,
                                   "--out", ws.o("scores.safetensors")],
    "prune": lambda ws, ck, data: ["prune", ck, *ARCH, "--criterion", "taylor", "--data", data, "--ratio", "0.5",
                                   "--out", ws.o("pruned.safetensors")],
    "finetune": lambda ws, ck, data: ["finetune", ck, *ARCH, "--data", data, "--max-steps", "1", "--batch-size", "8",
                                      "--out", ws.o("ft.safetensors")],
    "bench": lambda ws, ck, data: ["bench", ck, *ARCH, *BENCH_FAST, "--data", data, "--json", ws.o("bench.json")],
}

# (id, builder(ws, out path) -> argv) for every output option: existing-file and atomicity checks
WRITERS: list[tuple[str, Callable[[Ws, str], list[str]]]] = [
    ("analyze--json", lambda ws, p: ["analyze", ws.shared.good, *ARCH, "--json", p]),
    ("score--out", lambda ws, p: ["score", ws.shared.good, *ARCH, "--criterion", "l1", "--out", p]),
    ("score--json", lambda ws, p: ["score", ws.shared.good, *ARCH, "--criterion", "l1", "--out", ws.o("s.safetensors"), "--json", p]),
    ("prune--out", lambda ws, p: ["prune", ws.shared.good, *ARCH, "--ratio", "0.5", "--out", p]),
    ("prune--json", lambda ws, p: ["prune", ws.shared.good, *ARCH, "--ratio", "0.5", "--out", ws.o("p.safetensors"), "--json", p]),
    ("finetune--out", lambda ws, p: ["finetune", ws.shared.good, *ARCH, "--data", "synthetic:1x8x8:10:16", "--max-steps", "1",
                                     "--batch-size", "8", "--out", p]),
    ("bench--json", lambda ws, p: ["bench", ws.shared.good, *ARCH, *BENCH_FAST, "--json", p]),
    ("export--out", lambda ws, p: ["export", ws.shared.good, *ARCH, "--format", "safetensors", "--out", p]),
    ("export--json", lambda ws, p: ["export", ws.shared.good, *ARCH, "--format", "onnx", "--out", ws.o("m.onnx"), "--json", p]),
]


# --------------------------------------------------------------------------------------------
# bad checkpoints: (id, maker(ws) -> path, arch args, exit, fragment), run through every command


def _write(name: str, data: bytes) -> Callable[[Ws], Path]:
    def make(ws: Ws) -> Path:
        (ws.inp / name).write_bytes(data)
        return ws.inp / name
    return make


def _truncated(name: str, legacy: bool = False) -> Callable[[Ws], Path]:
    def make(ws: Ws) -> Path:
        p = ws.inp / name
        torch.save(build_model(parse_arch("digits_cnn")).state_dict(), p, _use_new_zipfile_serialization=not legacy)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p
    return make


def _truncated_safetensors(ws: Ws) -> Path:
    data = ws.shared.pruned.read_bytes()
    (ws.inp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return ws.inp / "cut.safetensors"


def _png(ws: Ws) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(ws.inp / "photo.pt", format="PNG")
    return ws.inp / "photo.pt"


def _torchscript(ws: Ws) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, but such files exist
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(ws.inp / "scripted.pt"))
    return ws.inp / "scripted.pt"


def _directory(ws: Ws) -> Path:
    (ws.inp / "ckpt_dir").mkdir()
    return ws.inp / "ckpt_dir"


def _st(header: Any, data: bytes = b"", header_len: int | None = None) -> Callable[[Ws], Path]:
    return lambda ws: raw_safetensors(ws.inp / "lie.safetensors", header, data, header_len)


def _chanprune(edit_doc: Callable[[dict], Any] | None = None, edit_tensors: Callable[[dict], Any] | None = None) -> Callable[[Ws], Path]:
    return lambda ws: rewrite_chanprune(ws.shared.pruned, ws.inp / "edited.safetensors", edit_doc, edit_tensors)


def _swap_weights(tensors: dict) -> None:  # an unpruned model's weights under a pruned plan
    tensors.clear()
    tensors.update({k: v.contiguous() for k, v in build_model(parse_arch("digits_cnn")).state_dict().items()})


def _shrink_one(tensors: dict) -> None:  # one layer's weights lie about its width
    tensors["conv2.weight"] = tensors["conv2.weight"][:-1].contiguous()


_W = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}

CKPT_CASES: list[tuple[str, Callable[[Ws], Any], Sequence[str], int, str]] = [
    ("missing", lambda ws: ws.inp / "nope.pt", ARCH, 2, "does not exist"),
    ("empty", _write("empty.pt", b""), ARCH, 2, "is empty"),
    ("directory", _directory, ARCH, 2, "is a directory"),
    ("truncated-zip", _truncated("cut.pt"), ARCH, 2, "corrupt or truncated"),
    ("truncated-legacy", _truncated("cut_legacy.pt", legacy=True), ARCH, 2, "corrupt"),
    ("truncated-safetensors", _truncated_safetensors, ARCH, 2, "not a valid safetensors file"),
    ("random-bytes", _write("random.pt", np.random.default_rng(0).bytes(4096)), ARCH, 2, "not a PyTorch checkpoint"),
    ("random-bytes-pickle-marker", _write("random80.pt", b"\x80" + np.random.default_rng(1).bytes(4096)), ARCH, 2, "corrupt"),
    ("text-file", _write("notes.pt", b"hello, I am not a checkpoint\n"), ARCH, 2, "not a PyTorch checkpoint"),
    ("png-image", _png, ARCH, 2, "not a PyTorch checkpoint"),
    ("torchscript", _torchscript, ARCH, 2, "TorchScript archive"),
    ("zip-bomb", lambda ws: ws.shared.bomb, ARCH, 2, "zip bomb"),
    ("other-architecture", lambda ws: ws.shared.resnet20, ARCH, 2, "do not fit --arch digits_cnn"),
    ("wrong-arch-kwargs", lambda ws: ws.shared.good, (*ARCH, "--arch-kwargs", '{"num_classes": 5}'), 2,
     "fc2.weight (file [10, 64] vs model [5, 64])"),
    ("weights-without-arch", lambda ws: ws.shared.good, (), 2, "pass --arch"),
    ("pickled-module-untrusted", lambda ws: ws.shared.whole, (), 2, "--trust-pickle"),
    ("st-huge-header", _st(_W, bytes(8), header_len=10**15), ARCH, 2, "implausible header length"),
    ("st-header-longer-than-file", _st(_W, bytes(8), header_len=5000), ARCH, 2, "truncated"),
    ("st-offsets-outside-file", _st({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}, bytes(8)), ARCH, 2,
     "points outside the file"),
    ("st-shape-vs-bytes", _st({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8)), ARCH, 2, "does not match shape"),
    ("st-bad-dtype", _st({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), ARCH, 2, "unsupported dtype"),
    ("st-overlapping", _st({"a": _W["w"], "b": _W["w"]}, bytes(8)), ARCH, 2, "not a valid safetensors file"),
    ("st-header-not-json", _st(b"{" + b"\xff" * 30), ARCH, 2, "not valid JSON"),
    ("st-header-deeply-nested", _st(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), ARCH, 2, "not valid JSON"),
    ("chanprune-plan-vs-weights", _chanprune(edit_tensors=_swap_weights), (), 2, "do not fit its recorded plan"),
    ("chanprune-one-layer-lies", _chanprune(edit_tensors=_shrink_one), (), 2, "conv2.weight"),
    ("chanprune-newer-format", _chanprune(lambda d: d.update(format_version=99)), (), 2, "newer chanprune (format 99); upgrade"),
    ("chanprune-metadata-not-json", _chanprune(lambda d: d.clear()), (), 2, "malformed"),
    ("chanprune-unknown-module", _chanprune(lambda d: d["module_shapes"].update(ghost={"num_features": 3})), (), 2, "ghost"),
    ("numpy-npz", lambda ws: _npz(ws.inp / "arrays.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2, np.int64)),
     ARCH, 2, "is a NumPy .npz archive of arrays (images, labels), not a model checkpoint"),
    ("numpy-npy", lambda ws: _npy(ws.inp / "weights.npy", np.zeros((10, 64), np.float32)), ARCH, 2,
     "is a NumPy .npy array, not a model checkpoint"),
]


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _npy(path: Path, array: Any) -> Path:
    np.save(path, array)
    return path


@pytest.mark.parametrize("command", list(CKPT_COMMANDS))
@pytest.mark.parametrize(("case", "make", "arch", "code", "fragment"), CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoint(ws: Ws, command: str, case: str, make: Callable[[Ws], Any], arch: Sequence[str], code: int,
                        fragment: str) -> None:
    ckpt = str(make(ws))
    result = cli(*CKPT_COMMANDS[command](ws, ckpt, arch))
    line = assert_fails(result, code, fragment, ws.out)
    if case != "missing" and ckpt not in line and case not in ("other-architecture", "wrong-arch-kwargs"):
        assert Path(ckpt).name in line, f"the message should name the file: {line}"


# What each command does with NaN/Inf weights: "warn" (report, exit 0) or "refuse" (exit 2, naming them).
NAN_POLICY = {"analyze": "warn", "score": "refuse", "prune": "refuse", "finetune": "refuse", "bench": "warn",
              "export": "refuse"}
# Commands whose gap is known and not yet fixed (their modules belong to other work in progress).
@pytest.mark.parametrize("command", CKPT_COMMANDS)
def test_nan_weights(ws: Ws, command: str) -> None:
    """NaN/Inf weights: analyze reports them (warning), the other commands refuse, naming the tensors."""
    sd = build_model(parse_arch("digits_cnn")).state_dict()
    sd["conv2.weight"][0, 0, 0, 0] = float("nan")
    sd["bn1.running_var"][3] = float("inf")
    torch.save(sd, ws.inp / "nan.pt")
    result = cli(*CKPT_COMMANDS[command](ws, str(ws.inp / "nan.pt"), ARCH))
    if NAN_POLICY.get(command, "refuse") == "warn":
        assert result.exit_code == 0, result.stderr
        (line,) = warning_lines(result.stderr)
        assert "conv2.weight" in line and "bn1.running_var" in line
    else:
        assert_fails(result, 2, "NaN/Inf weights in conv2.weight, bn1.running_var", ws.out)


# --------------------------------------------------------------------------------------------
# code execution: nothing from an untrusted file ever runs


@pytest.mark.parametrize(("writer", "gadget"), [("torch_zip", "open"), ("torch_legacy", "open"), ("plain_pickle", "open"),
                                                ("torch_zip", "os.system"), ("plain_pickle", "os.system")])
@pytest.mark.parametrize("command", list(CKPT_COMMANDS))
def test_malicious_pickle_in_process(ws: Ws, command: str, writer: str, gadget: str) -> None:
    marker = ws.inp / "PWNED"
    ckpt = evil_pickle(ws.inp / "evil.pt", marker, writer, gadget)
    result = cli(*CKPT_COMMANDS[command](ws, str(ckpt), ARCH))
    assert not marker.exists(), "code from the checkpoint ran"
    assert_fails(result, 2, "--trust-pickle" if writer == "torch_zip" else "evil.pt", ws.out)


def test_malicious_pickle_gadget_is_real(ws: Ws) -> None:
    """Control: with --trust-pickle the same file does run its code, so the tests above mean something."""
    marker = ws.inp / "PWNED"
    ckpt = evil_pickle(ws.inp / "evil.pt", marker)
    result = cli("analyze", ckpt, *ARCH, "--trust-pickle")
    assert marker.exists()
    assert result.exit_code == 0, result.stderr


# Every option that reads a file someone else may have made: the checkpoint of each command, plus
# `prune --scores` and `finetune --teacher` (an evil file given there must not run either).
READERS: dict[str, Callable[[Ws, str], list[Any]]] = {
    **{name: lambda ws, ck, build=build: build(ws, ck, ARCH) for name, build in CKPT_COMMANDS.items()},
    "prune--scores": lambda ws, ck: ["prune", ws.shared.good, *ARCH, "--scores", ck, "--ratio", "0.5", "--out", ws.o("p.safetensors")],
    "finetune--teacher": lambda ws, ck: ["finetune", ws.shared.good, *ARCH, "--data", "synthetic:1x8x8:10:16", "--max-steps", "1",
                                         "--batch-size", "8", "--teacher", ck, "--out", ws.o("ft.safetensors")],
}


def _workspaces(root: Path, names: Sequence[str], files: Files) -> dict[str, Ws]:
    out = {}
    for name in names:
        (root / name / "in").mkdir(parents=True)
        (root / name / "out").mkdir()
        out[name] = Ws(root / name / "in", root / name / "out", files)
    return out


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CHANPRUNE_DEBUG"}
    env.update(extra)
    return env


def _default_sigint() -> None:
    # A shell starts background jobs (`make test &`, CI runners) with SIGINT ignored and children
    # inherit that; an interactive terminal's Ctrl-C reaches a command with the default action.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv: Sequence[Any], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "chanprune_cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint)


@pytest.fixture(scope="module")
def malicious_runs(tmp_path_factory: pytest.TempPathFactory, files: Files) -> dict[str, tuple[Ws, Any]]:
    """Every reader run as `python -m chanprune_cli` on an evil pickle, all at once (process start dominates)."""
    spaces = _workspaces(tmp_path_factory.mktemp("malicious"), list(READERS), files)
    procs = {}
    for reader, w in spaces.items():
        ckpt = evil_pickle(w.inp / "evil.pt", w.inp / "PWNED")
        procs[reader] = _start(READERS[reader](w, str(ckpt)), _env())
    results = {}
    for reader, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[reader] = (spaces[reader], subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.mark.parametrize("reader", list(READERS))
def test_malicious_pickle_real_entry_point(malicious_runs: dict[str, tuple[Ws, Any]], reader: str) -> None:
    """`python -m chanprune_cli` with a checkpoint whose unpickling would create a file: it never appears."""
    w, proc = malicious_runs[reader]
    assert not (w.inp / "PWNED").exists(), "code from the checkpoint ran"
    assert proc.returncode == 2, proc.stderr
    error_line(proc.stderr, "not a chanprune score file" if reader == "prune--scores" else "--trust-pickle")
    assert _results(proc.stdout) == ""
    assert list(w.out.iterdir()) == []


@pytest.mark.parametrize("command", list(CKPT_COMMANDS))
def test_chanprune_file_naming_a_factory_runs_nothing(ws: Ws, command: str) -> None:
    """A chanprune file may record `package.module:factory`; an untrusted one must not get it imported and called."""
    marker = ws.inp / "PWNED"
    evil = {"name": "builtins:open", "kwargs": {"file": str(marker), "mode": "w"}}
    ckpt = rewrite_chanprune(ws.shared.pruned, ws.inp / "factory.safetensors", lambda d: d.update(arch=evil))
    result = cli(*CKPT_COMMANDS[command](ws, str(ckpt), ()))
    assert not marker.exists(), "a factory named by the file was called"
    assert_fails(result, 2, "pass --arch builtins:open", ws.out)
    if command == "analyze":  # control: naming the factory is consent, and then it does run
        result = cli("analyze", ckpt, "--arch", "builtins:open")
        assert marker.exists()
        assert_fails(result, 2, "not a torch.nn.Module", None)


# --------------------------------------------------------------------------------------------
# bad data: (id, maker(ws) -> --data value, exit, fragment), run through every data command


def _tar(name: str, members: Callable[[tarfile.TarFile], None], mode: str = "w") -> Callable[[Ws], str]:
    def make(ws: Ws) -> str:
        with tarfile.open(ws.inp / name, mode) as tf:
            members(tf)
        return str(ws.inp / name)
    return make


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, (len(data) if kind == tarfile.REGTYPE else 0)
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _empty_dir(ws: Ws) -> str:
    (ws.inp / "empty").mkdir()
    return str(ws.inp / "empty")


DATA_CASES: list[tuple[str, Callable[[Ws], str], int, str]] = [
    ("missing", lambda ws: str(ws.inp / "nowhere"), 2, "does not exist"),
    ("empty-directory", _empty_dir, 2, "is empty"),
    ("all-images-corrupt", lambda ws: str(save_images(ws.inp / "bad", per_class=0, corrupt=1)), 2,
     "no readable images"),
    ("tar-path-traversal", _tar("up.tar", lambda tf: _add(tf, "../escaped.txt")), 2, "climbs out of the archive"),
    ("tar-nested-traversal", _tar("up2.tar.gz", lambda tf: _add(tf, "data/c0/../../../escaped.txt"), "w:gz"), 2,
     "climbs out of the archive"),
    ("tar-absolute-path", _tar("abs.tar", lambda tf: _add(tf, "/tmp/chanprune-escaped.txt")), 2, "absolute path"),
    ("tar-link-outside", _tar("link.tar", lambda tf: _add(tf, "c0/x.png", kind=tarfile.SYMTYPE, link="/etc/passwd")), 2,
     "links outside the archive"),
    ("tar-corrupt", lambda ws: str(_write("broken.tar.gz", b"\x1f\x8b" + b"junk" * 8)(ws)), 2, "cannot read archive"),
    ("not-an-archive", lambda ws: str(_write("data.csv", b"1,2\n")(ws)), 2, "not a .tar"),
    ("unknown-scheme", lambda ws: "s3://bucket/val", 2, "unknown data source 's3'"),
    ("rgb-shape-for-gray-model", lambda ws: "synthetic:3x8x8:10:64", 2, "makes 3x8x8 inputs but the input shape is 1x8x8"),
    ("labels-beyond-classes", lambda ws: "synthetic:1x8x8:20:64", 2, "but the model outputs 10"),
    ("folders-beyond-classes", lambda ws: str(save_images(ws.inp / "twelve", classes=12, per_class=1)), 2,
     "but the model outputs 10"),
    ("npz-without-labels", lambda ws: str(_npz(ws.inp / "x.npz", images=np.zeros((16, 8, 8), np.uint8))), 2, "no labels"),
    ("npz-pickled-objects", lambda ws: str(_npz(ws.inp / "o.npz", images=np.array([None] * 16, dtype=object),
                                                labels=np.zeros(16, np.int64))), 2, "without unpickling"),
    ("npz-signals-for-an-image-model", lambda ws: str(_npz(ws.inp / "s.npz", x=np.zeros((16, 64), np.float32),
                                                           y=np.arange(16) % 10)), 2,
     "1-D signals N×L or N×C×L need --input-shape L or C,L"),
    ("npz-labels-beyond-classes", lambda ws: str(_npz(ws.inp / "l.npz", images=np.zeros((16, 8, 8), np.uint8),
                                                      labels=np.arange(16))), 2, "but the model outputs 10"),
]


@pytest.mark.parametrize("command", list(DATA_COMMANDS))
@pytest.mark.parametrize(("case", "make", "code", "fragment"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(ws: Ws, command: str, case: str, make: Callable[[Ws], str], code: int, fragment: str) -> None:
    data = make(ws)
    result = cli(*DATA_COMMANDS[command](ws, str(ws.shared.good), data))
    line = assert_fails(result, code, fragment, ws.out)
    if case == "all-images-corrupt":
        assert "2 files could not be decoded" in line  # says which: how many, and where
    if case.startswith("tar-"):
        for escaped in (ws.inp.parent / "escaped.txt", ws.inp / "escaped.txt", Path("/tmp/chanprune-escaped.txt")):
            assert not escaped.exists()


# usable data with a problem worth a warning: (id, maker, warning fragment); 10 classes, as the model
# has outputs (fewer is a warning of its own)
DATA_WARNINGS: list[tuple[str, Callable[[Ws], str], str]] = [
    ("some-images-corrupt", lambda ws: str(save_images(ws.inp / "some", classes=10, per_class=1, corrupt=1)),
     "skipped 10 unreadable image file(s)"),
    ("rgb-images-for-gray-model", lambda ws: str(save_images(ws.inp / "rgb", classes=10, per_class=1, mode="RGB")),
     "converting them to grayscale"),
    ("images-of-another-size", lambda ws: str(_npz(ws.inp / "big.npz", images=np.zeros((20, 10, 10), np.uint8),
                                                   labels=np.arange(20) % 10)),
     "are 10x10 but the model takes 8x8; resizing them"),
]


@pytest.mark.parametrize("command", list(DATA_COMMANDS))
@pytest.mark.parametrize(("case", "make", "fragment"), DATA_WARNINGS, ids=[c[0] for c in DATA_WARNINGS])
def test_data_warnings(ws: Ws, command: str, case: str, make: Callable[[Ws], str], fragment: str) -> None:
    result = cli(*DATA_COMMANDS[command](ws, str(ws.shared.good), make(ws)))
    assert result.exit_code == 0, result.stderr
    lines = warning_lines(result.stderr)
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    if case == "some-images-corrupt":
        assert "broken0.png" in lines[0]  # names an example file


@pytest.mark.parametrize("command", ["analyze", "score", "prune"])
def test_images_without_known_input_size(ws: Ws, command: str) -> None:
    """A pickled module records no input size, so it is taken from the data: 32x32 images (3 channels),
    which this 1x8x8 model does not take. One line says so and asks for --input-shape."""
    data = str(save_images(ws.inp / "big", size=(32, 32)))
    argv = DATA_COMMANDS[command](ws, str(ws.shared.whole), data)
    argv = [a for a in argv if a not in ARCH] + ["--trust-pickle"]
    if command == "prune":  # a pickled model is written back as a pickle
        argv = [ws.o("pruned.pt") if a == ws.o("pruned.safetensors") else a for a in argv]
    line = assert_fails(cli(*argv), 2, "does not run on 3x32x32 inputs", ws.out)
    assert "pass --input-shape" in line


# --------------------------------------------------------------------------------------------
# bad options: (id, builder(ws) -> argv, exit, fragment)


def _prune(*extra: Any) -> Callable[[Ws], list[Any]]:
    return lambda ws: ["prune", ws.shared.good, *ARCH, "--out", ws.o("p.safetensors"), *extra]


def _score(*extra: Any) -> Callable[[Ws], list[Any]]:
    return lambda ws: ["score", ws.shared.good, *ARCH, "--out", ws.o("s.safetensors"), *extra]


def _prune_layernorm_scores(*extra: Any) -> Callable[[Ws], list[Any]]:
    """prune --scores with scores made by `score --through-layernorm`."""
    def build(ws: Ws) -> list[Any]:
        scores = ws.inp / "ln.scores.safetensors"
        result = cli("score", ws.shared.good, *ARCH, "--criterion", "l1", "--through-layernorm", "--out", scores)
        assert result.exit_code == 0, result.stderr
        return _prune("--ratio", "0.5", "--scores", scores, *extra)(ws)
    return build


OPTION_CASES: list[tuple[str, Callable[[Ws], list[Any]], int, str]] = [
    ("prune-ratio-0", _prune("--ratio", "0"), 2, "--ratio must be between 0 and 1"),
    ("prune-ratio-1", _prune("--ratio", "1"), 2, "--ratio must be between 0 and 1"),
    ("prune-ratio-1.5", _prune("--ratio", "1.5"), 2, "--ratio must be between 0 and 1"),
    ("prune-ratio-negative", _prune("--ratio", "-0.2"), 2, "--ratio must be between 0 and 1"),
    ("prune-ratio-nan", _prune("--ratio", "nan"), 2, "--ratio must be between 0 and 1"),
    ("prune-ratio-not-a-number", _prune("--ratio", "half"), 2, "Invalid value for '--ratio'"),
    ("prune-target-flops-1", _prune("--target-flops", "1"), 2, "--target-flops must be between 0 and 1"),
    ("prune-target-flops-unreachable", _prune("--target-flops", "0.99"), 2, "--target-flops 0.99 is unreachable"),
    ("score-ratio-2", _score("--criterion", "l1", "--ratio", "2"), 2, "--ratio must be between 0 and 1"),
    ("prune-unknown-criterion", _prune("--ratio", "0.5", "--criterion", "magic"), 2, "unknown criterion 'magic'"),
    ("score-unknown-criterion", _score("--criterion", "magic"), 2, "unknown criterion 'magic'"),
    ("analyze-unknown-arch", lambda ws: ["analyze", ws.shared.good, "--arch", "resnet_9000"], 2, "unknown architecture"),
    ("score-unknown-arch",
     lambda ws: ["score", ws.shared.good, "--arch", "resnet_9000", "--criterion", "l1", "--out", ws.o("s.safetensors")],
     2, "unknown architecture"),
    ("prune-unknown-arch", lambda ws: ["prune", ws.shared.good, "--arch", "resnet_9000", "--ratio", "0.5", "--out", ws.o("p.safetensors")],
     2, "unknown architecture"),
    ("analyze-arch-kwargs-not-json", lambda ws: ["analyze", ws.shared.good, *ARCH, "--arch-kwargs", "{num_classes: 10"], 2,
     "--arch-kwargs is not valid JSON"),
    ("prune-round-to-above-every-layer", _prune("--ratio", "0.5", "--round-to", "1000"), 2,
     "--round-to 1000 is larger than every prunable layer"),
    ("prune-min-keep-0", _prune("--ratio", "0.5", "--min-keep", "0"), 2, "--min-keep must be positive"),
    ("prune-normalize-unknown", _prune("--target-flops", "0.5", "--normalize", "max"), 2, "--normalize must be auto, mean or none"),
    ("prune-rounds-with-ratio", _prune("--ratio", "0.5", "--rounds", "3"), 2, "--rounds needs --target-flops"),
    ("prune-rounds-with-scores", lambda ws: _prune("--target-flops", "0.5", "--rounds", "3", "--scores", ws.shared.scores)(ws), 2,
     "--rounds rescores the model"),
    ("prune-rounds-0", _prune("--target-flops", "0.5", "--rounds", "0"), 2, "Invalid value for '--rounds'"),
    ("prune-ratio-and-target-flops", _prune("--ratio", "0.5", "--target-flops", "0.5"), 2, "exactly one of --ratio"),
    ("prune-neither-ratio-nor-target", _prune(), 2, "exactly one of --ratio"),
    ("prune-criterion-and-scores", lambda ws: _prune("--ratio", "0.5", "--criterion", "l1", "--scores", ws.shared.scores)(ws), 2,
     "either --criterion or --scores"),
    ("prune-data-criterion-without-data", _prune("--ratio", "0.5", "--criterion", "taylor"), 2, "pass --data"),
    ("score-data-criterion-without-data", _score("--criterion", "taylor"), 2, "pass --data"),
    ("prune-json-is-out", lambda ws: _prune("--ratio", "0.5", "--json", ws.o("p.safetensors"))(ws), 2, "--out and --json both name"),
    ("score-json-is-out", lambda ws: _score("--criterion", "l1", "--json", ws.o("s.safetensors"))(ws), 2, "--out and --json both name"),
    ("prune-scores-missing", lambda ws: _prune("--ratio", "0.5", "--scores", ws.inp / "none.safetensors")(ws), 2,
     "score file"),
    ("prune-scores-not-scores", lambda ws: _prune("--ratio", "0.5", "--scores", ws.shared.pruned)(ws), 2,
     "not a chanprune score file"),
    ("prune-scores-other-model", lambda ws: ["prune", ws.shared.other, *ARCH, "--scores", ws.shared.scores, "--ratio", "0.5",
                                             "--out", ws.o("p.safetensors")], 2, "scores for a different model"),
    ("analyze-missing-ckpt", lambda ws: ["analyze"], 2, "give a checkpoint path"),
    ("export-unknown-format", lambda ws: ["export", ws.shared.good, *ARCH, "--format", "tflite", "--out", ws.o("m.tflite")], 2,
     "unknown --format 'tflite'"),
    ("export-format-not-inferable", lambda ws: ["export", ws.shared.good, *ARCH, "--out", ws.o("model.bin")], 2,
     "cannot tell the export format"),
    ("export-opset-out-of-range", lambda ws: ["export", ws.shared.good, *ARCH, "--out", ws.o("m.onnx"), "--opset", "99"], 2,
     "--opset 99 is not supported"),
    ("export-tolerance-negative", lambda ws: ["export", ws.shared.good, *ARCH, "--out", ws.o("m.onnx"), "--tolerance", "-1"], 2,
     "--tolerance must be a positive number"),
    ("export-json-is-out", lambda ws: ["export", ws.shared.good, *ARCH, "--out", ws.o("m.onnx"), "--json", ws.o("m.onnx")], 2,
     "--out and --json both name"),
    ("export-missing-out", lambda ws: ["export", ws.shared.good, *ARCH, "--format", "onnx"], 2, "--out"),
    ("export-pickle-to-safetensors", lambda ws: ["export", ws.shared.whole, "--trust-pickle", "--input-shape", "1,8,8",
                                                 "--out", ws.o("m.safetensors")], 2, "records no architecture"),
    ("analyze-input-shape-malformed", lambda ws: ["analyze", ws.shared.good, *ARCH, "--input-shape", "1,8,8,1"], 2,
     "expected C,H,W (images), C,L or L (1-D signals)"),
    ("analyze-signal-shape-for-an-image-model", lambda ws: ["analyze", ws.shared.good, *ARCH, "--input-shape", "1,64",
                                                            "--data", "digits:test"], 2,
     "the model does not run on inputs of shape 1,64"),
    ("analyze-input-shape-wrong-channels", lambda ws: ["analyze", ws.shared.good, *ARCH, "--input-shape", "3,8,8"], 2,
     "check --input-shape"),
    ("analyze-bad-mean", lambda ws: ["analyze", ws.shared.good, *ARCH, "--data", "digits:test", "--mean", "abc"], 2, "--mean"),
    ("analyze-bad-device", lambda ws: ["analyze", ws.shared.good, *ARCH, "--data", "digits:test", "--device", "tpu"], 2,
     "unknown --device 'tpu'"),
    ("init-ratio-out-of-range", lambda ws: ["init", "--ratio", "1.5", "--out", ws.o("chanprune.toml")], 2,
     "--ratio must be between 0 and 1"),
    ("init-unknown-criterion", lambda ws: ["init", "--criterion", "magic", "--out", ws.o("chanprune.toml")], 2,
     "unknown criterion 'magic'"),
    ("init-gate-not-positive", lambda ws: ["init", "--min-speedup", "0", "--out", ws.o("chanprune.toml")], 2,
     "--min-speedup must be positive"),
    ("init-bad-input-shape", lambda ws: ["init", "--input-shape", "3,32,32,1", "--out", ws.o("chanprune.toml")], 2,
     "C,H,W"),
    ("prune-batch-size-0", _prune("--ratio", "0.5", "--batch-size", "0"), 2, "--batch-size"),
    ("prune-unknown-option", _prune("--ratio", "0.5", "--ratios", "0.5"), 2, "No such option: --ratios"),
    ("unknown-command", lambda ws: ["shrink", ws.shared.good], 2, "No such command 'shrink'"),
    ("prune-pickled-to-safetensors", lambda ws: ["prune", ws.shared.whole, "--trust-pickle", "--input-shape", "1,8,8",
                                                 "--ratio", "0.5", "--out", ws.o("p.safetensors")], 2, "give --out a .pt path"),
    ("finetune-pickled-to-safetensors", lambda ws: ["finetune", ws.shared.whole, "--trust-pickle", "--input-shape", "1,8,8",
                                                    "--data", "synthetic:1x8x8:10:16", "--max-steps", "1",
                                                    "--out", ws.o("f.safetensors")], 2, "give --out a .pt path"),
    ("finetune-dcph-pickled", lambda ws: ["finetune", ws.shared.whole, "--trust-pickle", "--input-shape", "1,8,8", "--data",
                                          "synthetic:1x8x8:10:16", "--schedule", "cac", "--dcph", "--max-steps", "1",
                                          "--out", ws.o("f.pt")], 2, "this pickled model records none"),
    ("finetune-loss-unknown", lambda ws: ["finetune", ws.shared.good, *ARCH, "--data", "synthetic:1x8x8:10:16",
                                          "--loss", "l1", "--out", ws.o("f.safetensors")], 2,
     "--loss must be one of auto, ce, bce, mse, got 'l1'"),
    ("finetune-kd-with-bce", lambda ws: ["finetune", ws.shared.good, *ARCH, "--data", "synthetic:1x8x8:10:16",
                                         "--loss", "bce", "--teacher", ws.shared.good, "--out", ws.o("f.safetensors")], 2,
     "needs --loss ce on logits, but the loss is bce"),
    ("analyze-pickle-no-input-shape", lambda ws: ["analyze", ws.shared.whole, "--trust-pickle"], 2,
     "or --data to take it from the data"),
    ("analyze-output-malformed", lambda ws: ["analyze", ws.shared.good, *ARCH, "--output", "1..2"], 2,
     "--output '1..2': give an output index or key"),
    ("prune-output-malformed", _prune("--ratio", "0.5", "--output", ""), 2, "give an output index or key"),
    ("prune-scores-made-through-layernorm", _prune_layernorm_scores(), 2, "was scored with --through-layernorm"),
    ("prune-through-layernorm-scores-made-without", lambda ws: _prune("--ratio", "0.5", "--scores", ws.shared.scores,
                                                                      "--through-layernorm")(ws), 2,
     "was scored without it"),
]


@pytest.mark.parametrize(("case", "build", "code", "fragment"), OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_options(ws: Ws, case: str, build: Callable[[Ws], list[Any]], code: int, fragment: str) -> None:
    assert_fails(cli(*build(ws)), code, fragment, ws.out)


# accepted options that deserve a warning: (id, builder, warning fragment)
OPTION_WARNINGS: list[tuple[str, Callable[[Ws], list[Any]], str]] = [
    ("ignore-matches-nothing", _prune("--ratio", "0.5", "--ignore", "decoder.*"), "--ignore 'decoder.*' matches no module"),
    ("round-to-above-some-layers", _prune("--ratio", "0.5", "--round-to", "24"), "--round-to 24 is not below the width"),
]


@pytest.mark.parametrize(("case", "build", "fragment"), OPTION_WARNINGS, ids=[c[0] for c in OPTION_WARNINGS])
def test_option_warnings(ws: Ws, case: str, build: Callable[[Ws], list[Any]], fragment: str) -> None:
    result = cli(*build(ws))
    assert result.exit_code == 0, result.stderr
    lines = warning_lines(result.stderr)
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert (ws.out / "p.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# outputs: no surprise overwrite, early failure, atomic writes, Ctrl-C


@pytest.mark.parametrize(("writer", "build"), WRITERS, ids=[w[0] for w in WRITERS])
def test_existing_output_needs_force(ws: Ws, writer: str, build: Callable[[Ws, str], list[Any]]) -> None:
    target = ws.out / "mine.bin"
    target.write_text("the user's file")
    result = cli(*build(ws, str(target)))
    assert result.exit_code == 2, result.stderr
    error_line(result.stderr, "already exists; pass --force")
    assert target.read_text() == "the user's file"
    assert sorted(p.name for p in ws.out.iterdir()) == ["mine.bin"]  # and nothing else was written either


def test_force_overwrites(ws: Ws) -> None:
    target = ws.out / "p.safetensors"
    target.write_text("old")
    result = cli("prune", ws.shared.good, *ARCH, "--ratio", "0.5", "--out", target, "--force")
    assert result.exit_code == 0, result.stderr
    assert target.read_bytes() != b"old"
    assert sorted(p.name for p in ws.out.iterdir()) == ["p.safetensors"]  # no temp file left


UNWRITABLE: list[tuple[str, Callable[[Ws], str], str]] = [
    ("missing-directory", lambda ws: str(ws.out / "no" / "such" / "dir" / "x.out"), "does not exist; create it first"),
    ("is-a-directory", lambda ws: str(ws.out), "is a directory; give a file path"),
]


@pytest.mark.parametrize(("case", "dest", "fragment"), UNWRITABLE, ids=[u[0] for u in UNWRITABLE])
@pytest.mark.parametrize(("writer", "build"), WRITERS, ids=[w[0] for w in WRITERS])
def test_unwritable_destination_fails_before_loading(ws: Ws, load_spy: list[str], writer: str,
                                                     build: Callable[[Ws, str], list[Any]], case: str,
                                                     dest: Callable[[Ws], str], fragment: str) -> None:
    result = cli(*build(ws, dest(ws)))
    assert result.exit_code == 2, result.stderr
    error_line(result.stderr, fragment)
    assert load_spy == [], "the checkpoint was loaded before the output was checked"
    assert sorted(p.name for p in ws.out.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: file permissions do not stop root from writing, so a read-only folder is writable")
@pytest.mark.parametrize(("writer", "build"), WRITERS, ids=[w[0] for w in WRITERS])
def test_read_only_directory_fails_before_loading(ws: Ws, load_spy: list[str], writer: str,
                                                  build: Callable[[Ws, str], list[Any]]) -> None:
    locked = ws.out / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = cli(*build(ws, str(locked / "x.out")))
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2, result.stderr
    error_line(result.stderr, "not writable")
    assert load_spy == []


@pytest.mark.parametrize(("writer", "build"), WRITERS, ids=[w[0] for w in WRITERS])
def test_ctrl_c_while_writing_leaves_no_partial_file(ws: Ws, monkeypatch: pytest.MonkeyPatch, writer: str,
                                                     build: Callable[[Ws, str], list[Any]]) -> None:
    import safetensors.torch

    import chanprune_cli.prune.scoring

    target = ws.out / ("out.json" if writer.endswith("json") else "out.safetensors")
    if writer.endswith("json"):
        real_write_text = Path.write_text

        def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
            if self.name.startswith(f".{target.name}."):  # the temp file of our output: cut it short
                real_write_text(self, data[: len(data) // 2], *args, **kwargs)
                raise KeyboardInterrupt
            return real_write_text(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    else:
        def cut(tensors: Any, filename: str, metadata: Any = None) -> None:
            real_save(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:50])
            raise KeyboardInterrupt

        real_save = safetensors.torch.save_file
        monkeypatch.setattr(safetensors.torch, "save_file", cut)
        monkeypatch.setattr(chanprune_cli.prune.scoring, "save_file", cut)
        real_write_bytes = Path.write_bytes

        def write_bytes(self: Path, data: bytes) -> int:  # support.fsutil.write_safetensors (models, exports)
            if self.name.startswith(f".{target.name}."):
                real_write_bytes(self, data[:50])
                raise KeyboardInterrupt
            return real_write_bytes(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    result = cli(*build(ws, str(target)))
    assert result.exit_code == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in result.stderr
    assert not target.exists()
    leftovers = [p.name for p in ws.out.iterdir() if p.name.startswith(f".{target.name}.")]
    assert leftovers == [], "a temp file was left behind"


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory: pytest.TempPathFactory, files: Files) -> dict[str, tuple[Ws, int | None, str]]:
    """Every data command run as `python -m chanprune_cli`, blocked reading --data from a FIFO (so every
    option and output check has passed and the work has begun), then sent SIGINT; all at once."""
    spaces = _workspaces(tmp_path_factory.mktemp("interrupted"), list(DATA_COMMANDS), files)
    procs, fds = {}, {}
    for command, w in spaces.items():
        os.mkfifo(w.inp / "calibration.tar")
        argv = DATA_COMMANDS[command](w, str(files.good), str(w.inp / "calibration.tar"))
        procs[command] = _start(argv, _env(XDG_CACHE_HOME=str(w.inp / "cache")))
    results: dict[str, tuple[Ws, int | None, str]] = {}
    deadline = time.monotonic() + 300
    try:
        while len(fds) + len(results) < len(procs):  # wait for each to open its FIFO, then interrupt it
            for command, proc in procs.items():
                if command in fds or command in results:
                    continue
                try:  # the write end opens once the command has opened the FIFO to read it
                    fds[command] = os.open(spaces[command].inp / "calibration.tar", os.O_WRONLY | os.O_NONBLOCK)
                    proc.send_signal(signal.SIGINT)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    if proc.poll() is not None:  # ended before reading the data: reported below
                        results[command] = (spaces[command], proc.returncode, "never read the data: " + proc.communicate()[1])
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for command, proc in procs.items():
            if command in results:
                continue
            try:
                _, stderr = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                # The signal can land on a helper thread while the main one sleeps in read(): Python
                # has recorded it but runs the handler only once read() returns, so end the read (EOF).
                if command in fds:
                    os.close(fds.pop(command))
                _, stderr = proc.communicate(timeout=120)
            results[command] = (spaces[command], proc.returncode, stderr)
    finally:
        for fd in fds.values():
            os.close(fd)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("command", list(DATA_COMMANDS))
def test_ctrl_c_real_entry_point(interrupted_runs: dict[str, tuple[Ws, int | None, str]], command: str) -> None:
    """Ctrl-C in the middle of a command: exit 130, one `interrupted` line, nothing left in the output folder."""
    w, code, stderr = interrupted_runs[command]
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in stderr
    assert sorted(p.name for p in w.out.iterdir()) == [], "an interrupted command left files behind"


# --------------------------------------------------------------------------------------------
# exit codes and --debug


def test_debug_shows_traceback_for_bad_input(ws: Ws) -> None:
    (ws.inp / "empty.pt").write_bytes(b"")
    result = runner.invoke(app, ["--debug", "prune", str(ws.inp / "empty.pt"), *ARCH, "--ratio", "0.5",
                                 "--out", ws.o("p.safetensors")], env={"CHANPRUNE_DEBUG": None})
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert list(ws.out.iterdir()) == []


def test_usage_error_of_the_root_is_one_line() -> None:
    result = cli("--no-such-flag")
    assert result.exit_code == 2
    error_line(result.stderr, "No such option: --no-such-flag")


# --------------------------------------------------------------------------------------------
# chanprune run: every value of every stage is checked before the first stage runs, and the error
# names the key as it was written (`--set bench.calib_batches`, not `--calib-batches`)


RUN_VALUE_CASES: list[tuple[str, list[str], tuple[str, str], str]] = [
    ("set-not-an-int", ["--set", "bench.calib_batches=four"], ("", ""), "--set bench.calib_batches = 'four'"),
    ("set-below-range", ["--set", "prune.round_to=0"], ("", ""), "--set prune.round_to = 0"),
    ("set-shared-key", ["--set", "batch_size=big"], ("", ""), "--set batch_size = 'big'"),
    ("file-not-a-number", [], ("repeats = 1", 'repeats = "many"'), "pipeline.toml [bench] repeats = 'many'"),
    ("run-stages-not-names", ["--set", "run.stages=3"], ("", ""), "--set run.stages = 3"),
    # values the commands' options objects check (their messages, after where the value was set)
    ("set-ratio-out-of-range", ["--set", "prune.ratio=1.5"], ("", ""),
     "--set prune.ratio = 1.5: --ratio must be between 0 and 1"),
    ("set-unknown-criterion", ["--set", "score.criterion=magic"], ("", ""),
     "--set score.criterion = 'magic': unknown criterion 'magic'"),
    ("set-gate-not-positive", ["--set", "bench.min_speedup=0"], ("", ""), "--set bench.min_speedup = 0: --min-speedup must be"),
    ("file-ratio-out-of-range", [], ("ratio = 0.5", "ratio = 2"), "pipeline.toml [prune] ratio = 2: --ratio must be"),
]


@pytest.mark.parametrize(("case", "args", "edit", "fragment"), RUN_VALUE_CASES, ids=[c[0] for c in RUN_VALUE_CASES])
def test_run_checks_every_value_before_any_stage(ws: Ws, case: str, args: list[str], edit: tuple[str, str],
                                                 fragment: str) -> None:
    config = Path(_pipeline_config(ws, str(ws.shared.good), ARCH))
    config.write_text(config.read_text().replace(*edit))
    result = cli("run", config, "--dir", ws.o("run"), *args)
    line = assert_fails(result, 2, fragment, ws.out)  # no stage ran: the run folder was never made
    assert "--calib-batches" not in line and "--repeats" not in line


# --------------------------------------------------------------------------------------------
# per-layer ratios, bounded validation, ONNX spatial axes: bad values fail before any slow step


def _layer_ratio_config(text: str) -> Callable[[Ws], list[Any]]:
    def build(ws: Ws) -> list[Any]:
        config = ws.inp / "lr.toml"
        config.write_text(f"[prune]\nlayer_ratio = {text}\n")
        return _prune("--ratio", "0.5", "--config", config)(ws)
    return build


RELEASE_CASES: list[tuple[str, Callable[[Ws], list[Any]], int, str]] = [
    ("prune-layer-ratio-no-ratio", _prune("--ratio", "0.5", "--layer-ratio", "conv2"), 2, "expected GLOB=R"),
    ("prune-layer-ratio-no-glob", _prune("--ratio", "0.5", "--layer-ratio", "=0.5"), 2, "expected GLOB=R"),
    ("prune-layer-ratio-1", _prune("--ratio", "0.5", "--layer-ratio", "conv2=1"), 2, "the ratio must be a number from 0"),
    ("prune-layer-ratio-negative", _prune("--target-flops", "0.5", "--layer-ratio", "conv2=-0.5"), 2, "from 0"),
    ("prune-layer-ratio-not-a-number", _prune("--ratio", "0.5", "--layer-ratio", "conv2=most"), 2, "conv2=most"),
    ("prune-layer-ratio-config-number", _layer_ratio_config("0.5"), 2, "expected GLOB=R"),
    ("prune-layer-ratio-config-table-bad", _layer_ratio_config('{ "conv2" = "lots" }'), 2, "conv2=lots"),
    ("prune-layer-ratio-fixes-too-much", _prune("--target-flops", "0.7", "--layer-ratio", "*=0"), 2,
     "--layer-ratio fixing 4 group(s) at most 0.0% of the prunable MACs can be removed; ask for less"),
    ("prune-val-images-0", _prune("--ratio", "0.5", "--val-data", "digits:test", "--val-images", "0"), 2,
     "Invalid value for '--val-images'"),
    ("prune-val-images-without-val-data", _prune("--ratio", "0.5", "--val-images", "100"), 2, "give --val-data too"),
    ("prune-dry-run-bad-target", _prune("--ratio", "2", "--dry-run"), 2, "--ratio must be between 0 and 1"),
    ("prune-recorded-normalisation-damaged",
     lambda ws: ["prune", _chanprune(lambda d: d["meta"].update(normalization={"mean": "bright"}))(ws), "--ratio", "0.5",
                 "--out", ws.o("p.safetensors")], 2, "recorded normalisation"),
    ("score-recorded-normalisation-damaged",
     lambda ws: ["score", _chanprune(lambda d: d["meta"].update(normalization=[0.5]))(ws), "--criterion", "l1",
                 "--out", ws.o("s.safetensors")], 2, "pass --mean and --std"),
    ("export-spatial-axes-unknown", lambda ws: ["export", ws.shared.good, *ARCH, "--out", ws.o("m.onnx"),
                                                "--spatial-axes", "sideways"], 2, "unknown --spatial-axes 'sideways'"),
    ("export-spatial-axes-dynamic-fixed-size-model", lambda ws: ["export", ws.shared.good, *ARCH, "--out", ws.o("m.onnx"),
                                                                 "--spatial-axes", "dynamic"], 2,
     "use --spatial-axes fixed"),
]


@pytest.mark.parametrize(("case", "build", "code", "fragment"), RELEASE_CASES, ids=[c[0] for c in RELEASE_CASES])
def test_bad_release_options(ws: Ws, case: str, build: Callable[[Ws], list[Any]], code: int, fragment: str) -> None:
    assert_fails(cli(*build(ws)), code, fragment, ws.out)


def test_layer_ratio_matching_nothing_warns(ws: Ws) -> None:
    result = cli(*_prune("--ratio", "0.5", "--layer-ratio", "decoder.*=0.5")(ws))
    assert result.exit_code == 0, result.stderr
    lines = warning_lines(result.stderr)
    assert len(lines) == 1 and "--layer-ratio 'decoder.*' matches no prunable layer group" in lines[0], result.stderr


# --------------------------------------------------------------------------------------------
# nothing silent: classes that may not be the model's, random data for data-driven criteria,
# NumPy arrays as data, long file names in table titles

CLASS_NAMES = ",".join(f"class{c}" for c in range(10))  # save_images' folders, in the model's output order


def _part_of_the_classes(ws: Ws) -> str:
    """8 of the model's 10 classes: sorted-order labels would put class2 at output 0."""
    root = save_images(ws.inp / "part", classes=10, per_class=1)
    for c in (0, 1):
        for f in (root / f"class{c}").iterdir():
            f.unlink()
        (root / f"class{c}").rmdir()
    return str(root)


@pytest.mark.parametrize("command", list(DATA_COMMANDS))
def test_fewer_data_classes_than_outputs_warn_and_classes_maps_them(ws: Ws, command: str) -> None:
    data = _part_of_the_classes(ws)
    result = cli(*DATA_COMMANDS[command](ws, str(ws.shared.good), data))
    assert result.exit_code == 0, result.stderr
    (line,) = warning_lines(result.stderr)
    assert "has 8 classes (class2, class3" in line and "the model outputs 10" in line and "pass --classes" in line
    for p in ws.out.iterdir():
        p.unlink()
    mapped = cli(*DATA_COMMANDS[command](ws, str(ws.shared.good), data), "--classes", CLASS_NAMES)
    assert mapped.exit_code == 0, mapped.stderr
    assert warning_lines(mapped.stderr) == []


def test_prune_val_data_takes_classes(ws: Ws) -> None:
    argv = _prune("--ratio", "0.5", "--val-data", _part_of_the_classes(ws))(ws)
    (line,) = warning_lines(cli(*argv).stderr)
    assert "pass --classes" in line
    (ws.out / "p.safetensors").unlink()
    mapped = cli(*argv, "--classes", CLASS_NAMES)
    assert mapped.exit_code == 0 and warning_lines(mapped.stderr) == [], mapped.stderr


def _with_classes(value: str, names: str | None = None) -> Callable[[Ws], list[Any]]:
    def build(ws: Ws) -> list[Any]:
        if names is not None:
            (ws.inp / "names.txt").write_text(names)
        return ["analyze", ws.shared.good, *ARCH, "--data", _part_of_the_classes(ws), "--classes",
                value.replace("NAMES_FILE", str(ws.inp / "names.txt"))]
    return build


CLASSES_CASES: list[tuple[str, Callable[[Ws], list[Any]], int, str]] = [
    ("too-few-names", _with_classes("class2,class3"), 2, "--classes names 2 classes but the model outputs 10"),
    ("data-class-not-named", _with_classes(CLASS_NAMES.replace("class9", "truck")), 2,
     "has class(es) class9 that --classes does not name"),
    ("duplicate-name", _with_classes(CLASS_NAMES.replace("class9", "class8")), 2, "names 'class8' more than once"),
    ("empty-name", _with_classes(CLASS_NAMES.replace("class9", "")), 2, "no empty names"),
    ("names-file-missing", lambda ws: ["analyze", ws.shared.good, *ARCH, "--data", "digits:test", "--classes",
                                       f"@{ws.inp / 'none.txt'}"], 2, "cannot read"),
    ("names-file-short", _with_classes("@NAMES_FILE", "class2\nclass3\n"), 2, "--classes names 2 classes"),
]


@pytest.mark.parametrize(("case", "build", "code", "fragment"), CLASSES_CASES, ids=[c[0] for c in CLASSES_CASES])
def test_bad_classes(ws: Ws, case: str, build: Callable[[Ws], list[Any]], code: int, fragment: str) -> None:
    assert_fails(cli(*build(ws)), code, fragment, ws.out)


@pytest.mark.parametrize("command", ["score", "prune"])
def test_label_criterion_without_data_never_suggests_random_data(ws: Ws, command: str) -> None:
    build = _score if command == "score" else lambda *a: _prune("--ratio", "0.5", *a)
    line = assert_fails(cli(*build("--criterion", "sensitivity")(ws)), 2, "needs labelled calibration data", ws.out)
    assert "synthetic" not in line and "images of the model's task" in line and "hessian=activation" in line
    line = assert_fails(cli(*build("--criterion", "hrank")(ws)), 2, "needs calibration data", ws.out)
    assert "synthetic" not in line


@pytest.mark.parametrize(("criterion", "fragment"), [("sensitivity", "random noise with random labels"),
                                                     ("taylor", "random noise with random labels"),
                                                     ("hrank", "is random noise: criterion 'hrank'"), ("l1", None)])
def test_synthetic_data_for_a_data_driven_criterion_warns(ws: Ws, criterion: str, fragment: str | None) -> None:
    result = cli(*_score("--criterion", criterion, "--data", "synthetic:1x8x8:10:32")(ws))
    assert result.exit_code == 0, result.stderr
    lines = warning_lines(result.stderr)
    if fragment is None:  # weights only: the data is not read
        assert lines == []
    else:
        assert len(lines) == 1 and fragment in lines[0] and "pass images of the task with --data" in lines[0]


@pytest.mark.parametrize("command", list(DATA_COMMANDS))
def test_numpy_arrays_are_data(ws: Ws, command: str) -> None:
    rng = np.random.default_rng(0)
    data = _npz(ws.inp / "val.npz", images=(rng.random((16, 8, 8)) * 255).astype(np.uint8), labels=np.arange(16) % 10)
    result = cli(*DATA_COMMANDS[command](ws, str(ws.shared.good), str(data)))
    assert result.exit_code == 0, result.stderr
    assert warning_lines(result.stderr) == []


def test_table_titles_keep_file_names_whole(ws: Ws) -> None:
    """A title longer than its table wraps at spaces, at the console's width, never inside a name."""
    out = "a-rather-long-name-for-the-pruned-and-finetuned-model.safetensors"  # in the working directory
    result = cli("export", ws.shared.good, *ARCH, "--format", "safetensors", "--out", out)  # a narrow table
    assert result.exit_code == 0, result.stderr
    assert f"→ {out}" in result.stdout  # the title line, the name unbroken
