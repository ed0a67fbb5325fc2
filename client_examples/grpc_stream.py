#!/usr/bin/env python3
"""Stream a completion over gRPC with tritonclient and print each piece as it arrives.

    python client_examples/grpc_stream.py "Triton is an inference server."
    python client_examples/grpc_stream.py --max-tokens 40 --temperature 0.8 --top-k 20 --seed 7 "MindSpore is"
    python client_examples/grpc_stream.py --model smollm2 --chat "What is the capital of France?"

The generated text goes to stdout, piece by piece; the summary line (tokens, finish reason, time to first
token, tokens/s) goes to stderr, so `... > out.txt` keeps only the text. Ctrl-C cancels the request on the
server (its KV-cache slot is freed at the next step) and still prints the summary.

The model is the decoupled front model NAME (`demo` after `make demo`): one response per generated token.
The stream is opened with enable_empty_final_response=True, so every response carries the parameter
`triton_final_response`; the one where it is true ends the request (it may carry the last token or be empty).
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def build_inputs(args) -> list:
    """One InferInput per given option. The model's max_batch_size is > 0, so every tensor has a leading
    batch dimension of 1: shape [1, 1] for scalars, [1, N] for the word lists."""
    words = lambda items: [w.encode("utf-8") for w in items] or None  # noqa: E731
    if args.chat:  # the prompt is a user message, rendered by the model's chat template on the server
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        prompt = ("messages", "BYTES", [json.dumps(messages).encode("utf-8")])
    else:
        prompt = ("text_input", "BYTES", [args.prompt.encode("utf-8")])
    values = [
        prompt,
        ("max_tokens", "INT32", args.max_tokens),
        ("stream", "BOOL", True),
        ("min_tokens", "INT32", args.min_tokens),
        ("temperature", "FP32", args.temperature),
        ("top_k", "INT32", args.top_k),
        ("top_p", "FP32", args.top_p),
        ("repetition_penalty", "FP32", args.repetition_penalty),
        ("presence_penalty", "FP32", args.presence_penalty),
        ("frequency_penalty", "FP32", args.frequency_penalty),
        ("seed", "UINT64", args.seed),
        ("do_sample", "BOOL", args.do_sample),
        ("end_id", "INT32", args.end_id),
        ("stop_words", "BYTES", words(args.stop_word)),
        ("bad_words", "BYTES", words(args.bad_word)),
        ("exclude_input_in_output", "BOOL", False if args.echo else None),
    ]
    numpy_types = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64,
                   "BOOL": np.bool_}
    inputs = []
    for name, datatype, value in values:
        if value is None:  # not given: the server's default applies
            continue
        array = np.array([value if isinstance(value, list) else [value]], dtype=numpy_types[datatype])
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def first(result, name: str):
    array = result.as_numpy(name)
    return None if array is None else array.reshape(-1)[0]


def is_final(result) -> bool:
    parameter = result.get_response().parameters.get("triton_final_response")
    return parameter is not None and parameter.bool_param


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a chat message (the `messages` input), through the model's template")
    parser.add_argument("--system", help="with --chat: a system message before the user's")
    parser.add_argument("--url", default="localhost:8001", help="gRPC host:port (default %(default)s)")
    parser.add_argument("--model", default="demo", help="the decoupled front model (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default %(default)s)")
    parser.add_argument("--min-tokens", type=int, help="do not stop before this many tokens")
    parser.add_argument("--temperature", type=float, help="sampling temperature (greedy when not given)")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="nucleus sampling probability mass")
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--presence-penalty", type=float)
    parser.add_argument("--frequency-penalty", type=float)
    parser.add_argument("--seed", type=int, help="random seed of this request (reproducible sampling)")
    parser.add_argument("--do-sample", action="store_true", default=None,
                        help="sample (temperature 1) instead of greedy")
    parser.add_argument("--end-id", type=int, help="stop at this token id (default: the tokenizer's EOS)")
    parser.add_argument("--stop-word", action="append", default=[], help="stop at this text (repeatable)")
    parser.add_argument("--bad-word", action="append", default=[], help="never generate this text (repeatable)")
    parser.add_argument("--echo", action="store_true", help="print the prompt before the generated text")
    parser.add_argument("--request-id", default="grpc-stream-1")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for each response")
    args = parser.parse_args()
    # Ctrl-C raises KeyboardInterrupt, even when started with SIGINT ignored (as `cmd &` in a script does).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    client = grpcclient.InferenceServerClient(args.url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))

    start = time.perf_counter()
    first_token_at = last_token_at = None
    pieces = tokens = 0
    finish_reason, status = "", 0
    try:
        client.async_stream_infer(args.model, build_inputs(args), request_id=args.request_id,
                                  enable_empty_final_response=True)
        while True:
            try:
                result, error = responses.get(timeout=args.timeout)
            except queue.Empty:
                raise TimeoutError(f"no response in {args.timeout}s") from None
            if error is not None:
                raise error
            text = first(result, "text_output")
            if text is not None:  # the empty final response has no outputs
                last_token_at = time.perf_counter()
                first_token_at = first_token_at or last_token_at
                pieces += 1
                tokens = int(first(result, "num_output_tokens"))
                finish_reason = first(result, "finish_reason").decode("utf-8") or finish_reason
                sys.stdout.write(text.decode("utf-8"))
                sys.stdout.flush()
            if is_final(result):
                break
        client.stop_stream()
    except KeyboardInterrupt:
        # Closing the stream with cancel_requests=True cancels the request on the server.
        client.stop_stream(cancel_requests=True)
        finish_reason, status = "cancelled (Ctrl-C)", 130
    except (InferenceServerException, TimeoutError) as exc:
        client.stop_stream(cancel_requests=True)
        if pieces:
            sys.stdout.write("\n")
            sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    end = time.perf_counter()

    sys.stdout.write("\n")
    sys.stdout.flush()
    tokens = tokens or pieces
    ttft = f"{(first_token_at - start) * 1000:.1f} ms" if first_token_at else "-"
    rate = tokens / (last_token_at - start) if last_token_at else 0.0
    decode = (f", {(tokens - 1) / (last_token_at - first_token_at):.1f} tokens/s after the first"
              if tokens > 1 and last_token_at > first_token_at else "")
    print(f"[{tokens} tokens, finish reason: {finish_reason or '-'}, time to first token: {ttft}, "
          f"total: {(end - start) * 1000:.1f} ms, {rate:.1f} tokens/s{decode}]", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
