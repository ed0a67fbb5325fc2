#!/usr/bin/env python3
"""KServe v2 inference against the non-decoupled model NAME_unary (`demo_unary` after `make demo`), twice:

1. with tritonclient.http (InferInput / InferRequestedOutput), and
2. with the raw KServe v2 JSON body sent by urllib alone (no Triton package), which is printed first.

    python client_examples/kserve_infer.py "Triton is an inference server."
    python client_examples/kserve_infer.py --url localhost:8000 --max-tokens 24 "MindSpore is a deep learning"

Both print text_output: the whole completion comes back in one response.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def with_tritonclient(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    import numpy as np
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    # max_batch_size > 0: every input has a leading batch dimension, so a single prompt has shape [1, 1].
    text = httpclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=np.object_))
    limit = httpclient.InferInput("max_tokens", [1, 1], "INT32")
    limit.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    outputs = [httpclient.InferRequestedOutput(name)
               for name in ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")]
    result = client.infer(model, [text, limit], outputs=outputs)
    client.close()
    return {
        "text_output": result.as_numpy("text_output").reshape(-1)[0].decode("utf-8"),
        "finish_reason": result.as_numpy("finish_reason").reshape(-1)[0].decode("utf-8"),
        "num_input_tokens": int(result.as_numpy("num_input_tokens").reshape(-1)[0]),
        "num_output_tokens": int(result.as_numpy("num_output_tokens").reshape(-1)[0]),
    }


def v2_request_body(prompt: str, max_tokens: int) -> dict:
    """The KServe v2 inference request: tensors by name, shape, datatype and flattened data."""
    return {
        "inputs": [
            {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
            {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]},
        ],
        "outputs": [{"name": "text_output"}, {"name": "finish_reason"}, {"name": "num_input_tokens"},
                    {"name": "num_output_tokens"}],
    }


def show(body: dict) -> str:
    """The request JSON with one tensor per line."""
    def items(values):
        return ",\n".join("    " + json.dumps(v, ensure_ascii=False) for v in values)
    return ('{\n  "inputs": [\n' + items(body["inputs"]) + '\n  ],\n'
            '  "outputs": [\n' + items(body["outputs"]) + "\n  ]\n}")


def with_urllib(url: str, model: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # Triton explains a refused request in {"error": "..."}
        raise SystemExit(f"HTTP {exc.code}: {exc.read().decode('utf-8', 'replace')}") from None
    # The answer: {"model_name", "model_version", "outputs": [{"name", "datatype", "shape", "data"}, ...]}
    return {output["name"]: output["data"][0] for output in answer["outputs"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--url", default="localhost:8000", help="HTTP host:port (default %(default)s)")
    parser.add_argument("--model", default="demo_unary", help="a non-decoupled model (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default %(default)s)")
    args = parser.parse_args()

    from tritonclient.utils import InferenceServerException

    try:
        client_result = with_tritonclient(args.url, args.model, args.prompt, args.max_tokens)
    except InferenceServerException as exc:  # e.g. a refused parameter: the server names it
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"tritonclient.http: {client_result['text_output']!r}")
    print(f"  finish_reason={client_result['finish_reason']} num_input_tokens={client_result['num_input_tokens']} "
          f"num_output_tokens={client_result['num_output_tokens']}")

    body = v2_request_body(args.prompt, args.max_tokens)
    print(f"\nPOST http://{args.url}/v2/models/{args.model}/infer")
    print(show(body))
    raw_result = with_urllib(args.url, args.model, body)
    print(f"urllib: {raw_result['text_output']!r}")
    print(f"  finish_reason={raw_result['finish_reason']} num_input_tokens={raw_result['num_input_tokens']} "
          f"num_output_tokens={raw_result['num_output_tokens']}")

    same = raw_result["text_output"] == client_result["text_output"]
    print(f"\nsame text from both: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
