"""Record a model's graph by running it, for models torch.fx cannot trace symbolically.

torch.fx fails on Python control flow that depends on tensors (`if x.shape[-1] % 2:`), on
iterating over tensors and on many detection models. Running the model once on the example input
resolves all of that: a `TorchFunctionMode` sees every torch function and tensor method the
forward calls, and global module hooks see every call of a leaf module (the same leaves the fx
tracer keeps: torch.nn layers and registered layer types). Together they give an fx-style graph of
what this forward executed, with each value's shape, which the channel propagation of `graph.py`
walks exactly like a traced one.

What execution alone cannot know is where a Python number came from. Sizes read from a tensor
(`x.shape`, `x.size()`, `x.size(k)`) are therefore handed to the model as `ReadSize` ints that
remember the tensor and axis; used as an argument of a recorded op, one becomes a `size` node of
that tensor, exactly as torch.fx records `x.size(k)`. So `v.reshape(B, C, H, W)` with `C` read from
the block input ties the two tensors' channels (`structural_ops._borrowed_sizes`) as it does in a
traced graph. A size computed from such reads (`H * W`, `C // 2`) is a plain int again and looks
literal: reshapes to it pin their channels, conservative, never wrong; and every pruned model is
verified.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

# Tensor dunders arrive as these; the propagator knows the operator functions.
_DUNDERS: dict[str, Callable[..., Any]] = {
    "__getitem__": operator.getitem, "__add__": operator.add, "__radd__": operator.add,
    "__iadd__": operator.iadd, "__sub__": operator.sub, "__rsub__": operator.sub, "__isub__": operator.isub,
    "__mul__": operator.mul, "__rmul__": operator.mul, "__imul__": operator.imul,
    "__truediv__": operator.truediv, "__rtruediv__": operator.truediv, "__itruediv__": operator.itruediv,
    "__neg__": operator.neg,
}
# Tensor properties that return a tensor: `.data` is the same values; the others are followed as
# unknown ops (their inputs are pinned).
_PROPERTY_METHODS = {"data": "detach"}


def setitem(tensor: torch.Tensor, index: Any, value: Any) -> None:
    """Stands for `tensor[index] = value` in a recorded graph: an unknown op, so the channels
    written and overwritten are pinned (an in-place write into another tensor cannot be sliced)."""


class ReadSize(int):
    """A size read from a recorded tensor: an int that remembers the tensor and axis (arithmetic on
    it gives plain ints, which is where the trail ends)."""

    source: torch.Tensor
    axis: int

    def __new__(cls, value: int, source: torch.Tensor, axis: int) -> ReadSize:
        read = super().__new__(cls, value)
        read.source, read.axis = source, axis
        return read

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        # a model may keep a size it read (YOLO's Detect caches its input shape): copies and
        # pickles of the model hold plain ints
        return int, (int(self),)


@dataclass
class Shape:
    """A tensor value in a recorded or interpreted graph: only its shape is kept."""

    shape: tuple[int, ...]


def summarize(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return Shape(tuple(value.shape))
    if isinstance(value, (tuple, list)):
        items = (summarize(v) for v in value)
        return tuple(items) if hasattr(value, "_fields") else type(value)(items)
    return value


@dataclass
class Recording:
    graph: fx.Graph
    values: dict[fx.Node, Any]  # node -> Shape for tensors, the value itself for anything else


class _Recorder(TorchFunctionMode):
    def __init__(self, root: nn.Module, is_leaf: Callable[[nn.Module, str], bool]) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.values: dict[fx.Node, Any] = {}
        self.names = {id(m): name for name, m in root.named_modules()}
        # parameters and buffers keep their names (get_attr targets), so the propagator can find
        # the module that owns a per-channel tensor
        self.tensor_names = {id(t): name for name, t in [*root.named_parameters(), *root.named_buffers()]}
        self.is_leaf = is_leaf
        self.node_of: dict[int, fx.Node] = {}
        self.alive: list[Any] = []  # every bound tensor stays alive, so ids are never reused
        self.calls: list[fx.Node | None] = []  # open leaf-module calls (None: nested in a leaf)
        self.running: list[tuple[str, type] | None] = []  # every open module call (None: an unnamed module)
        self.constants = 0
        self.size_nodes: dict[tuple[int, int], fx.Node] = {}  # (id of the tensor, axis) -> its `size` node

    # -- values and nodes ------------------------------------------------------------------------
    def _node(self, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        node = self.graph.create_node(op, target, self._map(args), self._map(kwargs))
        node.meta["nn_module_stack"] = self._module_stack()
        return node

    def _map(self, value: Any) -> Any:
        """Replace every tensor by its node (a constant node for tensors no recorded op made), and
        every size read from one by that tensor's `size` node."""
        if isinstance(value, ReadSize):
            return self._size_node(value)
        if isinstance(value, torch.Tensor):
            node = self.node_of.get(id(value))
            if node is None:
                self.constants += 1
                target = self.tensor_names.get(id(value), f"_constant_{self.constants}")
                node = self.graph.create_node("get_attr", target, (), {})
                self._bind(value, node)
            return node
        if isinstance(value, (tuple, list)):
            mapped = [self._map(v) for v in value]
            return tuple(mapped) if isinstance(value, tuple) else mapped
        if isinstance(value, dict):
            return {k: self._map(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self._map(value.start), self._map(value.stop), self._map(value.step))
        return value

    def _bind(self, value: Any, node: fx.Node) -> None:
        """`node` produced `value`; tensors inside a tuple/list are reached through getitem nodes."""
        self.values[node] = summarize(value)
        if isinstance(value, torch.Tensor):
            self.node_of[id(value)] = node
            self.alive.append(value)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if isinstance(item, (torch.Tensor, tuple, list)):
                    self._bind(item, self.graph.call_function(operator.getitem, (node, i)))

    def _size_node(self, read: ReadSize) -> fx.Node:
        """`x.size(axis)` for the tensor a size was read from, made once, when first used."""
        key = (id(read.source), read.axis)
        node = self.size_nodes.get(key)
        if node is None:
            node = self.graph.call_method("size", (self._map(read.source), read.axis))
            self.values[node] = int(read)
            self.size_nodes[key] = node
        return node

    # -- torch functions and tensor methods ------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.calls:  # inside a leaf module: its call stands for all of it
            return out
        name = getattr(func, "__name__", "")
        if _reads_size(func, name, args):
            return _remembered(out, args, kwargs)
        if name == "__setitem__":
            self._node("call_function", setitem, args, kwargs)
        elif _has_tensor(out):
            self._bind(out, self._node(*self._target(func, name), args, kwargs))
        return out

    @staticmethod
    def _target(func: Any, name: str) -> tuple[str, Any]:
        if name == "__get__":  # a tensor property (`x.T`, `x.data`)
            prop = getattr(getattr(func, "__self__", None), "__name__", "property")
            return "call_method", _PROPERTY_METHODS.get(prop, prop)
        if name in _DUNDERS:
            return "call_function", _DUNDERS[name]
        if getattr(torch.Tensor, name, None) is func or getattr(torch._C.TensorBase, name, None) is func:
            return "call_method", name
        return "call_function", func

    # -- module calls --------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        name = self.names.get(id(module))
        if self.calls:
            self.calls.append(None)  # nested in a leaf
        elif name is not None and self.is_leaf(module, name):
            self.calls.append(self._node("call_module", name, args, {}))
        self.running.append((name, type(module)) if name is not None else None)

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.running:
            self.running.pop()
        if not self.calls:
            return
        node = self.calls.pop()
        if node is not None:
            self._bind(output, node)

    def _module_stack(self) -> dict[str, tuple[str, type]]:
        """The innermost named module running now, as fx's `nn_module_stack` meta names it."""
        inner = next((m for m in reversed(self.running) if m is not None), None)
        return {inner[0]: inner} if inner is not None else {}


def _reads_size(func: Any, name: str, args: tuple[Any, ...]) -> bool:
    """`x.shape` or `x.size(...)`."""
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None) == "shape"
    return name == "size" and bool(args)


