"""The fine-tuning loop (train.py), the pruning schedules (train/schedules/) and `chanprune finetune`.

Everything runs on the bundled 8×8 digits with `digits_cnn` and one CPU thread: a step takes a few
milliseconds, so each test trains for real and still finishes in about a second.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from chanprune_cli.checkpoint import load_checkpoint, save_chanprune
from chanprune_cli.cli import app
from chanprune_cli.criteria import get_criterion
from chanprune_cli.criteria.gates import ChannelGates
from chanprune_cli.data import open_dataset
from chanprune_cli.data.tensorcache import tensor_images
from chanprune_cli.engine.allocate import AllocationOptions, allocate
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.engine.surgery import VerifyResult, prune_model, zero_producers
from chanprune_cli.errors import ChanpruneError, UserError
from chanprune_cli.measure import count_macs
from chanprune_cli.models import build_model, parse_arch, widened_spec
from chanprune_cli.prune import pruning
from chanprune_cli.prune.pruning import prune
from chanprune_cli.train import (
    CheckpointInfo,
    Hook,
    OutputPaths,
    TrainConfig,
    Trainer,
    WarmupCosine,
    build_optimizer,
    inputs,
    kd_loss,
    load_train_state,
    model_from_state,
    precision,
    train_step_check,
    validate,
)
from chanprune_cli.train.schedules import (
    CACSchedule,
    SoftFilterPruning,
    WhiteboxSchedule,
    asfp_coefficients,
    asfp_rate,
    make_schedule,
)
from chanprune_cli.train.schedules.whitebox import _rescale

SHAPE = (1, 8, 8)
SPEC = parse_arch("digits_cnn", None)
runner = CliRunner()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded image tensors go to a cache folder of the test's own, never ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they bring on a shared box
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits_train() -> Any:
    return open_dataset("digits:train", input_shape=SHAPE, mean=(0.5,), std=(0.5,), train=True)


@pytest.fixture(scope="module")
def digits_test() -> Any:
    return open_dataset("digits:test", input_shape=SHAPE, mean=(0.5,), std=(0.5,), train=False)


@pytest.fixture(scope="module")
def trained_state() -> dict[str, torch.Tensor]:
    """digits_cnn after a short training run (a realistic starting point for pruning schedules)."""
    torch.manual_seed(0)
    model = build_model(SPEC)
    ds = open_dataset("digits:train", input_shape=SHAPE, mean=(0.5,), std=(0.5,), train=True)
    Trainer(model, ds, TrainConfig(max_steps=60, lr=0.05, progress=False, save_every=None), device=torch.device("cpu")).fit()
    return {k: v.clone() for k, v in model.state_dict().items()}


def fresh_model(state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(SPEC)
    if state is not None:
        model.load_state_dict(state)
    return model


def make_trainer(model: torch.nn.Module, data: Any, tmp: Path | None, *, hooks: list[Hook] = (), val: Any = None,
                 **cfg: Any) -> Trainer:
    options = {"max_steps": 12, "batch_size": 32, "lr": 0.05, "save_every": 5, "progress": False, **cfg}
    outputs = OutputPaths.for_out(tmp / "ft.safetensors") if tmp is not None else None
    info = CheckpointInfo(arch=SPEC, input_shape=SHAPE)
    return Trainer(model, data, TrainConfig(**options), device=torch.device("cpu"), val_set=val, hooks=list(hooks),
                   outputs=outputs, ckpt=info)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k].double() - b[k].double()).abs().max()}"


# --------------------------------------------------------------------------------------------
# optimisation basics


def test_few_steps_lower_the_loss(digits_train: Any) -> None:
    model = fresh_model()
    x = torch.stack([digits_train[i][0] for i in range(256)])
    y = torch.tensor([digits_train[i][1] for i in range(256)])
    model.eval()
    with torch.no_grad():
        before = float(F.cross_entropy(model(x), y))
    make_trainer(model, digits_train, None, max_steps=15).fit()
    model.eval()
    with torch.no_grad():
        after = float(F.cross_entropy(model(x), y))
    assert after < 0.6 * before, (before, after)


def test_optimizer_groups_no_decay_on_norms_and_biases() -> None:
    model = fresh_model()
    opt = build_optimizer(model, TrainConfig(weight_decay=5e-4))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["weights"]["weight_decay"] == 5e-4 and by_name["norm+bias"]["weight_decay"] == 0
    assert all(p.ndim > 1 for p in by_name["weights"]["params"])
    assert all(p.ndim == 1 for p in by_name["norm+bias"]["params"])
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    everything = build_optimizer(model, TrainConfig(decay_norm_and_bias=True))
    assert len(everything.param_groups) == 1


def test_warmup_cosine_values() -> None:
    sched = WarmupCosine(total=100, warmup=0.1)
    assert sched.warmup == 10
    assert sched.factor(0) == pytest.approx(0.1) and sched.factor(9) == pytest.approx(1.0)
    assert sched.factor(10) == pytest.approx(1.0)
    assert sched.factor(55) == pytest.approx(0.5)  # halfway through the cosine part
    assert sched.factor(100) == pytest.approx(0.0, abs=1e-12)
    assert sched.lr(0.1, 100) == pytest.approx(0.0, abs=1e-12)
    assert WarmupCosine(total=100, warmup=0.1, min_lr=0.01).lr(0.1, 100) == pytest.approx(0.01)
    assert WarmupCosine(total=50, warmup=5).warmup == 5
    lrs = [sched.factor(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_kd_loss_sanity() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 10, generator=g)
    assert float(kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(16, 10, generator=g, requires_grad=True)
    loss = kd_loss(s, t, 4.0)
    assert float(loss.detach()) > 0
    # The T² factor: for T → large, T²·KL ≈ (1/2N)·Σ(z_s − z_t − mean)² / ... stays O(1), not → 0.
    assert float(kd_loss(s.detach(), t, 100.0)) > 1e-3
    # A gradient step moves the student's soft predictions towards the teacher's.
    loss.backward()
    with torch.no_grad():
        moved = s - 0.5 * s.grad
    assert float(kd_loss(moved, t, 4.0)) < float(loss.detach())
    # Equal to the textbook formula.
    p_t = F.softmax(t / 4, -1)
    manual = (p_t * (F.log_softmax(t / 4, -1) - F.log_softmax(s.detach() / 4, -1))).sum(-1).mean() * 16
    assert float(kd_loss(s.detach(), t, 4.0)) == pytest.approx(float(manual), rel=1e-5)


def test_distillation_pulls_the_student_towards_the_teacher(digits_train: Any, trained_state: Any) -> None:
    teacher = fresh_model(trained_state).eval()
    x = torch.stack([digits_train[i][0] for i in range(200)])
    with torch.no_grad():
        target = teacher(x)

    def gap(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float(kd_loss(model(x), target, 4.0))

    student = fresh_model()
    start = gap(student)
    trainer = make_trainer(student, digits_train, None, max_steps=20, kd_alpha=1.0)
    trainer.teacher = teacher
    trainer.fit()
    assert gap(student) < 0.5 * start


def test_train_step_check_on_a_pruned_resnet() -> None:
    model = build_model(parse_arch("cifar_resnet20", None))
    graph = build_graph(model, (3, 32, 32))
    scores = get_criterion("l1").score(model, graph, None, torch.device("cpu"))
    prune_model(model, graph, allocate(graph, scores, AllocationOptions(ratio=0.4)).plan)
    assert math.isfinite(train_step_check(model, (3, 32, 32), steps=2))


# --------------------------------------------------------------------------------------------
# resume


class _Interrupt(Hook):
    """Sends this process a real SIGINT (or raises, like a kill without saving) after step `at`."""

    name = "interrupt"

    def __init__(self, at: int, how: str) -> None:
        self.at, self.how = at, how

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step == self.at:
            if self.how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("killed")


def _schedule(name: str) -> Hook | None:
    return make_schedule(name, input_shape=SHAPE, ratio=0.3 if name != "none" else None, target_flops=None,
                         interval=3, until=0.75 if name != "cac" else 0.6, min_keep=0.1, round_to=1, ignore=(),
                         seed=0)


@pytest.mark.parametrize("schedule,how", [("none", "sigint"), ("asfp", "kill"), ("cac", "sigint"), ("cac", "kill"),
                                          ("whitebox", "sigint")])
def test_resume_gives_the_uninterrupted_result(tmp_path: Path, digits_train: Any, trained_state: Any,
                                               schedule: str, how: str) -> None:
    opts = {"max_steps": 14, "label_smoothing": 0.1}

    def hooks() -> list[Hook]:
        h = _schedule(schedule)
        return [h] if h is not None else []

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir(), cut_dir.mkdir()
    reference = make_trainer(fresh_model(trained_state), digits_train, full_dir, hooks=hooks(), **opts).fit().model

    # Interrupted after step 8: SIGINT saves the state at step 8; a kill leaves the save of step 5.
    cut = make_trainer(fresh_model(trained_state), digits_train, cut_dir, hooks=[*hooks(), _Interrupt(8, how)], **opts)
    with pytest.raises(KeyboardInterrupt if how == "sigint" else RuntimeError):
        cut.fit()
    paths = OutputPaths.for_out(cut_dir / "ft.safetensors")
    state = load_train_state(paths.state)
    assert state["step"] == (8 if how == "sigint" else 5)
    assert load_checkpoint(paths.last).model is not None  # the last checkpoint is a chanprune file

    model = model_from_state(state)
    resumed = make_trainer(model, digits_train, cut_dir, hooks=hooks(), **opts)
    # The interrupt hook is not part of the result: the state only requires the same schedules.
    state["hooks"] = {k: v for k, v in state["hooks"].items() if k != "interrupt"}
    resumed.restore(state)
    result = resumed.fit()
    assert result.resumed_from == state["step"] and result.steps == 14
    assert_same(weights(result.model), weights(reference))


@pytest.mark.parametrize("tensor", [False, True])
def test_result_does_not_depend_on_data_workers(digits_train: Any, trained_state: Any, tensor: bool) -> None:
    # Every sample's augmentation is seeded by (seed, epoch, index): loader processes change nothing.
    a = make_trainer(fresh_model(trained_state), digits_train, None, max_steps=6, workers=0, tensor_cache=tensor)
    b = make_trainer(fresh_model(trained_state), digits_train, None, max_steps=6, workers=2, tensor_cache=tensor)
    assert (a.inputs.kind, b.inputs.kind) == (("tensor",) * 2 if tensor else ("loader",) * 2)
    assert_same(weights(a.fit().model), weights(b.fit().model))


@pytest.mark.parametrize("data", ["digits", "jpegs"])
def test_tensor_path_trains_the_same_model_as_the_loader_path(data: str, trained_state: Any, jpeg_folder: Path) -> None:
    # Images held as one tensor, cropped and flipped per batch, are the loader's batches bit for bit
    # (the same per-sample draws), so the two input paths train the same weights.
    train = open_dataset("digits:train" if data == "digits" else str(jpeg_folder), input_shape=SHAPE, mean=(0.5,),
                         std=(0.5,), train=True)
    loader = make_trainer(fresh_model(trained_state), train, None, max_steps=8, batch_size=16, tensor_cache=False)
    tensor = make_trainer(fresh_model(trained_state), train, None, max_steps=8, batch_size=16, tensor_cache=True)
    assert (loader.inputs.kind, tensor.inputs.kind) == ("loader", "tensor")
    assert_same(weights(loader.fit().model), weights(tensor.fit().model))


def test_validation_on_the_tensor_path_matches_the_loader(digits_test: Any, trained_state: Any) -> None:
    model = fresh_model(trained_state)
    held = tensor_images(digits_test)
    for subset in (None, 100):
        assert validate(model, held, torch.device("cpu"), batch_size=64, max_images=subset) == \
            validate(model, digits_test, torch.device("cpu"), batch_size=64, max_images=subset)


def test_tensor_cache_required_but_impossible_is_a_usage_error(trained_state: Any) -> None:
    big = open_dataset("synthetic:1x8x8:10:64")
    with pytest.raises(UserError, match="--tensor-cache: the training data cannot be held as one tensor"):
        make_trainer(fresh_model(trained_state), big, None, tensor_cache=True)
    assert make_trainer(fresh_model(trained_state), big, None).inputs.kind == "loader"  # default: when possible


def test_default_workers_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "usable_cpus", lambda: 16)
    assert inputs.default_workers(torch.device("cpu")) == 0  # training already uses every core
    assert inputs.default_workers(torch.device("cuda")) == 8
    monkeypatch.setattr(inputs, "usable_cpus", lambda: 3)
    assert inputs.default_workers(torch.device("cuda")) == 2


def test_a_nonfinite_loss_names_its_step(digits_train: Any) -> None:
    with pytest.raises(ChanpruneError, match=r"the training loss became (nan|inf) at step \d+; lower --lr"):
        make_trainer(fresh_model(), digits_train, None, max_steps=30, lr=1e8, momentum=0.0).fit()


def test_compile_is_refused_with_a_schedule(digits_train: Any) -> None:
    with pytest.raises(UserError, match="--compile needs --schedule none"):
        make_trainer(fresh_model(), digits_train, None, hooks=[_schedule("asfp")], compile=True)


@pytest.mark.slow
def test_compile_trains_on_the_cpu(digits_train: Any, trained_state: Any) -> None:
    result = make_trainer(fresh_model(trained_state), digits_train, None, max_steps=2, compile=True).fit()
    assert result.steps == 2 and all(torch.isfinite(p).all() for p in result.model.parameters())


def test_amp_on_the_cpu_is_float32_by_default_and_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert precision.resolve_amp("auto", cpu) is None and precision.resolve_amp("off", cpu) is None
    with pytest.raises(UserError, match="needs a CUDA device"):
        precision.resolve_amp("fp16", cpu)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(UserError, match="no native bf16 arithmetic"):
        precision.resolve_amp("bf16", cpu)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_amp("bf16", cpu) is torch.bfloat16


def test_bf16_on_the_cpu_trains_in_bf16_channels_last_and_is_seeded(monkeypatch: pytest.MonkeyPatch, digits_train: Any,
                                                                    digits_test: Any, trained_state: Any) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # emulated elsewhere: slower, same result
    conv_dtypes: set[torch.dtype] = set()

    def run() -> tuple[Trainer, dict[str, torch.Tensor]]:
        model = fresh_model(trained_state)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o: conv_dtypes.add(o.dtype))
        trainer = make_trainer(model, digits_train, None, val=digits_test, max_steps=6, amp="bf16")
        result = trainer.fit()
        return trainer, weights(result.model)

    trainer, first = run()
    assert trainer.amp_dtype is torch.bfloat16 and not trainer.channels_last  # CPU: contiguous unless asked
    assert conv_dtypes == {torch.bfloat16}  # training steps and validation alike
    assert all(v.dtype == torch.float32 for v in first.values() if v.is_floating_point())  # weights stay float32
    assert trainer.evals and trainer.evals[-1]["top1"] > 50.0  # percent; the trained start is about 90
    assert_same(first, run()[1])


def test_on_the_cpu_the_teacher_runs_channels_last_and_the_student_contiguous(digits_train: Any,
                                                                             trained_state: Any) -> None:
    student, teacher = fresh_model(trained_state), fresh_model(trained_state)
    trainer = Trainer(student, digits_train, TrainConfig(max_steps=2, batch_size=32, progress=False, save_every=None),
                      device=torch.device("cpu"), teacher=teacher)
    conv = "conv2.weight"  # 16 -> 32 channels (conv1 reads 1 channel: both layouts are the same there)
    assert teacher.state_dict()[conv].is_contiguous(memory_format=torch.channels_last)
    assert not student.state_dict()[conv].is_contiguous(memory_format=torch.channels_last) and not trainer.channels_last
    assert trainer.fit().steps == 2
    forced = Trainer(fresh_model(trained_state), digits_train, TrainConfig(max_steps=1, batch_size=32, progress=False,
                     save_every=None, channels_last=True), device=torch.device("cpu"))
    assert forced.channels_last and forced.model.state_dict()[conv].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensor_path_feeds_the_loader_paths_batches(trained_state: Any, jpeg_folder: Path) -> None:
    train = open_dataset(str(jpeg_folder), input_shape=SHAPE, mean=(0.5,), std=(0.5,), train=True)
    cuda = torch.device("cuda")
    loader = Trainer(fresh_model(trained_state), train, TrainConfig(max_steps=4, batch_size=16, tensor_cache=False,
                                                                   progress=False, save_every=None), device=cuda)
    tensor = Trainer(fresh_model(trained_state), train, TrainConfig(max_steps=4, batch_size=16, tensor_cache=True,
                                                                   progress=False, save_every=None), device=cuda)
    assert tensor.inputs.images is not None and tensor.inputs.images.device.type == "cuda"
    for (xa, ya), (xb, yb) in zip(loader.inputs.batches(0, 4), tensor.inputs.batches(0, 4)):
        assert xb.device.type == "cuda" and torch.equal(xa, xb) and torch.equal(ya, yb)
    result = tensor.fit()
    assert result.input_path == "tensor" and result.steps == 4 and result.images_per_second > 0


def test_resume_refuses_changed_options(tmp_path: Path, digits_train: Any) -> None:
    trainer = make_trainer(fresh_model(), digits_train, tmp_path, max_steps=5)
    trainer.fit()
    trainer.save_state()
    state = load_train_state(OutputPaths.for_out(tmp_path / "ft.safetensors").state)
    other = make_trainer(fresh_model(), digits_train, tmp_path, max_steps=5, lr=0.1)
    with pytest.raises(UserError, match="lr"):
        other.restore(state)


# --------------------------------------------------------------------------------------------
# ASFP


@pytest.mark.parametrize("T,P", [(8, 0.5), (40, 0.3), (200, 0.6), (3.5, 0.2)])
def test_asfp_rate_passes_through_the_three_points(T: float, P: float) -> None:
    a, k, b = asfp_coefficients(T, P)
    rate = lambda t: a * math.exp(-k * t) + b  # noqa: E731
    assert rate(0) == pytest.approx(0.0, abs=1e-12)
    assert rate(T / 8) == pytest.approx(0.75 * P, abs=1e-12)
    assert rate(T) == pytest.approx(P, abs=1e-12)
    assert b == pytest.approx(-a) and k > 0
    # The closed-form approximation in train/schedules/asfp.py's docstring and the public function agree.
    for t in (T / 16, T / 4, T / 2):
        assert asfp_rate(t, T, P) == pytest.approx(rate(t), abs=1e-15)
        assert asfp_rate(t, T, P) == pytest.approx(P * (1 - 4 ** (-t / (T / 8))), abs=2e-3 * P)
    values = [asfp_rate(t, T, P) for t in range(int(T) + 1)]
    assert all(x <= y for x, y in zip(values, values[1:]))


class _Spy(Hook):
    name = "spy"

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_step_end(self, trainer: Trainer) -> None:
        self.fn(trainer)


def test_asfp_zeroes_reselects_and_removes_physically(tmp_path: Path, digits_train: Any, trained_state: Any) -> None:
    hook = SoftFilterPruning(asymptotic=True, input_shape=SHAPE, ratio=0.5, interval=2)
    zero_counts: dict[int, int] = {}

    def count_zero_filters(trainer: Trainer) -> None:
        w = trainer.model.conv2.weight
        zero_counts[trainer.step] = int((w.detach().flatten(1).abs().sum(1) == 0).sum())

    trainer = make_trainer(fresh_model(trained_state), digits_train, tmp_path, hooks=[hook, _Spy(count_zero_filters)],
                           max_steps=16)
    result = trainer.fit()
    # 8 intervals of 2 steps: the rate at the end of interval t follows asfp_rate(t, 8, 0.5).
    assert [e["step"] for e in hook.events] == [2, 4, 6, 8, 10, 12, 14, 16]
    for event in hook.events:
        assert event["rate"] == pytest.approx(asfp_rate(event["t"], 8, 0.5), abs=1e-12)
    assert hook.events[-1]["rate"] == 0.5
    # Zeroed right after an event (32 channels · rate), then trained again (they are not frozen).
    assert zero_counts[2] == round(32 * asfp_rate(1, 8, 0.5))
    assert zero_counts[3] < zero_counts[2] or zero_counts[2] == 0
    # The end: half of each group removed for real, verified, recorded as a plan.
    assert result.model.conv2.out_channels == 16 and result.model.conv1.out_channels == 8
    assert hook.done and hook.verify_result["passed"]
    assert len(result.plans) == 1 and result.plans[0]["criterion"] == "asfp"


def test_sfp_uses_a_constant_rate(digits_train: Any, trained_state: Any) -> None:
    hook = SoftFilterPruning(asymptotic=False, input_shape=SHAPE, ratio=0.25, interval=4)
    make_trainer(fresh_model(trained_state), digits_train, None, hooks=[hook], max_steps=12).fit()
    assert [e["rate"] for e in hook.events] == [0.25, 0.25, 0.25]


@pytest.mark.parametrize("schedule", ["sfp", "whitebox"])
def test_a_removal_that_fails_verification_stops_the_run(monkeypatch: pytest.MonkeyPatch, digits_train: Any,
                                                         trained_state: Any, schedule: str) -> None:
    # Every schedule removes through prune.pruning.pruned_copy, which refuses a model that does not
    # compute the masked original's function (a wrong surgery is simulated by the verification result).
    monkeypatch.setattr(pruning, "verify", lambda *args, **kw: VerifyResult(0.5, 1e-5, False, 1, 3, "conv2"))
    hook = make_schedule(schedule, input_shape=SHAPE, ratio=0.25, target_flops=None, interval=None, until=0.5,
                         min_keep=None, round_to=1, ignore=(), seed=0)
    trainer = make_trainer(fresh_model(trained_state), digits_train, None, hooks=[hook], max_steps=4)
    with pytest.raises(ChanpruneError, match=rf"^{schedule}: verification failed: the pruned model differs from the "
                                             r"masked original by 0\.5 \(tolerance 1e-05\) \(first at layer conv2\)\. "
                                             "Please report this model"):
        trainer.fit()
    assert not hook.done and hook.plans() == []


def test_zero_producers_keeps_norms_and_consumers(trained_state: Any) -> None:
    model = fresh_model(trained_state)
    graph = build_graph(model, SHAPE)
    gid = next(g.id for g in graph.groups if g.name == "conv2")
    zero_producers(model, graph, {gid: [0, 3]})
    assert model.conv2.weight[[0, 3]].abs().sum() == 0 and model.conv2.weight[1].abs().sum() > 0
    assert model.bn2.weight[0] != 0 and model.conv3.weight[:, 0].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# CAC


def test_cac_prunes_at_the_scheduled_steps(digits_train: Any, trained_state: Any) -> None:
    hook = CACSchedule(input_shape=SHAPE, target_flops=0.5, interval=3, until=0.5)
    widths: dict[int, int] = {}
    spy = _Spy(lambda tr: widths.__setitem__(tr.step, sum(p.numel() for p in tr.model.parameters())))
    result = make_trainer(fresh_model(trained_state), digits_train, None, hooks=[hook, spy], max_steps=16).fit()
    assert hook.event_steps == [3, 6]  # 16 · 0.5 = 8 steps of pruning: rounds at 3 and 6
    changes = [s for s in range(2, 17) if widths[s] != widths[s - 1]]
    assert changes == [3, 6]
    assert all(e["removed"] > 0 for e in hook.events)
    assert hook.done and hook.gates is None  # gates removed once the target width is reached
    macs = count_macs(result.model, SHAPE)
    full = count_macs(fresh_model(), SHAPE)
    assert 0.45 <= 1 - macs / full <= 0.6


def test_replace_model_carries_momentum_through_surgery(digits_train: Any, trained_state: Any) -> None:
    trainer = make_trainer(fresh_model(trained_state), digits_train, None, max_steps=3)
    trainer.fit()
    old = trainer.optimizer.state[trainer.model.conv2.weight]["momentum_buffer"].clone()
    graph = build_graph(trainer.model, SHAPE)
    gid = next(g.id for g in graph.groups if g.name == "conv2")
    plan = {gid: [1, 5]}
    pruned = fresh_model(trained_state)
    pruned.load_state_dict(trainer.model.state_dict())
    prune_model(pruned, graph, plan)
    trainer.replace_model(pruned, graph=graph, plan=plan)
    new = trainer.optimizer.state[trainer.model.conv2.weight]["momentum_buffer"]
    keep = [i for i in range(32) if i not in (1, 5)]
    assert torch.equal(new, old[keep])
    conv3 = trainer.optimizer.state[trainer.model.conv3.weight]["momentum_buffer"]
    assert conv3.shape[1] == 30


def test_dcph_widens_and_prunes_half(digits_train: Any) -> None:
    spec = widened_spec(SPEC, 2.0)
    assert spec.kwargs["width"] == 2.0
    torch.manual_seed(0)
    model = build_model(spec)
    assert model.conv2.out_channels == 64
    hook = CACSchedule(input_shape=SHAPE, ratio=0.5, interval=2, until=0.5)
    result = make_trainer(model, digits_train, None, hooks=[hook], max_steps=8).fit()
    assert result.model.conv2.out_channels == 32 and result.model.conv1.out_channels == 16
    with pytest.raises(UserError, match="built-in"):
        widened_spec(parse_arch("torchvision:resnet18", None))
    # The CIFAR ResNets take a width too (DCPH on them): 2x keeps the option-A shortcut shapes valid.
    wide = build_model(parse_arch("cifar_resnet20", {"width": 2}))
    assert wide.linear.in_features == 128 and wide(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


# --------------------------------------------------------------------------------------------
# White-Box


def test_whitebox_trains_masks_on_frozen_weights_then_prunes(digits_train: Any, trained_state: Any) -> None:
    hook = WhiteboxSchedule(input_shape=SHAPE, target_flops=0.5, until=0.5)
    start = fresh_model(trained_state)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    spy = _Spy(lambda tr: seen.__setitem__(tr.step, weights(tr.model)))
    result = make_trainer(fresh_model(trained_state), digits_train, None, hooks=[hook, spy], max_steps=12).fit()
    # Steps 1-6: only the masks move; weights and BatchNorm statistics are those of the start.
    for step in range(1, 6):
        assert_same(seen[step], weights(start))
    assert hook.events == [{"step": 6, "removed": hook.events[0]["removed"]}] and hook.events[0]["removed"] > 0
    assert hook.done and hook.verify_result["passed"] and not hook.masks
    assert seen[7]["conv2.weight"].shape[0] < 32  # pruned at step 6, fine-tuned afterwards
    assert not torch.equal(seen[12]["fc2.weight"], seen[7]["fc2.weight"])
    assert 1 - count_macs(result.model, SHAPE) / count_macs(fresh_model(), SHAPE) >= 0.5
    # Global voting keeps at least 30 % of every layer.
    assert result.model.conv1.out_channels >= 5 and result.model.conv2.out_channels >= 10


def test_whitebox_masks_through_the_loop(digits_train: Any, trained_state: Any) -> None:
    # The schedule's mask phase alone (prune=False), kept by a second hook after every step.
    model = fresh_model(trained_state)
    before = weights(model)
    graph = build_graph(model, SHAPE)
    hook = WhiteboxSchedule(input_shape=SHAPE, prune=False, until=1.0, lam=0.05, mask_lr=0.1, max_grad_norm=5.0, seed=0)
    masks: dict[int, torch.Tensor] = {}

    class Keep(Hook):
        name = "keep-masks"

        def on_step_end(self, trainer: Trainer) -> None:
            masks.update({gid: m.detach().cpu().clone() for gid, m in hook.masks.items()})

    cfg = TrainConfig(max_steps=5, batch_size=32, warmup=0, progress=False, save_every=None, seed=0, augment=False)
    Trainer(copy.deepcopy(model), digits_train, cfg, device=torch.device("cpu"), hooks=[hook, Keep()]).fit()
    assert {gid: tuple(m.shape) for gid, m in masks.items()} == {g.id: (10, g.channels) for g in graph.prunable_groups()}
    assert all(not torch.allclose(m, torch.full_like(m, 2 / 11)) for m in masks.values())
    assert_same(weights(model), before)


def test_whitebox_rescale_equals_a_constant_gate(trained_state: Any) -> None:
    # In float64, so that the two ways of scaling differ by rounding only (in float32 the logits
    # differ by up to ~4e-5 relative).
    model = fresh_model(trained_state).double().eval()
    graph = build_graph(model, SHAPE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *SHAPE, generator=g, dtype=torch.float64)
    with ChannelGates(model, graph) as gates:
        masks = {gid: torch.rand(10, c, generator=g, dtype=torch.float64) for gid, c in gates.channels.items()}
        gates.gates = {gid: m.sum(0) / 2 for gid, m in masks.items()}
        with torch.no_grad():
            expected = model(x)
        points = gates.points
    _rescale(model, points, masks, {})
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# the command


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args), env={"CHANPRUNE_DEBUG": None})


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory: pytest.TempPathFactory, trained_state: Any) -> Path:
    """The trained digits model, pruned to half its channels (chanprune file)."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = fresh_model(trained_state)
    torch.save({"state_dict": model.state_dict(), "arch": "digits_cnn"}, folder / "digits.pt")
    graph = build_graph(model, SHAPE)
    scores = get_criterion("l1").score(model, graph, None, torch.device("cpu"))
    outcome = prune(model, graph, scores, SHAPE, criterion="l1", options=AllocationOptions(ratio=0.5))
    assert allocate  # imported for the side effect of registering nothing; keeps linters quiet
    save_chanprune(folder / "pruned.safetensors", outcome.model, SPEC, input_shape=SHAPE,
                   history=[{"command": "prune"}], plans=[outcome.plan_record])
    return folder / "pruned.safetensors"


