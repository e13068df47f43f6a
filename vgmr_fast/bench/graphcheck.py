"""Does a VGMR training step with dropout compile as one graph? (a row of the layer summary)

``torch.compile(module, fullgraph=True)`` in train mode (dropout p = 0.1), three steps of forward
+ backward on the same input. The compiler backend is a counting wrapper around ``aot_eager``:
Dynamo capture, graph breaks, recompiles and AOT autograd's tracing of forward and backward (fake
tensors, functionalisation of the custom ops) are what ``inductor`` would do first, without
Inductor's code generation, which costs tens of seconds per graph on a small CPU and says nothing
about graph breaks. Reported: graphs compiled after each step (the first step compiles one; any
later one is a recompile), whether the three outputs differ (fresh dropout masks each step), and,
when ``fullgraph=True`` fails, the error text (a graph break names its cause there).
"""
from __future__ import annotations

import copy

import torch

from .common import short_exc


def _error_text(exc: BaseException, limit: int = 300) -> str:
    """A Dynamo error in one line: its reason and the user-code line where it happened."""
    import os
    import re

    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return short_exc(exc)
    text = lines[0]
    where = [m for m in (re.match(r'File "([^"]+)", line (\d+)', x) for x in lines) if m]
    if where:
        text += f" (at {os.path.basename(where[-1].group(1))}:{where[-1].group(2)})"
    kind = "graph break" if type(exc).__name__ == "Unsupported" else type(exc).__name__
    return f"{kind}: {text}"[:limit]


def fullgraph_training(module: torch.nn.Module, xs, masks, steps: int = 3) -> dict:
    """Compile ``module`` (a copy, left in train mode) with ``fullgraph=True`` and run ``steps``
    forward+backward steps. Returns ``{"ok", "graphs", "graphs_per_step", "recompiles",
    "fresh_masks", "error"}``."""
    from torch._dynamo.backends.debugging import aot_eager

    mod = copy.deepcopy(module).train()
    graphs: list = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    fn = torch.compile(mod, backend=counting_backend, fullgraph=True, dynamic=False)
    per_step, outs = [], []
    try:
        for _ in range(steps):
            for p in mod.parameters():
                p.grad = None
            ys = fn(xs, masks)
            ys = list(ys)
            torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
            outs.append([y.detach().clone() for y in ys])
            per_step.append(len(graphs))
    except Exception as exc:  # noqa: BLE001  (the failure is the finding)
        return {"ok": False, "graphs": len(graphs), "graphs_per_step": per_step, "recompiles": None,
                "fresh_masks": None, "error": _error_text(exc)}
    fresh = all(not all(torch.equal(a, b) for a, b in zip(outs[i], outs[i + 1])) for i in range(len(outs) - 1))
    return {"ok": True, "graphs": len(graphs), "graphs_per_step": per_step,
            "recompiles": max(0, len(graphs) - (per_step[0] if per_step else 0)), "fresh_masks": fresh,
            "error": None}


def describe(result: dict | None, steps: int = 3) -> str:
    if result is None:
        return "-"
    if not result["ok"]:
        return result["error"]
    graphs, rec = result["graphs"], result["recompiles"]
    text = f"{graphs} graph{'s' if graphs != 1 else ''}, {rec} recompile{'s' if rec != 1 else ''} over {steps} steps"
    if result.get("fresh_masks") is False:
        text += " (same dropout mask every step!)"
    return text
