#!/usr/bin/env python3
"""Call the demo model deployed on KServe (docker/kserve/inferenceservice-v2.yaml) with the KServe v2 protocol.

    # the InferenceService's host and the cluster's ingress address
    HOST=$(kubectl get inferenceservice mstriton-demo-v2 -o jsonpath='{.status.url}' | cut -d/ -f3)
    python client_examples/kserve_v2_on_kserve.py --url http://$INGRESS_HOST:$INGRESS_PORT --host $HOST \
        "Triton is an inference server."

    # or straight at a server, e.g. `make run` or the image run with docker (no --host needed)
    python client_examples/kserve_v2_on_kserve.py --url http://localhost:8000 "Triton is an inference server."

With the standard library only (urllib), as any KServe v2 client could: model readiness and metadata, one
inference request on MODEL_unary (POST /v2/models/MODEL_unary/infer), then the same prompt as a token stream
(POST /v2/models/MODEL/generate_stream, Server-Sent Events), all through the ingress with the
InferenceService's Host header.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


class Endpoint:
    """One base URL, with the Host header that routes to the InferenceService behind a shared ingress."""

    def __init__(self, url: str, host: str | None, timeout: float):
        self.url = url.rstrip("/")
        self.headers = {"Host": host} if host else {}
        self.timeout = timeout

    def open(self, path: str, body: dict | None = None):
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="POST" if body is not None else "GET")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:  # Triton says why in {"error": "..."}
            raise SystemExit(f"{request.method} {path}: HTTP {exc.code}: "
                             f"{exc.read().decode('utf-8', 'replace')}") from None
        except urllib.error.URLError as exc:
            raise SystemExit(f"{request.method} {self.url + path}: {exc.reason}") from None

    def json(self, path: str, body: dict | None = None) -> dict:
        with self.open(path, body) as response:
            return json.loads(response.read())


def infer_body(prompt: str, max_tokens: int) -> dict:
    """A KServe v2 inference request: named tensors with shape, datatype and row-major data. The model
    batches (max_batch_size > 0), so one prompt is a [1, 1] tensor."""
    return {
        "id": "kserve-example-1",
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [prompt]},
            {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [max_tokens]},
        ],
        "outputs": [{"name": "text_output"}, {"name": "finish_reason"}, {"name": "num_output_tokens"}],
    }


def stream(endpoint: Endpoint, model: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    """Print the pieces of a generate_stream answer as they arrive; return the whole text and the finish reason."""
    body = {"text_input": prompt, "max_tokens": max_tokens, "stream": True}
    pieces, reason = [], ""
    with endpoint.open(f"/v2/models/{model}/generate_stream", body) as response:
        for raw in response:  # one "data: {...}" line per token, events separated by blank lines
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):])
            if "error" in event:
                raise SystemExit(f"stream error: {event['error']}")
            pieces.append(event.get("text_output", ""))
            reason = event.get("finish_reason") or reason
            sys.stdout.write(pieces[-1])
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces), reason


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default="http://localhost:8000",
                        help="the KServe ingress (or the server itself), default %(default)s")
    parser.add_argument("--host", help="Host header: the InferenceService's host name (from its status.url)")
    parser.add_argument("--model", default="demo", help="the LLM's name; MODEL_unary answers /infer (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--no-stream", action="store_true", help="skip the generate_stream call")
    args = parser.parse_args()
    endpoint = Endpoint(args.url, args.host, args.timeout)
    unary = f"{args.model}_unary"

    with endpoint.open(f"/v2/models/{unary}/ready"):
        pass  # 200 = loaded; an error status ends in SystemExit above
    meta = endpoint.json(f"/v2/models/{unary}")
    names = ", ".join(f"{t['name']} {t['datatype']}{t['shape']}" for t in meta.get("inputs", [])[:3])
    print(f"model {meta['name']} (versions {meta.get('versions')}) is ready; inputs: {names}, ...")

    answer = endpoint.json(f"/v2/models/{unary}/infer", infer_body(args.prompt, args.max_tokens))
    outputs = {o["name"]: o["data"][0] for o in answer["outputs"]}
    print(f"infer: {outputs['text_output']!r} (finish_reason={outputs['finish_reason']}, "
          f"{outputs['num_output_tokens']} tokens, request id {answer.get('id')})")

    if args.no_stream:
        return 0
    print("generate_stream: ", end="")
    text, reason = stream(endpoint, args.model, args.prompt, args.max_tokens)
    same = text == outputs["text_output"]
    print(f"stream finish_reason={reason}; same text as infer: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
