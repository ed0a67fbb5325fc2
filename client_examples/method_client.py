#!/usr/bin/env python3
"""Call a method (docs/methods.md): `smollm2_summarize`, the example method client_examples/methods/summarize.py
that `make smollm2` registers, streamed over gRPC and then in one response over KServe v2 /infer.

    python client_examples/method_client.py                   # summarizes DEFAULT_TEXT in at most 12 words
    python client_examples/method_client.py --max-words 20 "The Eiffel Tower is a wrought-iron lattice tower ..."

The client names the model and the method (NAME_METHOD), sends the text as `text_input` and the method's own field
`max_words`: over gRPC inside the JSON object `method_fields` (an input tensor), over KServe v2 as a request
parameter. Printed, for each:

    grpc stream (smollm2_summarize): the generated text as it streams (the method's postprocess has not run yet)
    method_output: the JSON object the method's postprocess returned with the last response
    kserve infer (smollm2_summarize_unary): text_output, which postprocess's text_output replaced
    method_output: the same object
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

DEFAULT_TEXT = ("Triton Inference Server is open-source software that standardizes AI model deployment and execution "
                "across every workload. It supports models from many frameworks, runs on CPUs and GPUs, batches "
                "requests dynamically, and reports metrics for monitoring.")


def tensor(name: str, datatype: str, value) -> grpcclient.InferInput:
    array = np.array([[value]], dtype=np.object_ if datatype == "BYTES" else np.int32)
    t = grpcclient.InferInput(name, [1, 1], datatype)
    t.set_data_from_numpy(array)
    return t


def grpc_stream(url: str, model: str, text: str, max_words: int, max_tokens: int | None) -> dict:
    """Stream `text` to the method's front model; the streamed text is printed as it comes. Returns method_output."""
    inputs = [tensor("text_input", "BYTES", text.encode("utf-8")),
              tensor("method_fields", "BYTES", json.dumps({"max_words": max_words}).encode("utf-8"))]
    if max_tokens is not None:
        inputs.append(tensor("max_tokens", "INT32", max_tokens))
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    method_output = None
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        print(f"grpc stream ({model}): ", end="", flush=True)
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                raise RuntimeError(error.message() if hasattr(error, "message") else str(error))
            piece = result.as_numpy("text_output")
            if piece is not None:
                print(piece.reshape(-1)[0].decode("utf-8"), end="", flush=True)
            output = result.as_numpy("method_output")
            if output is not None:  # with the last response
                method_output = json.loads(output.reshape(-1)[0])
            parameter = result.get_response().parameters.get("triton_final_response")
            if parameter is not None and parameter.bool_param:
                break
        print()
    finally:
        client.stop_stream()
        client.close()
    return method_output


def kserve_infer(url: str, model: str, text: str, max_words: int, max_tokens: int | None) -> dict:
    """KServe v2 /infer on the method's unary entry: the method's field as a request parameter."""
    inputs = [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]
    if max_tokens is not None:
        inputs.append({"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]})
    body = {"inputs": inputs, "parameters": {"max_words": max_words},
            "outputs": [{"name": "text_output"}, {"name": "method_output"}, {"name": "finish_reason"}]}
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"HTTP {error.code}: {error.read().decode('utf-8', 'replace')}") from None
    outputs = {o["name"]: o["data"][0] for o in answer["outputs"]}
    return outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", nargs="?", default=DEFAULT_TEXT, help="the text to summarize (default: a paragraph "
                                                                      "about Triton)")
    parser.add_argument("--model", default="smollm2_summarize", help="the method's model, NAME_METHOD "
                                                                     "(default %(default)s)")
    parser.add_argument("--max-words", type=int, default=12, help="the method's own field (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens to generate (default: the method's, 2 * max_words + 8)")
    parser.add_argument("--grpc-url", default="localhost:8001", help="gRPC host:port (default %(default)s)")
    parser.add_argument("--http-url", default="localhost:8000", help="HTTP host:port (default %(default)s)")
    args = parser.parse_args()
    try:
        streamed = grpc_stream(args.grpc_url, args.model, args.text, args.max_words, args.max_tokens)
        print("method_output:", json.dumps(streamed, ensure_ascii=False))
        unary = kserve_infer(args.http_url, f"{args.model}_unary", args.text, args.max_words, args.max_tokens)
        print(f"kserve infer ({args.model}_unary): {unary['text_output']}")
        print("method_output:", json.dumps(json.loads(unary["method_output"]), ensure_ascii=False))
    except Exception as exc:  # noqa: BLE001 - a client example: say what failed
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