def _remembered(out: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The sizes `x.shape`/`x.size()`/`x.size(k)` returned, as `ReadSize` ints of `x`."""
    tensor = args[0]
    if not isinstance(tensor, torch.Tensor):
        return out
    if isinstance(out, torch.Size):
        return torch.Size([ReadSize(v, tensor, k) for k, v in enumerate(out)])
    axis = args[1] if len(args) > 1 else kwargs.get("dim")
    if type(out) is int and type(axis) is int and tensor.dim() > 0:
        return ReadSize(out, tensor, axis % tensor.dim())
    return out


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(_has_tensor(v) for v in value)


def record(model: nn.Module, example: Any, is_leaf: Callable[[nn.Module, str], bool]) -> Recording:
    """Run `model(example)` once (no grad) and return the graph of what it executed."""
    recorder = _Recorder(model, is_leaf)
    inputs = recorder.graph.placeholder("x")
    recorder._bind(example, inputs)
    pre = nn.modules.module.register_module_forward_pre_hook(recorder.pre_hook)
    post = nn.modules.module.register_module_forward_hook(recorder.post_hook)
    try:
        with torch.no_grad(), recorder:
            output = model(example)
    finally:
        pre.remove()
        post.remove()
        _plain_sizes(model)
    recorder.graph.output(recorder._map(output))
    return Recording(recorder.graph, recorder.values)


def _plain_sizes(model: nn.Module) -> None:
    """Sizes a module kept from the recorded run (YOLO's Detect caches its input's shape) become
    plain ints again, so they hold on to no recorded tensor."""
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, ReadSize):
                setattr(module, key, int(value))
            elif type(value) in (tuple, torch.Size) and any(isinstance(v, ReadSize) for v in value):
                setattr(module, key, type(value)([int(v) if isinstance(v, ReadSize) else v for v in value]))
