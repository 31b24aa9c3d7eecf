"""Property: the checkpoint reader never crashes. Whatever bytes it is given (random, or a valid file
of any supported form with bits flipped, bytes cut, inserted or overwritten with extreme integers, or
a safetensors header / chanprune record full of lies), it returns a model or raises a one-line
UserError — never another exception, a hang or a huge allocation — and never runs code from the file.

CI runs a few hundred cases; `CHANPRUNE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_checkpoint.py` runs
a longer campaign.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chanprune_cli.checkpoint import (
    load_checkpoint,
    load_state_dict_file,
    save_chanprune,
)
from chanprune_cli.errors import UserError
from chanprune_cli.models import ArchSpec, build_model

EXAMPLES = int(os.environ.get("CHANPRUNE_FUZZ_EXAMPLES", "100"))
SPEC = ArchSpec("digits_cnn", {"width": 0.25})  # 4/8/8 channels: small files, fast loads
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One valid file of every form the reader accepts."""
    d = tmp_path_factory.mktemp("seeds")
    torch.manual_seed(0)
    model = build_model(SPEC)
    sd = model.state_dict()
    torch.save({"state_dict": sd, "arch": "digits_cnn"}, d / "zip.pt")
    torch.save(sd, d / "legacy.pt", _use_new_zipfile_serialization=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "weights.safetensors"))
    save_chanprune(d / "chanprune.safetensors", model, SPEC, input_shape=(1, 8, 8), history=[{"command": "prune"}],
                   plans=[{"groups": []}])
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def read_everything(path: Path, marker: Path) -> None:
    """Every public reader: a model or a one-line UserError, and the marker file never appears."""
    readers: list[Callable[[], Any]] = [
        lambda: load_checkpoint(path, arch="digits_cnn", arch_kwargs={"width": 0.25}),
        lambda: load_checkpoint(path),
        lambda: load_state_dict_file(path),
    ]
    for read in readers:
        try:
            read()
        except UserError as exc:
            message = str(exc)
            assert message and "\n" not in message, repr(message)
    assert not marker.exists(), "code from the file ran"


# Extreme integers for overwriting length fields, offsets and counts.
EXTREMES = st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, 10**15])
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("set"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("u64"), st.floats(0, 1, exclude_max=True), EXTREMES),
    st.tuples(st.just("u32"), st.floats(0, 1, exclude_max=True), EXTREMES),
)


def mutate(data: bytes, mutations: list[tuple[str, float, Any]]) -> bytes:
    b = bytearray(data)
    for op, where, arg in mutations:
        i = min(int(where * len(b)), max(len(b) - 1, 0))
        if op == "flip" and b:
            b[i] ^= 1 << arg
        elif op == "set" and b:
            b[i] = arg
        elif op == "cut":
            del b[int(where * len(b)):]
        elif op == "insert":
            b[i:i] = arg
        elif op in ("u64", "u32") and len(b) >= 8:
            width = 8 if op == "u64" else 4
            i = min(i, len(b) - width)
            b[i : i + width] = struct.pack("<Q" if width == 8 else "<I", arg % (1 << (8 * width)))
    return bytes(b)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(data)
    read_everything(path, tmp_path / "PWNED")


@FUZZ
@given(name=st.sampled_from(["zip.pt", "legacy.pt", "weights.safetensors", "chanprune.safetensors"]),
       mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_valid_files(tmp_path: Path, seeds: dict[str, bytes], name: str, mutations: list[Any]) -> None:
    path = tmp_path / name
    path.write_bytes(mutate(seeds[name], mutations))
    read_everything(path, tmp_path / "PWNED")


# safetensors headers that lie about dtypes, shapes and offsets
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "C64", "Q7", "", 5, None])
DIMS = st.lists(st.one_of(st.integers(-2, 64), EXTREMES), max_size=4)
OFFSETS = st.one_of(st.lists(st.one_of(st.integers(-8, 4096), EXTREMES), min_size=0, max_size=3), st.none(), st.text(max_size=4))
ENTRY = st.one_of(st.fixed_dictionaries({"dtype": DTYPES, "shape": DIMS, "data_offsets": OFFSETS}),
                  st.integers(), st.lists(st.integers(), max_size=3), st.none())
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                       max_leaves=12)


@FUZZ
@given(entries=st.dictionaries(st.text(max_size=12), ENTRY, max_size=4),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=10), st.one_of(st.text(max_size=20), JSONISH), max_size=3)),
       data=st.binary(max_size=256), header_len=st.one_of(st.none(), EXTREMES, st.integers(0, 600)))
def test_lying_safetensors_headers(tmp_path: Path, entries: dict[str, Any], metadata: Any, data: bytes,
                                   header_len: int | None) -> None:
    header: dict[str, Any] = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", (len(raw) if header_len is None else header_len) % 2**64) + raw + data)
    read_everything(path, tmp_path / "PWNED")


# chanprune records whose fields are replaced by arbitrary JSON (the weights stay valid)
FIELDS = st.sampled_from(["format", "format_version", "arch", "input_shape", "module_shapes", "plans", "history", "meta"])


@FUZZ
@given(edits=st.lists(st.tuples(FIELDS, JSONISH), min_size=1, max_size=3),
       shape_edit=st.one_of(st.none(), st.tuples(st.sampled_from(["conv1", "bn1", "conv2", "fc1", "fc2", "ghost"]),
                                                 st.sampled_from(["out_channels", "in_channels", "num_features", "in_features",
                                                                  "out_features", "groups"]),
                                                 JSONISH)))
def test_lying_chanprune_records(tmp_path: Path, seeds: dict[str, bytes], edits: list[tuple[str, Any]],
                                 shape_edit: tuple[str, str, Any] | None) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src.safetensors"
    src.write_bytes(seeds["chanprune.safetensors"])
    with safe_open(str(src), "pt") as f:
        doc = json.loads(f.metadata()["chanprune"])
    marker = tmp_path / "PWNED"
    for field, value in edits:
        doc[field] = value
    if shape_edit is not None and isinstance(doc.get("module_shapes"), dict):
        module, attr, value = shape_edit
        entry = doc["module_shapes"].setdefault(module, {})
        if isinstance(entry, dict):
            entry[attr] = value
    if isinstance(doc.get("arch"), dict) and ":" in str(doc["arch"].get("name")):
        doc["arch"] = {"name": "builtins:open", "kwargs": {"file": str(marker), "mode": "w"}}  # must never be called
    path = tmp_path / "edited.safetensors"
    save_file(load_file(str(src)), str(path), metadata={"chanprune": json.dumps(doc), "format": "pt"})
    read_everything(path, marker)
