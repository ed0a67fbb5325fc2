"""The kernels as MindSpore AOT custom operators, and the MindIR fix-up that lets graphs using them load anywhere.

Each operator names its function in ``libmstriton_kernels.so`` (``csrc/entry.cpp`` lists them) and carries a
registration (``CustomRegOp``) so that MindSpore infers output shapes through the library's C++ functions: graphs
with dynamic dimensions (prefill) then load back from MindIR, where Python shape functions no longer exist.

A MindIR file stores the library by the absolute path it had at export. ``portable_mindir`` rewrites that path
to this installation's library before loading, so a model repository exported on one machine or in one folder
loads in another (the container image, another checkout, another venv).
"""

from __future__ import annotations

import atexit
import functools
import re
import shutil
import tempfile
from pathlib import Path

from . import LIBRARY, ensure_built

LIBRARY_NAME = LIBRARY.name
_PATH_IN_MINDIR = re.compile(r"[^\s:\"']*" + re.escape(LIBRARY_NAME))
_PATH_IN_MINDIR_BYTES = re.compile(_PATH_IN_MINDIR.pattern.encode())


def _registration(name: str, input_dtypes: list[str], output_dtypes: list[str]):
    from mindspore.ops import CustomRegOp, DataType
    types = {"float32": DataType.F32_Default, "uint8": DataType.U8_Default, "int32": DataType.I32_Default}
    reg = CustomRegOp(name)
    for i in range(len(input_dtypes)):
        reg = reg.input(i, f"x{i}")
    for i in range(len(output_dtypes)):
        reg = reg.output(i, f"y{i}")
    reg = reg.dtype_format(*[types[t] for t in input_dtypes + output_dtypes])
    return reg.target("CPU").get_op_info()


@functools.lru_cache(maxsize=None)
def custom_op(function: str, input_dtypes: tuple[str, ...], output_dtypes: tuple[str, ...]):
    """An ops.Custom calling `function` of the library, for inputs and outputs of these dtypes."""
    from mindspore import ops
    ensure_built()
    return ops.Custom(f"{LIBRARY}:{function}", out_shape=None, out_dtype=None, func_type="aot",
                      reg_info=_registration(function, list(input_dtypes), list(output_dtypes)))


def linear(fmt: str, pre: str, n_extra: int):
    """The weight product of format `fmt` with `pre` ('none', 'rmsnorm', 'swiglu') and n_extra bias / residual
    inputs. Inputs: x, (norm, eps,) w, extras."""
    kind = {"none": "MstLinear", "rmsnorm": "MstNormLinear", "swiglu": "MstSwigluLinear"}[pre]
    inputs = ("float32",) + (("float32", "float32") if pre == "rmsnorm" else ()) + ("uint8",) + \
        ("float32",) * n_extra
    return custom_op(f"{kind}_{fmt}", inputs, ("float32",))


def embed(fmt: str):
    """Inputs: tokens int32, table uint8, a float32 [E] tensor giving the width."""
    return custom_op(f"MstEmbed_{fmt}", ("int32", "uint8", "float32"), ("float32",))


def decode_attention():
    """Inputs: qkv, positions, cos, sin, k_pool, v_pool, block_index [L, B, blocks], layer [1]. Output: the
    attention [B, H*D]; the new token's K/V are written into the pools (csrc/attention.h)."""
    return custom_op("MstDecodeAttention", ("float32", "int32", "float32", "float32", "float32", "float32", "int32",
                                            "int32"), ("float32",))


def decode_layer(fmt: str):
    """A whole decoder layer of a decode step (no biases, the layer's matrices in one format), writing the new
    token's K/V into the pools itself. Inputs: x, positions, cos, sin, k_pool, v_pool, block_index, layer,
    attention_norm, eps, wqkv, wo, ffn_norm, w_gate_up, w_down. Output: x."""
    inputs = ("float32", "int32", "float32", "float32", "float32", "float32", "int32", "int32", "float32", "float32",
              "uint8", "uint8", "float32", "uint8", "uint8")
    return custom_op(f"MstDecodeLayerInPlace_{fmt}", inputs, ("float32",))


def decode_step():
    """A whole decode step over one weight blob (engine/weight_blob.py). Inputs: tokens, positions, cos, sin,
    k_pool, v_pool, block_index, layout, eps, blob, lm_head (a view of the blob). Output: logits [B, V]."""
    return custom_op("MstDecodeStep", ("int32", "int32", "float32", "float32", "float32", "float32", "int32", "int32",
                                       "float32", "uint8", "uint8"), ("float32",))


def uses_kernels(mindir: bytes) -> bool:
    return LIBRARY_NAME.encode() in mindir


def with_library(mindir: bytes, library: str) -> bytes:
    """A MindIR graph whose kernel library paths (any folder ending in the library's name) are `library`."""
    from google.protobuf.descriptor import FieldDescriptor
    from mindspore.train import mind_ir_pb2

    def repeated(field) -> bool:  # protobuf 6 deprecates .label for .is_repeated
        return field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED

    def rewrite(message) -> None:
        for field, value in message.ListFields():
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in (value if repeated(field) else [value]):
                    rewrite(item)
            elif field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                as_bytes = field.type == FieldDescriptor.TYPE_BYTES
                pattern, new, name = (_PATH_IN_MINDIR_BYTES, library.encode(), LIBRARY_NAME.encode()) \
                    if as_bytes else (_PATH_IN_MINDIR, library, LIBRARY_NAME)
                fix = lambda v: pattern.sub(new, v) if name in v else v  # noqa: E731 (skip tensor data)
                if repeated(field):
                    for i, v in enumerate(value):
                        value[i] = fix(v)
                else:
                    setattr(message, field.name, fix(value))

    model = mind_ir_pb2.ModelProto()
    model.ParseFromString(mindir)
    rewrite(model)
    return model.SerializeToString()


_rewritten_dir: Path | None = None


def portable_mindir(path: str | Path) -> str:
    """`path` itself if its graph calls no kernel; else a copy whose kernel library paths point at this
    installation's library (written once per process into a private temporary folder)."""
    global _rewritten_dir
    data = Path(path).read_bytes()
    if not uses_kernels(data):
        return str(path)
    ensure_built()
    if _rewritten_dir is None:
        _rewritten_dir = Path(tempfile.mkdtemp(prefix="mstriton-mindir-"))
        atexit.register(shutil.rmtree, _rewritten_dir, True)
    out = _rewritten_dir / Path(path).name
    out.write_bytes(with_library(data, str(LIBRARY)))
    return str(out)
