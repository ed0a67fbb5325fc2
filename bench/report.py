"""The benchmark's output: a markdown table with the ratios the issue asks for, the raw results as JSON, and two
PNG plots (throughput and time to first token against concurrency)."""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

from .harness import processes

OURS, ENGINE = "mstriton (tritonserver)", "engine alone"
# The same server, with requests asking for four tokens per streamed response (stream_interval=4)
OURS_GROUPED = "mstriton, 4 tokens per response"
HF_SEQUENTIAL, HF_BATCHED = "transformers, one at a time", "transformers, static batch"


def machine_description() -> str:
    total = processes.meminfo_bytes("MemTotal")
    memory = f"{total / 2**30:.0f} GiB" if total is not None else "?"
    return (f"{processes.cpu_model() or 'unknown CPU'}, {processes.cores()} cores, {memory} RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


@dataclasses.dataclass
class Results:
    """results[model][shape][system][concurrency] = PointResult as a dict, or {"error": "..."}."""
    date: str
    machine: str
    versions: dict
    tools: dict                                     # system -> what measured it
    prefill_ms: dict                                # model -> shape -> single-request prefill time
    points: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    def put(self, model: str, shape: str, system: str, concurrency: int, value: dict) -> None:
        self.points.setdefault(model, {}).setdefault(shape, {}).setdefault(system, {})[str(concurrency)] = value

    def get(self, model, shape, system, concurrency) -> dict | None:
        value = self.points.get(model, {}).get(shape, {}).get(system, {}).get(str(concurrency))
        return value if value and "error" not in value else None

    def save_json(self, path: Path) -> None:
        write_atomically(path, json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "Results":
        return cls(**json.loads(Path(path).read_text()))

    def merge(self, other: "Results") -> None:
        """Take in the points, prefill times and notes of another run (one `make bench` split into parts to fit
        the time at hand); a point both runs measured keeps `other`'s."""
        for model, shapes in other.points.items():
            for shape, systems in shapes.items():
                for system, by_concurrency in systems.items():
                    for concurrency, value in by_concurrency.items():
                        self.put(model, shape, system, int(concurrency), value)
        for model, by_shape in other.prefill_ms.items():
            self.prefill_ms.setdefault(model, {}).update(by_shape)
        self.notes += [note for note in other.notes if note not in self.notes]

    def concurrencies(self) -> list[int]:
        return sorted({int(c) for shapes in self.points.values() for systems in shapes.values()
                       for by_concurrency in systems.values() for c in by_concurrency})


def run_results(command: str, **fields) -> dict:
    """The start of a run's results: when, on what machine, by which command; points and notes to fill."""
    import datetime
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_description(), "command": command, "points": {}, "notes": [], **fields}


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure laid out, written to `path` and closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_run(results: dict, out: str | Path, markdown, plot) -> str:
    """OUT.json, OUT.md (markdown(results)) and OUT.png (plot(results, path)); the markdown, printed."""
    import json
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out.with_suffix(".json"), json.dumps(results, indent=1))
    text = markdown(results)
    write_atomically(out.with_suffix(".md"), text)
    plot(results, out.with_suffix(".png"))
    print(text)
    return text


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def ratio(a: dict | None, b: dict | None, key: str = "tokens_per_s") -> str:
    if not a or not b or not b[key]:
        return "n/a"
    return f"{a[key] / b[key]:.2f}"


def markdown(results: Results, concurrencies: list[int]) -> str:
    lines = [f"# Serving benchmark, {results.date}", "",
             f"Machine: {results.machine}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items()) + ".", "",
             "Who measured what:", ""]
    lines += [f"- **{system}**: {tool}" for system, tool in results.tools.items()]
    lines += ["", "Throughput is output tokens over the span from the first request sent to the last token "
              "received; time to first token (TTFT) and inter-token latency (ITL, every gap between two tokens "
              "of one request) are percentiles over every request of the point. Clients are closed-loop: each "
              "of the `concurrency` clients sends its next request when its previous one has ended.", ""]
    for model, shapes in results.points.items():
        for shape, systems in shapes.items():
            lines += [f"## {model}, {shape}", ""]
            lines += summary_lines(results, model, shape, concurrencies)
            lines += ["", "| system | concurrency | requests | tokens/s | requests/s | TTFT p50 ms | TTFT p99 ms | "
                      "ITL p50 ms | ITL p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for system, by_concurrency in systems.items():
                for concurrency in concurrencies:
                    point = by_concurrency.get(str(concurrency))
                    if point is None:
                        continue
                    if "error" in point:
                        lines.append(f"| {system} | {concurrency} | {point['error']} |||||||")
                        continue
                    lines.append(f"| {system} | {concurrency} | {point['requests']} | {point['tokens_per_s']:.1f} | "
                                 f"{point['requests_per_s']:.2f} | {point['ttft_p50_ms']:.0f} | "
                                 f"{point['ttft_p99_ms']:.0f} | {point['itl_p50_ms']:.1f} | {point['itl_p99_ms']:.1f} |")
            lines.append("")
    if results.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in results.notes] + [""]
    return "\n".join(lines)


