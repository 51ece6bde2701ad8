"""A step with forward-mode derivatives (``torch.func.jvp``) as a module ``torch.onnx.export`` can trace with a
symbolic batch.

torch.export cannot trace ``torch.func.jvp`` with a dynamic batch (its dual-tensor ops specialise the batch to the
example's), and make_fx's symbolic tracing of jvp fails on the same ops. So the step is traced twice by make_fx
on real tensors, with core ATen decompositions, at two batch sizes (:data:`TRACE_BATCHES`): the jvp disappears
into plain ATen ops with every shape literal. The two graphs must match op for op; an integer literal that differs
between them is k * batch (checked at both sizes) and becomes ``k * x.size(0)``; anything else that differs (a
float, a constant tensor) is refused. The result is one FX graph valid at every batch size, which torch.export
then traces with a symbolic batch like any step. Each trace first loses the convolutions of the weights' zero
tangents (:func:`drop_zero_weight_convolutions`).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx, nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

TRACE_BATCHES = (7, 11)
"""The two batch sizes traced: coprime, and unlikely to be any other dimension of a step."""


class PolymorphicStep(nn.Module):
    """``step``'s forward as one batch-polymorphic ATen graph; same ``kind``, ``input_names``, ``output_names``."""

    def __init__(self, step: nn.Module, example_inputs: Callable[[int], tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.kind, self.input_names, self.output_names = step.kind, step.input_names, step.output_names
        self.graph_module = batch_polymorphic(step, example_inputs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.graph_module(*inputs))


def batch_polymorphic(fn: Callable[..., Any], example_inputs: Callable[[int], tuple[torch.Tensor, ...]]) -> fx.GraphModule:
    """``fn`` traced at each of :data:`TRACE_BATCHES` (``example_inputs(batch)`` gives its arguments, batch first on
    every tensor) and merged into one graph whose shapes follow the first input's dimension 0."""
    traced = []
    for batch in TRACE_BATCHES:
        with torch.no_grad():
            traced.append(make_fx(fn, decomposition_table=core_aten_decompositions())(*example_inputs(batch)))
        drop_zero_weight_convolutions(traced[-1])
    gm, other = traced
    nodes, other_nodes = list(gm.graph.nodes), list(other.graph.nodes)
    if len(nodes) != len(other_nodes) or any(a.op != b.op or a.target != b.target for a, b in zip(nodes, other_nodes)):
        raise RuntimeError("the step traces to different graphs at different batch sizes; it must be batch-polymorphic")
    first_input = next(n for n in nodes if n.op == "placeholder")
    graph = gm.graph
    b0, b1 = TRACE_BATCHES

    def merge(a: Any, b: Any, before: fx.Node) -> Any:
        if isinstance(a, (list, tuple)):
            return type(a)(merge(x, y, before) for x, y in zip(a, b, strict=True))
        if isinstance(a, fx.Node) or a == b:
            return a
        if isinstance(a, bool) or not isinstance(a, int):
            raise RuntimeError(f"the step's graph holds a value that depends on the batch ({a!r} at batch {b0}, "
                               f"{b!r} at {b1}) at {before.format_node()}")
        k, rest = divmod(a, b0)
        if rest or k * b1 != b:
            raise RuntimeError(f"the step's graph holds a size that is not a multiple of the batch ({a} at batch "
                               f"{b0}, {b} at {b1}) at {before.format_node()}")
        with graph.inserting_before(before):
            size = graph.call_function(torch.ops.aten.sym_size.int, (first_input, 0))
            return size if k == 1 else graph.call_function(operator.mul, (size, k))

    for a, b in zip(nodes, other_nodes):
        if a.op == "get_attr":
            ta, tb = getattr(gm, a.target), getattr(other, b.target)
            if ta.shape != tb.shape or not torch.equal(ta, tb):
                raise RuntimeError(f"the step's graph holds a constant tensor {a.target} that depends on the batch")
        elif a.op == "call_function":
            a.args = merge(a.args, b.args, a)
            a.kwargs = {k: merge(v, b.kwargs[k], a) for k, v in a.kwargs.items()}
    for node in graph.nodes:  # jvp's zero tangents; a plain zeros traces with a symbolic size
        if node.target is torch.ops.aten._efficientzerotensor.default:
            node.target = torch.ops.aten.zeros.default
    graph.eliminate_dead_code()  # jvp's shape assertions (is_same_size, ...), which would pin the batch
    graph.lint()
    gm.recompile()
    return gm


def drop_zero_weight_convolutions(gm: fx.GraphModule) -> int:
    """Remove, in place, each convolution whose weight is a zero constant (and its bias absent or zero) and whose users
    are plain adds of a tensor of the sum's shape: the adds take that tensor. A convolution's forward-mode
    derivative is conv(x_t, W) + conv(x, W_t), and the weight's zero tangent traces as ``expand(full(0))``, so the
    JVP of a network holds one such convolution per convolution: as costly as the network's own, and adding
    zeros. The two traces of :func:`batch_polymorphic` go through this alike (their shapes are concrete), so they
    still match op for op. Returns the number removed."""
    aten = torch.ops.aten

    def source(node: Any) -> Any:
        while isinstance(node, fx.Node) and node.target is aten.alias.default:
            node = node.args[0]
        return node

    def is_zero_constant(node: Any) -> bool:
        node = source(node)
        if isinstance(node, fx.Node) and node.target is aten.expand.default:
            node = source(node.args[0])
        return isinstance(node, fx.Node) and node.target is aten.full.default and node.args[1] == 0

    def shape(node: Any) -> tuple[int, ...] | None:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None

    def other_addend(add: fx.Node, conv: fx.Node) -> fx.Node | None:
        if add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2:
            return None
        a, b = add.args
        other = b if a is conv else a
        ok = isinstance(other, fx.Node) and other is not conv and shape(other) is not None \
            and shape(other) == shape(add)
        return other if ok else None

    removed = 0
    for conv in list(gm.graph.nodes):
        if conv.target is not aten.convolution.default or not is_zero_constant(conv.args[1]) \
                or (conv.args[2] is not None and not is_zero_constant(conv.args[2])):
            continue
        users = list(conv.users)
        if not users or any(other_addend(add, conv) is None for add in users):
            continue
        for add in users:
            add.replace_all_uses_with(other_addend(add, conv))
            gm.graph.erase_node(add)
        gm.graph.erase_node(conv)
        removed += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return removed
