#!/usr/bin/env python3
"""What the front model costs per token: the same greedy stream through NAME (front model -> ensemble) and
through NAME_pipeline (the ensemble called directly, which cannot see cancellations and streams token ids, not
text: detokenization is the front model's too), interleaved, one request at a time. Prints a table and saves it to benchmarks/front_cost.md.

    python tools/bench_front_cost.py [--url localhost:8001] [--name demo] [--prompt TEXT] [--tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import queue
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mstriton.params import GenerationParams  # noqa: E402


def stream_once(url: str, model: str, inputs: dict) -> tuple[float, list[float]]:
    """Seconds to the first response, and the gaps between later responses."""
    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((time.perf_counter(), result, error)))
    tensors = []
    for name, (array, dtype) in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    sent = time.perf_counter()
    client.async_stream_infer(model, tensors, enable_empty_final_response=True)
    times = []
    while True:
        when, result, error = results.get(timeout=300)
        if error is not None:
            raise RuntimeError(f"{model}: {error}")
        response = result.get_response()
        if response.outputs:  # a token (text from NAME, ids from NAME_pipeline), not the empty final response
            times.append(when)
        final = response.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            break
    client.stop_stream()
    return times[0] - sent, list(np.diff(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--name", default="demo")
    parser.add_argument("--prompt", default="Triton Inference Server")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "front_cost.md"))
    args = parser.parse_args()
    text = np.array([[args.prompt.encode()]], np.object_)
    front_inputs = {"text_input": (text, "BYTES"), "max_tokens": (np.array([[args.tokens]], np.int32), "INT32"),
                    "stream": (np.array([[True]]), "BOOL")}
    params = json.dumps(dataclasses.asdict(GenerationParams(max_tokens=args.tokens)))
    samples = {"front": ([], []), "pipeline": ([], [])}
    for round_ in range(args.rounds):
        pipeline_inputs = {"text_input": (text, "BYTES"),
                           "params_json": (np.array([[params.encode()]], np.object_), "BYTES"),
                           "request_key": (np.array([[f"bench-{round_}".encode()]], np.object_), "BYTES")}
        for path, model, inputs in (("front", args.name, front_inputs),
                                    ("pipeline", f"{args.name}_pipeline", pipeline_inputs)):
            first, gaps = stream_once(args.url, model, inputs)
            samples[path][0].append(first)
            samples[path][1].extend(gaps)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    rows = {path: (1e3 * float(np.median(firsts)), 1e3 * float(np.median(gaps)), 1e3 * float(np.mean(gaps)))
            for path, (firsts, gaps) in samples.items()}
    extra_median = rows["front"][1] - rows["pipeline"][1]
    extra_mean = rows["front"][2] - rows["pipeline"][2]
    lines = [
        "# What the front model costs per token",
        "",
        f"Run {datetime.datetime.now():%Y-%m-%d %H:%M} against `{args.name}` at {args.url}: {args.rounds} "
        f"interleaved rounds of one greedy stream of {args.tokens} tokens per path, one request at a time.",
        "Made by `tools/bench_front_cost.py`.",
        "",
        "| path | time to first token ms (median) | inter-token ms (median) | inter-token ms (mean) |",
        "|---|---:|---:|---:|",
    ]
    for path, label in (("front", f"`{args.name}` (front model, sees cancellation)"),
                        ("pipeline", f"`{args.name}_pipeline` (ensemble alone)")):
        lines.append(f"| {label} | {rows[path][0]:.2f} | {rows[path][1]:.2f} | {rows[path][2]:.2f} |")
    lines += ["", f"Cost of the front model per token: {extra_median:+.2f} ms (median), {extra_mean:+.2f} ms (mean).",
              ""]
    report = "\n".join(lines)
    print(report)
    Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