def test_cli_finetune_end_to_end(tmp_path: Path, pruned_ckpt: Path) -> None:
    out = tmp_path / "ft.safetensors"
    teacher = pruned_ckpt.parent / "digits.pt"
    res = cli("finetune", str(pruned_ckpt), "--data", "digits:train", "--val-data", "digits:test", "--mean", "0.5",
              "--std", "0.5", "--max-steps", "30", "--eval-every", "15", "--lr", "0.05", "--threads", "1",
              "--teacher", str(teacher), "--label-smoothing", "0.1", "--out", str(out), "--json", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    assert "validation" in res.output and "top-1" in res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["command"] == "finetune" and doc["steps"] == 30 and doc["teacher"] == str(teacher)
    assert [e["step"] for e in doc["evals"]] == [15, 30]
    assert doc["final"]["top1"] > 80 and doc["train"]["images_per_second"] > 0
    assert doc["before"] == doc["after"]
    loaded = load_checkpoint(out)
    assert loaded.history[-1]["command"] == "finetune" and loaded.history[0]["command"] == "prune"
    assert len(loaded.plans) == 1  # the pruning plan is preserved
    assert (tmp_path / "ft.best.safetensors").exists()
    assert not (tmp_path / "ft.state.pt").exists() and not (tmp_path / "ft.last.safetensors").exists()
    # The output exists now: refused without --force; --resume without a state is a usage error.
    again = cli("finetune", str(pruned_ckpt), "--data", "digits:train", "--max-steps", "2", "--out", str(out))
    assert again.exit_code == 2 and "--force" in again.output
    missing = cli("finetune", str(pruned_ckpt), "--data", "digits:train", "--max-steps", "2", "--resume",
                  "--out", str(tmp_path / "other.safetensors"))
    assert missing.exit_code == 2 and "no training state" in missing.output


def test_cli_schedule_asfp_and_bad_usage(tmp_path: Path, pruned_ckpt: Path) -> None:
    raw = pruned_ckpt.parent / "digits.pt"
    out = tmp_path / "asfp.safetensors"
    res = cli("finetune", str(raw), "--arch", "digits_cnn", "--data", "digits:train", "--mean", "0.5", "--std", "0.5",
              "--max-steps", "12", "--schedule", "asfp", "--target-flops", "0.5", "--prune-every", "3",
              "--prune-until", "0.75", "--threads", "1", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "removed physically" in res.output and "passed" in res.output
    loaded = load_checkpoint(out)
    assert loaded.plans[-1]["criterion"] == "asfp"
    assert sum(p.numel() for p in loaded.model.parameters()) < sum(p.numel() for p in fresh_model().parameters())
    for args, message in (
        (["--schedule", "asfp"], "exactly one of --ratio or --target-flops"),
        (["--ratio", "0.5"], "need a pruning --schedule"),
        (["--schedule", "foo", "--ratio", "0.5"], "unknown --schedule"),
        (["--dcph"], "--dcph belongs to --schedule cac"),
        (["--amp", "fp16", "--device", "cpu"], "needs a CUDA device"),
        (["--batch-size", "4096"], "fewer than one batch"),
    ):
        bad = cli("finetune", str(raw), "--arch", "digits_cnn", "--data", "digits:train", "--max-steps", "1",
                  "--out", str(tmp_path / "x.safetensors"), *args)
        assert bad.exit_code == 2, (args, bad.output)
        assert message in bad.output, (args, bad.output)


def test_cli_resume_after_ctrl_c_matches_an_uninterrupted_run(tmp_path: Path, pruned_ckpt: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["finetune", str(pruned_ckpt), "--data", "digits:train", "--mean", "0.5", "--std", "0.5", "--max-steps", "12",
            "--batch-size", "32", "--lr", "0.05", "--save-every", "4", "--threads", "1", "--seed", "1",
            "--device", "cpu"]  # bitwise reproducible on the CPU (cuDNN's backward kernels are not)
    full = cli(*args, "--out", str(tmp_path / "full.safetensors"))
    assert full.exit_code == 0, full.output

    original = Trainer._train_step

    def interrupted(self: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = original(self, x, y)
        if self.step == 6:  # the 7th step is running: Ctrl-C arrives mid-step
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    out = tmp_path / "cut.safetensors"
    cut = cli(*args, "--out", str(out))
    assert cut.exit_code == 130, cut.output
    assert "--resume" in cut.output and not out.exists()
    assert load_train_state(tmp_path / "cut.state.pt")["step"] == 7  # the step in flight completed first
    monkeypatch.setattr(Trainer, "_train_step", original)
    fresh = cli(*args, "--out", str(out))
    assert fresh.exit_code == 2 and "--resume" in fresh.output  # a state exists: no silent restart
    other_lr = [a if a != "0.05" else "0.06" for a in args]
    refused = cli(*other_lr, "--out", str(out), "--resume")
    assert refused.exit_code == 2 and "lr" in refused.output  # options that change the result must match
    resumed = cli(*args, "--out", str(out), "--resume", "--json", str(tmp_path / "r.json"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "r.json").read_text())["resumed_from"] == 7
    assert_same(load_checkpoint(out).model.state_dict(), load_checkpoint(tmp_path / "full.safetensors").model.state_dict())


# --------------------------------------------------------------------------------------------
# preemption: the signal reaches the whole process group (timeout, SLURM, Kubernetes, Ctrl-C)

# Runs `chanprune finetune` (argv[2:]) and, while step 6 runs, has signal argv[1] sent to its whole
# process group (loader workers included) by another process, as `timeout` or `kill -- -PGID` do
# (torch's workers exit quietly when the signal comes from their parent), or only to itself.
_SIGNAL_AT_STEP_6 = """
import os, signal, subprocess, sys
from chanprune_cli.cli import main
from chanprune_cli.train import Trainer

step = Trainer._train_step
target = sys.argv[1]

def train_step(self, x, y):
    loss = step(self, x, y)
    if self.step == 5:
        name, _, scope = target.partition(":")
        if scope == "group":
            subprocess.run([sys.executable, "-c", f"import os, signal; os.killpg({os.getpgid(0)}, signal.{name})"])
        else:
            os.kill(os.getpid(), getattr(signal, name))
    return loss

Trainer._train_step = train_step
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes x 8 grayscale 8x8 JPEGs: decoded in loader workers like a real ImageFolder."""
    root = tmp_path_factory.mktemp("jpegs") / "train"
    g = torch.Generator().manual_seed(0)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(8):
            pixels = (torch.rand(8, 8, generator=g) * 128 + 12 * c).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / f"c{c}" / f"{i}.jpg", quality=90)
    return root


def _preempt_args(ckpt: Path, data: Path) -> list[str]:
    return ["finetune", str(ckpt), "--data", str(data), "--workers", "2", "--mean", "0.5", "--std", "0.5",
            "--max-steps", "12", "--batch-size", "16", "--lr", "0.05", "--save-every", "4", "--threads", "1",
            "--seed", "1", "--device", "cpu"]  # bitwise reproducible on the CPU


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, pruned_ckpt: Path, jpeg_folder: Path) -> Path:
    out = tmp_path_factory.mktemp("full") / "full.safetensors"
    full = cli(*_preempt_args(pruned_ckpt, jpeg_folder), "--out", str(out))
    assert full.exit_code == 0, full.output
    return out


@pytest.mark.parametrize("target,code", [("SIGTERM:group", 143), ("SIGINT:group", 130), ("SIGTERM:process", 143)])
def test_signal_saves_state_and_resume_matches_an_uninterrupted_run(tmp_path: Path, pruned_ckpt: Path, jpeg_folder: Path,
                                                                    uninterrupted: Path, target: str, code: int) -> None:
    args = _preempt_args(pruned_ckpt, jpeg_folder)
    out = tmp_path / "cut.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "CHANPRUNE_DEBUG"}
    # A session of its own: the group signal reaches the run and its loader workers, not pytest.
    cut = subprocess.run([sys.executable, "-c", _SIGNAL_AT_STEP_6, target, *args, "--out", str(out)],
                         capture_output=True, text=True, env=env, start_new_session=True, timeout=300)
    assert cut.returncode == code, cut.stderr
    assert "error" not in cut.stderr.lower(), cut.stderr
    assert f"stopped by {target.split(':')[0]} after step 6/12" in cut.stderr and "--resume" in cut.stderr
    assert not out.exists() and load_train_state(tmp_path / "cut.state.pt")["step"] == 6
    resumed = cli(*args, "--out", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed at step 6" in resumed.output
    assert_same(load_checkpoint(out).model.state_dict(), load_checkpoint(uninterrupted).model.state_dict())
