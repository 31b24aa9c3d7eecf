"""Distillation without labels: the student (a pruned model) learns to reproduce the teacher's
(the model it was pruned from) outputs, on any images. Recovery for models without class logits
(detectors, segmenters, YOLO, models with several outputs) and for classifiers on images without
labels.

What is compared. The student trains in training mode, so its output has the structure the model
gives in training (a YOLO head returns its raw maps there, not decoded boxes). The teacher computes
that same structure with its layers as at inference (`inference_layers`: the model in training
mode, every leaf module and every norm in eval mode: running statistics, no dropout). Every
floating tensor of the output is a *leaf*, named by its path (dict keys, namedtuple fields, list
indices: `boxes`, `feats.0`); `output` (the command's `--output`) keeps the leaves under one part.

The loss, per batch: the sum over leaves of mean((s − t)²) / mean(t²), each leaf's squared error
relative to the teacher's own scale (t² floored at 1e-6), so a leaf of large values (boxes in
pixels, dense maps) weighs no more than one of small values (class scores), whatever its size.
Under torchrun the scale is the global batch's (a constant of the teacher, averaged over the ranks),
so the ranks' losses average to the one-process loss and DDP trains the one-process model.
The class logits of a classifier are matched as Hinton et al.'s distillation term instead
(T²·KL(teacher ‖ student) at temperature T, `optim.kd_loss`).

Intermediate features (`features`: module-name globs, the backbone's or neck's stages) add their
outputs as leaves, matched the same way; where pruning narrowed a module, a 1×1 projection of the
student's channels onto the teacher's (FitNets) is trained along and dropped afterwards.

`gap`: the teacher gap, the mean over held-out images and leaves of ‖s − t‖ / ‖t‖ (per image),
both models with inference-mode layers: 0 when the student reproduces the teacher.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import UserError
from ..measure import logits_of
from ..support import distributed as D
from .optim import kd_loss
from .precision import autocast
from .validation import held_out_batches

__all__ = ["Distillation", "inference_layers", "output_leaves", "set_inference_layers"]

_FLOOR = 1e-6  # mean(t²) below this: the leaf's error is taken relative to this scale


def set_inference_layers(model: nn.Module) -> None:
    """Training mode's output structure, inference's computation: `model.train()`, then every leaf
    module and every norm (a norm with children too, e.g. norm + activation) in eval mode."""
    model.train()
    for m in model.modules():
        if next(m.children(), None) is None or isinstance(m, nn.modules.batchnorm._NormBase):
            m.training = False  # not m.eval(): that would recurse into children already handled


@contextmanager
def inference_layers(model: nn.Module) -> Iterator[nn.Module]:
    """`set_inference_layers` for the duration, every module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    set_inference_layers(model)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def output_leaves(output: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every floating tensor in a model's output (tuples, lists, dicts,
    namedtuples), in order."""
    if isinstance(output, torch.Tensor):
        return [(prefix or "output", output)] if output.is_floating_point() and output.numel() else []
    if isinstance(output, Mapping):
        parts: Sequence[tuple[str, Any]] = [(str(k), v) for k, v in output.items()]
    elif isinstance(output, (tuple, list)):
        fields = getattr(output, "_fields", None)
        parts = list(zip(fields, output)) if fields else [(str(i), v) for i, v in enumerate(output)]
    else:
        return []
    return [leaf for name, value in parts for leaf in output_leaves(value, f"{prefix}.{name}" if prefix else name)]


def _relative_sq(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], env: D.DistEnv | None) -> torch.Tensor:
    """Σ mean((s − t)²) / mean(t²) over (student, teacher) pairs; mean(t²) of the global batch."""
    scales = torch.stack([t.detach().float().pow(2).mean() for _, t in pairs])
    if env is not None and env.distributed:  # every rank's batch is as large: the mean of the means
        D.all_reduce_sum_(scales, env).div_(env.world_size)
    errors = torch.stack([(s.float() - t.float()).pow(2).mean() for s, t in pairs])
    return (errors / scales.clamp_min(_FLOOR)).sum()


def _per_image_distance(s: torch.Tensor, t: torch.Tensor, images: int) -> torch.Tensor:
    """‖s − t‖ / ‖t‖ per image (the whole leaf's for every image when it has no batch axis)."""
    s, t = s.float(), t.float()
    if s.dim() == 0 or s.shape[0] != images:
        return ((s - t).norm() / t.norm().clamp_min(_FLOOR)).expand(images)
    return (s - t).flatten(1).norm(dim=1) / t.flatten(1).norm(dim=1).clamp_min(_FLOOR)


class _Captured:
    """The outputs of named modules of one model, by name, kept by one global forward hook (a hook
    on the modules would be pickled with them into every file the run writes)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.names = {id(modules[n]): n for n in names}
        self.handle = nn.modules.module.register_module_forward_hook(self._keep) if names else None

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        name = self.names.get(id(module))
        if name is not None and isinstance(output, torch.Tensor):
            self.outputs[name] = output

    def take(self) -> dict[str, torch.Tensor]:
        taken, self.outputs = self.outputs, {}
        return taken

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


class _Projection(nn.Module):
    """A 1×1 map of a student feature's channels (axis 1) onto the teacher's."""

    def __init__(self, student_channels: int, teacher_channels: int, generator: torch.Generator) -> None:
        super().__init__()
        self.map = nn.Linear(student_channels, teacher_channels, bias=False)
        with torch.no_grad():  # nn.Linear's own initialisation, drawn from the run's seed
            bound = 1.0 / student_channels ** 0.5
            self.map.weight.copy_(torch.rand(self.map.weight.shape, generator=generator) * 2 * bound - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map(x.movedim(1, -1)).movedim(-1, 1)


class Distillation:
    """What a label-free run matches and how (see the module docstring).

    `logits`: the model is a classifier, matched by the distillation term on its class logits;
    `output`: keep the output leaves under this path (`--output`); `features`: module-name globs
    whose outputs are matched too; `held_out`: the images the teacher gap is measured on."""

    def __init__(self, *, logits: bool, temperature: float, output: str | None = None, features: Sequence[str] = (),
                 held_out: Dataset[Any] | None = None) -> None:
        self.logits, self.temperature, self.output = logits, temperature, output
        self.frozen_statistics = not logits
        self.feature_globs = tuple(features)
        self.held_out = held_out
        self.leaf_names: list[str] = []
        self.feature_names: list[str] = []
        self.projections = nn.ModuleDict()  # "k": the projection of feature_names[k], where widths differ
        self._student: _Captured | None = None
        self._teacher: _Captured | None = None

    # -- setting up ------------------------------------------------------------------------------
    def leaves(self, output: Any) -> list[tuple[str, torch.Tensor]]:
        found = output_leaves(output)
        if self.output is None:
            return found
        return [(n, t) for n, t in found if n == self.output or n.startswith(self.output + ".")]

    def prepare(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor, seed: int = 0) -> None:
        """Check that the two models' outputs (and features) match leaf by leaf on `example`, with
        UserErrors saying why not; make the projections (initialised from `seed`); attach the
        feature hooks."""
        self.feature_names = self._feature_modules(student, teacher)
        s_cap, t_cap = _Captured(student, self.feature_names), _Captured(teacher, self.feature_names)
        try:
            with torch.no_grad(), inference_layers(student), inference_layers(teacher):
                try:
                    s_out = student(example)
                except Exception as exc:  # noqa: BLE001  (a model's own forward: any error means it cannot run so)
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    raise UserError(f"label-free distillation runs the model in training mode, where its forward "
                                    f"fails ({type(exc).__name__}: {first}); models whose training forward needs "
                                    "targets (torchvision's detectors) cannot be distilled so") from None
                t_out = teacher(example)
            s_feats, t_feats = s_cap.take(), t_cap.take()
        finally:
            s_cap.remove()
            t_cap.remove()
        s_leaves, t_leaves = self.leaves(s_out), self.leaves(t_out)
        if not s_leaves:
            what = f"no part {self.output!r} (--output)" if self.output else "no floating tensor"
            raise UserError(f"the model's training-mode output has {what}: nothing to distil "
                            f"(its parts: {', '.join(n for n, _ in output_leaves(s_out)) or 'none'})")
        if [(n, tuple(t.shape)) for n, t in s_leaves] != [(n, tuple(t.shape)) for n, t in t_leaves]:
            theirs = {n: tuple(t.shape) for n, t in t_leaves}
            name, shape = next((n, tuple(t.shape)) for n, t in s_leaves if theirs.get(n) != tuple(t.shape))
            raise UserError(f"the student's output {name} is {'x'.join(map(str, shape))} but the teacher's is "
                            f"{'x'.join(map(str, theirs[name])) if name in theirs else 'missing'}: the outputs must "
                            "match leaf by leaf (give the model the student was pruned from as --teacher)")
        self.leaf_names = [n for n, _ in s_leaves]
        generator = torch.Generator().manual_seed(seed)
        for k, name in enumerate(self.feature_names):
            s, t = s_feats.get(name), t_feats.get(name)
            if s is None or t is None or s.dim() < 2 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
                raise UserError(f"--distil-features: {name}'s output cannot be matched (student "
                                f"{_shape(s)}, teacher {_shape(t)}); pick modules that return one feature map")
            if s.shape[1] != t.shape[1]:
                self.projections[str(k)] = _Projection(s.shape[1], t.shape[1], generator).to(example.device)
        self._student, self._teacher = _Captured(student, self.feature_names), _Captured(teacher, self.feature_names)

    def _feature_modules(self, student: nn.Module, teacher: nn.Module) -> list[str]:
        if not self.feature_globs:
            return []
        theirs = {n for n, _ in teacher.named_modules()}
        names = [n for n, _ in student.named_modules() if n and any(fnmatch.fnmatchcase(n, g) for g in self.feature_globs)]
        for glob in self.feature_globs:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise UserError(f"--distil-features {glob}: no module of the model matches it")
        missing = [n for n in names if n not in theirs]
        if missing:
            raise UserError(f"--distil-features: the teacher has no module {missing[0]}; give the model the student "
                            "was pruned from as --teacher")
        return names

    # -- training --------------------------------------------------------------------------------
    def loss(self, student: nn.Module, teacher: nn.Module, s_out: Any, t_out: Any,
             env: D.DistEnv | None = None) -> torch.Tensor:
        """The distillation loss of one batch (the module docstring says how); `env`: this rank's
        process group under torchrun."""
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.logits:
            loss = kd_loss(logits_of(s_out, student).float(), logits_of(t_out, teacher).float(), self.temperature)
        else:
            loss = torch.zeros((), device=_device_of(s_out))
            pairs = [(s, t) for (_, s), (_, t) in zip(self.leaves(s_out), self.leaves(t_out))]
        if self._student is not None and self._teacher is not None and self.feature_names:
            s_feats, t_feats = self._student.take(), self._teacher.take()
            for k, name in enumerate(self.feature_names):
                s = s_feats[name]
                projection = self.projections[str(k)] if str(k) in self.projections else None
                pairs.append((projection(s.float()) if projection is not None else s, t_feats[name]))
        return loss + _relative_sq(pairs, env) if pairs else loss

    def release(self) -> None:
        """Remove the feature hooks (at the end of the run)."""
        for captured in (self._student, self._teacher):
            if captured is not None:
                captured.remove()
        self._student = self._teacher = None

    def param_groups(self) -> list[dict[str, Any]]:
        """The projections' parameters, for the optimiser (no weight decay)."""
        params = list(self.projections.parameters())
        return [{"params": params, "weight_decay": 0.0, "name": "projections"}] if params else []

    def sync_gradients(self, env: D.DistEnv) -> None:
        """Average the projections' gradients over a distributed run's ranks (DDP averages the
        model's; the projections live outside it)."""
        if env.distributed:
            for p in self.projections.parameters():
                if p.grad is not None:
                    D.all_reduce_sum_(p.grad, env).div_(env.world_size)

    # -- the teacher gap -------------------------------------------------------------------------
    @torch.no_grad()
    def gap(self, student: nn.Module, teacher: nn.Module, device: torch.device, *, batch_size: int, workers: int,
            env: D.DistEnv, channels_last: bool, teacher_channels_last: bool, amp_dtype: torch.dtype | None,
            max_images: int | None = None) -> float | None:
        """The teacher gap on the held-out images (None without any)."""
        if self.held_out is None:
            return None
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed per-image distances, images
        captured = [c for c in (self._student, self._teacher) if c is not None]
        with inference_layers(student), inference_layers(teacher):
            for x, _ in held_out_batches(self.held_out, device, batch_size=batch_size, workers=workers, env=env,
                                         max_images=max_images):
                x = x.to(device, non_blocking=True)
                sx = x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
                tx = x.contiguous(memory_format=torch.channels_last) if teacher_channels_last and x.dim() == 4 else x
                with autocast(device, amp_dtype):
                    s_out, t_out = student(sx), teacher(tx)
                for c in captured:
                    c.take()  # features are not part of the gap
                n = x.shape[0]
                per_leaf = [_per_image_distance(s, t, n) for (_, s), (_, t) in zip(self.leaves(s_out), self.leaves(t_out))]
                sums += torch.stack([torch.stack(per_leaf).mean(0).sum().double(),
                                     torch.tensor(float(n), dtype=torch.float64, device=device)])
        total = sums.cpu()
        D.all_reduce_sum_(total, env)
        return float(total[0] / total[1]) if total[1] > 0 else None

    # -- records ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What is matched and how, as the history, the JSON report and a resumed run record it."""
        return {"loss": "kd" if self.logits else "relative-l2", "leaves": list(self.leaf_names),
                "output": self.output, "features": list(self.feature_names),
                "projections": [self.feature_names[int(k)] for k in self.projections]}

    def state_dict(self) -> dict[str, Any]:
        return {"describe": self.describe(),
                "projections": {k: v.detach().cpu().clone() for k, v in self.projections.state_dict().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("describe") != self.describe():
            raise UserError("the saved state distilled other outputs or features "
                            f"({state.get('describe')}); repeat the original command line with --resume")
        self.projections.load_state_dict(state.get("projections") or {})


def _device_of(output: Any) -> torch.device:
    leaves = output_leaves(output)
    return leaves[0][1].device if leaves else torch.device("cpu")


def _shape(t: torch.Tensor | None) -> str:
    return "x".join(map(str, t.shape)) if t is not None else "not a tensor"
