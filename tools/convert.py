#!/usr/bin/env python3
"""Convert a LLaMA-family checkpoint into MindIR graphs inside a Triton model repository.

    python tools/convert.py --checkpoint DIR|FILE.gguf --name NAME --model-repository DIR \
        [--device CPU|Ascend|GPU] [--max-batch-size N] [--max-seq-len N] [--dtype float32|float16|bfloat16]
        [--template none|chatml|llama2|internlm|FILE.jinja] [--prefill-chunk N]
        [--weights float32|bfloat16|int8|Q8_0|Q4_0|Q4_1] [--method METHOD=FILE.py ...]

DIR holds config.json, a tokenizer (tokenizer.json, or sentencepiece's tokenizer.model) and either
*.safetensors (Hugging Face, sharded or not) or one MindSpore *.ckpt. A .gguf file holds all three (tensors
F32, F16, BF16, Q8_0, Q4_0, Q4_1). Running it again replaces the model (and its methods); a failed run leaves the
repository as it was. Each --method is served as NAME_METHOD and NAME_METHOD_unary (docs/methods.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only; our own progress lines say what happens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="folder with config.json, tokenizer.json or tokenizer.model, weights; or a .gguf file")
    parser.add_argument("--name", required=True, help="model name; folders NAME_* are written")
    parser.add_argument("--model-repository", required=True, help="Triton model repository folder")
    parser.add_argument("--device", default="CPU", choices=["CPU", "Ascend", "GPU"])
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=16, help="KV-cache slots and largest decode batch")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="prompt plus output tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--template", default="none",
                        help="none (default): text_input is sent as it is and chat messages go through the "
                             "model's own chat template; chatml, llama2, internlm or a .jinja file: that template "
                             "renders chat messages and wraps every text_input as one user message")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="prompts longer than this prefill in chunks of this many tokens, which bounds the "
                             "memory each compiled prefill shape keeps (0: whole prompts)")
    parser.add_argument("--weights", default="float32",
                        choices=["float32", "bfloat16", "int8", "Q8_0", "Q4_0", "Q4_1"],
                        help="how weight matrices are stored and multiplied: float32 (MindSpore's MatMul, any "
                             "device) or, on the CPU, packed for the mstriton kernels: bfloat16, int8 (one scale "
                             "per output channel) or GGUF blocks; a GGUF file's own Q8_0/Q4_0/Q4_1 matrices are "
                             "kept as they are")
    parser.add_argument("--speculative", choices=["off", "ngram"], default="off",
                        help="ngram: the decode model drafts tokens by n-gram lookup in each sequence's prompt and "
                             "output and verifies several per step (packed weight formats only; the output is the "
                             "same). The decode model's parameters tune it (docs/speculative.md)")
    parser.add_argument("--shape", choices=["disaggregated", "colocated"], default="disaggregated",
                        help="disaggregated (default): prefill and the first token's sampling run in models of their "
                             "own under Triton's dynamic batcher, the prompt's KV handed to the decode model in "
                             "shared memory; colocated: the decode model prefills prompts in chunks between its "
                             "steps (benchmarks/shapes.md compares them)")
    parser.add_argument("--activations", choices=["float32", "int8"], default=None,
                        help="the served model's kernel products: int8 (activations quantized per block of 32, as "
                             "llama.cpp does; the default for Q8_0/Q4_0/Q4_1) or float32 (exact parity with "
                             "transformers; the default for the other formats). MSTRITON_KERNEL_ACTIVATIONS in the "
                             "server's environment overrides it")
    parser.add_argument("--method", action="append", default=[], metavar="METHOD=FILE",
                        help="serve the method METHOD (letters, digits, '_') as the models NAME_METHOD and "
                             "NAME_METHOD_unary: FILE is a Python file with preprocess(request) -> dict and "
                             "postprocess(text, request) -> dict, copied into the repository (docs/methods.md); "
                             "may be given several times")
    args = parser.parse_args(argv)
    from mstriton.serving.methods import MethodFileError, load_method, parse_method_flag

    methods = {}
    try:  # checked before the converter's imports (MindSpore): a wrong method file fails at once
        for flag in args.method:
            method, path = parse_method_flag(flag)
            if method in methods:
                raise MethodFileError(f"--method {flag}: the method {method} is given twice")
            try:
                load_method(path, method)
            except MethodFileError as exc:
                raise MethodFileError(f"--method {flag}: {exc}") from None
            methods[method] = path
    except MethodFileError as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2

    from mstriton.config import ConfigError
    from mstriton.convert import convert
    from mstriton.model.weights import WeightError
    from mstriton.tokenizer import TokenizerError

    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[convert {args.name} {time.monotonic() - started:6.1f}s] {message}", flush=True)

    try:
        convert(args.checkpoint, args.name, args.model_repository, methods=methods, device=args.device,
                device_id=args.device_id,
                max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, dtype=args.dtype,
                template=args.template, prefill_chunk=args.prefill_chunk, weights=args.weights,
                activations=args.activations, speculative=args.speculative, shape=args.shape,
                progress=progress)
    except (ConfigError, WeightError, TokenizerError, ValueError, FileNotFoundError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
