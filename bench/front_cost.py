"""What the front model costs per token (tools/bench_front_cost.py): the same greedy stream through NAME (front
model -> ensemble) and through NAME_pipeline (the ensemble called directly, which cannot see cancellations and
streams token ids, not text: detokenization is the front model's too), interleaved, one request at a time.
Prints a table and saves it to benchmarks/front_cost.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import numpy as np

from bench.harness.streams import stream_once as stream
from mstriton.params import GenerationParams


def stream_once(url: str, model: str, inputs: dict) -> tuple[float, list[float]]:
    """Seconds to the first response, and the gaps between later responses (bench.harness.streams: every
    response with outputs, text from NAME, ids from NAME_pipeline; not the empty final one)."""
    generation = stream(url, model, inputs)
    if generation.error is not None:
        raise RuntimeError(f"{model}: {generation.error}")
    times = generation.arrivals
    return times[0] - generation.start, list(np.diff(times))


def run(args) -> None:
    """args: tools/bench_front_cost.py's options (url, name, prompt, tokens, rounds, out)."""
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

