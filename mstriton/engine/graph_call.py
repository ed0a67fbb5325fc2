"""Calling a loaded MindIR graph with less of MindSpore's Python in between.

`nn.GraphCell(...)(*tensors)` runs, on every call, the whole `Cell.__call__` path: argument checks, a fresh
arguments key, the compile-cache lookup, parameter attributes set again, a JIT config object, before the graph
executor runs the already compiled graph. On the 2-core CPU machines this project serves from, that was about
1 ms of a 7-10 ms SmolLM2 decode step (cProfile: `Cell.compile` and its callees, `_add_attr`,
`generate_arguments_key`), paid by every step.

A `LoadedGraph` makes its first call (and any call whose inputs differ in shape or dtype from the first)
through the cell, which compiles the graph; later calls with the same input signature go to the graph executor
under the phase that compile produced. That is what the cell's own path ends in (`_CellGraphExecutor.run` ->
`_exec_pip`); the steps skipped are the ones that only matter when the inputs change.

Relies on MindSpore internals (`_cell_graph_executor`, `_real_phase`, `_convert_python_data`), checked when the
first fast call is set up: if any is missing or the phase is not compiled, every call takes the cell's path.
"""

from __future__ import annotations

import logging

from mindspore import nn

log = logging.getLogger(__name__)

try:  # MindSpore 2.9 internals; see the module docstring
    from mindspore.graph.api import _cell_graph_executor, _convert_python_data, _real_phase
except ImportError:  # pragma: no cover - an older layout (deprecated from 2.9)
    try:
        from mindspore.common.api import _cell_graph_executor, _convert_python_data, _real_phase
    except ImportError:
        _cell_graph_executor = _convert_python_data = _real_phase = None


def signature(args) -> tuple:
    """What decides which compiled graph a call runs: each input's shape and dtype."""
    return tuple((tuple(a.shape), a.dtype) for a in args)


class LoadedGraph:
    def __init__(self, graph):
        self.cell = nn.GraphCell(graph)
        self._phase: str | None = None
        self._signature: tuple | None = None

    def __call__(self, *args):
        key = signature(args)
        if self._phase is not None and key == self._signature:
            return _convert_python_data(_cell_graph_executor._graph_executor(args, self._phase))
        outputs = self.cell(*args)
        self._remember(key)
        return outputs

    def _remember(self, key: tuple) -> None:
        """After a call through the cell: the phase it compiled to, if later calls may go straight to it."""
        if _cell_graph_executor is None:
            return
        try:
            phase = _real_phase(self.cell.phase, self.cell)
            compiled = _cell_graph_executor.has_compiled(phase)
        except Exception as exc:  # noqa: BLE001 - any failure here only costs the fast path
            log.warning("graph calls go through nn.GraphCell (no direct phase: %s)", exc)
            compiled = False
        if compiled:
            self._phase, self._signature = phase, key
        else:
            self._phase = self._signature = None
