"""LoadedGraph: calls after the first go straight to the compiled phase, with the same outputs as the cell's path;
inputs of another shape go through the cell again (a new compile), and back."""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mstriton.engine.graph_call import LoadedGraph


class Affine(nn.Cell):
    def construct(self, x, w):
        return ops.matmul(x, w) + 1.0, ops.reduce_sum(x)


def test_fast_calls_equal_the_cells_and_a_new_shape_recompiles(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    x4 = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    ms.export(Affine(), Tensor(x4), Tensor(w), file_name=str(tmp_path / "affine"), file_format="MINDIR")
    graph = LoadedGraph(ms.load(str(tmp_path / "affine.mindir")))
    first = graph(Tensor(x4), Tensor(w))
    assert graph._phase is not None  # the fast path is set up (MindSpore's internals are where we expect them)
    for scale in (1.0, -2.0, 0.5):
        y, total = graph(Tensor(x4 * scale), Tensor(w))
        np.testing.assert_allclose(y.asnumpy(), (x4 * scale) @ w + 1.0, rtol=1e-6)
        assert abs(float(total.asnumpy()) - float((x4 * scale).sum())) < 1e-5
    np.testing.assert_array_equal(first[0].asnumpy(), graph(Tensor(x4), Tensor(w))[0].asnumpy())
    phase = graph._phase
    x3 = np.ones((3, 4), np.float32)  # another shape: through the cell, then remembered as the new signature
    np.testing.assert_allclose(graph(Tensor(x3), Tensor(w))[0].asnumpy(), x3 @ w + 1.0, rtol=1e-6)
    assert graph._phase is not None and graph._phase != phase
    np.testing.assert_allclose(graph(Tensor(x4), Tensor(w))[0].asnumpy(), x4 @ w + 1.0, rtol=1e-6)