def summary_lines(results: Results, model: str, shape: str, concurrencies: list[int]) -> list[str]:
    get = lambda system, c: results.get(model, shape, system, c)  # noqa: E731
    peers = [s for s in results.points[model][shape] if s not in (OURS, ENGINE, OURS_GROUPED)]
    header = "| ratio (floor) | " + " | ".join(f"c={c}" for c in concurrencies) + " |"
    rows = [header, "|---|" + "---:|" * len(concurrencies),
            "| serving efficiency = ours / engine alone (>= 0.9) | "
            + " | ".join(ratio(get(OURS, c), get(ENGINE, c)) for c in concurrencies) + " |"]
    if OURS_GROUPED in results.points[model][shape]:
        rows.append("| the same at 4 tokens per response (stream_interval=4) | "
                    + " | ".join(ratio(get(OURS_GROUPED, c), get(ENGINE, c)) for c in concurrencies) + " |")
    for peer in peers:
        rows.append(f"| ours / {peer} tokens/s | " + " | ".join(ratio(get(OURS, c), get(peer, c))
                                                               for c in concurrencies) + " |")
    lines = rows + [""]
    one, sixteen = get(OURS, 1), get(OURS, 16)
    if one and sixteen:
        lines.append(f"- Throughput at concurrency 16 / concurrency 1: **{sixteen['tokens_per_s'] / one['tokens_per_s']:.2f}x** "
                     "(target >= 8x).")
    prefill = results.prefill_ms.get(model, {}).get(shape)
    if sixteen and prefill:
        lines.append(f"- TTFT p50 at concurrency 16 / single-request prefill time ({prefill:.0f} ms, the prefill graph "
                     f"alone): **{sixteen['ttft_p50_ms'] / prefill:.2f}x** (target <= 2x).")
    return lines


def write_report(results: Results, concurrencies: list[int], out: Path) -> list[Path]:
    """OUT.json, OUT.md and the two plots beside them; returns the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results.save_json(out.with_suffix(".json"))
    write_atomically(out.with_suffix(".md"), markdown(results, concurrencies))
    return [out.with_suffix(".json"), out.with_suffix(".md")] + plots(results, concurrencies, out.parent, out.name)


def plots(results: Results, concurrencies: list[int], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = [(model, shape) for model, shapes in results.points.items() for shape in shapes]
    for key, label, name in (("tokens_per_s", "output tokens/s", "throughput"),
                             ("ttft_p50_ms", "time to first token p50 (ms)", "ttft")):
        figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for axis, (model, shape) in zip(axes[0], panels):
            for system, by_concurrency in results.points[model][shape].items():
                xs = [c for c in concurrencies if results.get(model, shape, system, c)]
                if xs:
                    axis.plot(xs, [results.get(model, shape, system, c)[key] for c in xs], marker="o", label=system)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
            axis.set_xlabel("concurrency")
            axis.set_ylabel(label)
            axis.set_title(f"{model}, {shape}", fontsize=9)
            axis.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        figure.suptitle(f"{label} vs concurrency ({results.date})", fontsize=10)
        figure.tight_layout()
        path = out_dir / f"{stem}_{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def plot_by_concurrency(path: Path, concurrencies: list[int], panels, systems, point, title: str,
                        dashed=lambda system: False, xlabel: str = "concurrency", width: float = 5.0) -> Path:
    """One log-log panel per (key, label) of `panels`: each system's figure against concurrency. point(system, c)
    gives the measured dict, or None to leave the point out; dashed(system) draws that system's line dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels):
        for system in systems:
            xs = [c for c in concurrencies if point(system, c)]
            if xs:
                axis.plot(xs, [point(system, c)[key] for c in xs], marker="o", label=system,
                          linestyle="--" if dashed(system) else "-")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrency")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_xlabel(xlabel)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def render_again(write_report, run_json: str, out: str | None, say) -> int:
    """A benchmark tool's --render: write_report(results, stem) again from a run's JSON, without measuring;
    the stem is `out`, else the JSON's own path without its suffix. Returns the tool's exit status."""
    for path in write_report(json.loads(Path(run_json).read_text()), Path(out) if out else Path(run_json).with_suffix("")):
        say(f"wrote {path}")
    return 0
