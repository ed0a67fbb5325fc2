"""The demo model's training text, built from the project itself.

The corpus is a fixed description of the project written for it (``PROJECT_TEXT``), then the README, then the
module docstrings of the ``mstriton`` package read with ``ast`` (no module is imported), up to ``MAX_WORDS``
words in all, so that the training time stays bounded however long the documentation grows. Paragraphs are joined
to single lines and separated by blank lines; code blocks and tables of the README are left out. Files are read
in sorted order, so the same repository state always gives the same text, and the tests can tell whether a
trained model still matches the current corpus.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "mstriton"
# The corpus stops growing here, however long the documentation becomes: training time grows with the corpus.
MAX_WORDS = 4000
README_WORDS = 1200  # so that a long README leaves room for the package's docstrings

PROJECT_TEXT = """\
This project serves language models written with MindSpore on the Triton Inference Server from NVIDIA. A user \
trains or downloads a model of the LLaMA family, runs one converter, and then serves it with the real tritonserver \
program. Clients receive the generated text token by token over gRPC and HTTP, send KServe v2 requests, and \
measure the server with perf_analyzer and genai-perf.

MindSpore is a deep learning framework made by Huawei. It runs on Ascend accelerators, on GPUs, and on ordinary \
CPUs. A MindSpore network is a Python class called a Cell. In graph mode MindSpore compiles the whole network \
into one graph before it runs, which is much faster than executing each operator from Python. A compiled graph \
can be exported to a file in the MindIR format and loaded again later without the Python code that built it.

Triton is an inference server. It loads every model of a model repository, accepts requests over HTTP and gRPC, \
collects requests into batches, and reports metrics. Each model is a folder with a config.pbtxt file and one or \
more numbered version folders. Our models use the Python backend: Triton starts a small stub process for each \
model instance, and the stub runs the model.py file of the model with the Python of our virtual environment, so \
the code can import MindSpore and numpy like any other program.

The idea comes from MindSpore Serving. There a client talks to a master, and the master hands work to workers. \
Here Triton plays the master. It schedules requests, merges them with its dynamic batcher, and offers the \
endpoints. Our Python models are the workers, and each of them is a thin adapter over the mstriton package, \
where the real work is done and where every piece can be tested without a running server.

A request travels through an ensemble. An ensemble is a Triton model that contains no code of its own: it only \
says which model feeds which. The text of the prompt goes to the tokenizer model, which turns it into token ids. \
The prefill model reads the whole prompt at once and produces the logits of the last position together with the \
key and value cache of every layer. The sampler model picks the first new token. The decode model then produces \
every later token, and the front model turns each token id back into a piece of text for the client.

The tokenizer is a sentencepiece model. Before encoding, the tokenizer model can wrap the prompt in a chat \
template, such as the one used by LLaMA 2 chat, and it turns stop words and bad words into sequences of token \
ids. Because it is cheap and stateless, the tokenizer model uses the dynamic batcher of Triton and handles many \
requests in one call.

Prefill is the first pass over a prompt. Prompts of different lengths are padded on the right and merged into one \
batch, so a single MindSpore graph handles them all. Padding on the right needs no extra mask, because the padded \
keys always come after every real query and the causal mask already hides them. The graph returns the logits at \
the last real token of each prompt and the keys and values that the decode model will attend to.

The KV cache holds the keys and the values of every token that a sequence has seen so far. Without it, every new \
token would require running the whole prompt and all earlier output through the network again. With it, each \
step of decoding only computes the newest token and reads the stored keys and values of the older ones. The \
cache is large: for every layer and every position it stores one key vector and one value vector per key value \
head, so its size limits how many sequences can run at the same time.

Our cache is a pool of slots allocated once when the decode model starts. A sequence takes a free slot when it \
joins and gives the slot back the moment it finishes. The keys are stored transposed, so that the attention \
scores of a decode step are one batched matrix product with no transpose inside the graph. Grouped query \
attention lets several query heads share one key value head, which makes the cache smaller by the same factor.

Continuous batching means that the batch of the decode model changes at every step. Every step runs one batched \
MindSpore decode graph over all sequences that are still running. New requests join between two steps as soon as \
their prefill is done, and sequences that finish, meet a stop word, reach their token limit or are cancelled \
leave at once and free their slots. No request waits for the slowest member of a fixed batch, and the hardware \
stays busy as long as there is work.

The decode graphs are exported with static shapes. For each pair of batch size and cache length from a small \
ladder of buckets there is one graph, and a step uses the smallest bucket that fits the running sequences. On a \
CPU a graph with static shapes ran two to three times faster than the same graph with dynamic dimensions. All \
graphs take the weights as inputs instead of holding them, so one copy of the weights in memory serves every \
graph.

Streaming is what makes a large language model feel fast. The decode model is decoupled, which means it may send \
any number of responses for one request. It sends one response for every generated token, as soon as the token \
exists, and a final empty response that marks the end of the stream. Over gRPC the client opens a bidirectional \
stream. Over HTTP the generate_stream endpoint answers with server sent events, one event per token.

Detokenization must never break the text. A token may end in the middle of a Chinese character or an emoji, whose \
bytes are spread over several tokens, and sentencepiece marks spaces with a special symbol that belongs to the \
following word. The front model decodes a short window of the latest token ids twice, with and without the \
newest token, and sends the difference. It holds back a trailing replacement character until the bytes of the \
character are complete. The pieces of a stream therefore join to exactly the text of the whole output.

Sampling is done per request. Each request may set its own temperature, top k, top p, repetition and presence \
penalties, a minimum number of tokens and a random seed. With a temperature of zero the sampler is greedy and \
always takes the most likely token. The same sampling code runs in the sampler model for the first token and \
inside the decode model for every later token, so a request gets the same behaviour at every step.

Some clients cannot read a stream. The KServe v2 infer endpoint of Triton refuses a decoupled model, and the \
generate endpoint needs exactly one response. For them there is a unary model next to the ensemble. It is a \
Python model that is not decoupled: it calls the ensemble through business logic scripting, collects every \
streamed piece, joins the text, and answers once.

The converter reads a checkpoint folder with a config.json file, a tokenizer.model file and the weights, either \
as safetensors files in the naming of Hugging Face or as one MindSpore checkpoint. It checks every shape against \
the config, fuses the query, key and value projections into one matrix, exports the prefill and decode graphs to \
MindIR, and writes the folders of all models into the model repository. It builds everything in a staging \
folder first and moves the finished folders into place with renames, so a failed run leaves the repository as \
it was.

The demo model is a tiny LLaMA that this project trains itself with MindSpore on a CPU in a few minutes. Its \
training text is this description of the project together with the documentation of the package. The model \
is far too small to understand language, but it learns its training text by heart. Given the first words of a \
sentence from the text, it continues with the words that follow them there, and that is how the tests know that \
training, conversion and serving all work.

The device is chosen by the model config. In production the graphs run on Ascend, here they run on the CPU, and \
a GPU is possible. Nothing above the engine knows which device is used. Benchmarks report time to first token, \
the latency between tokens and the throughput in tokens per second, measured against the real server with \
several clients at the same time.
"""


def _normalize(block: str) -> str:
    """One paragraph as a single line: the lines joined, runs of whitespace made one space."""
    return " ".join(block.split())


def text_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs of plain text, each as one line."""
    return [p for p in (_normalize(b) for b in re.split(r"\n\s*\n", text)) if p]


def markdown_paragraphs(text: str) -> list[str]:
    """Paragraphs of a Markdown file without its fenced code blocks and tables (rows of cells are data, not
    sentences to continue, and their rulers tokenize into long runs of one piece); heading marks are dropped."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            kept.append("")
            continue
        if fenced:
            continue
        stripped = line.lstrip()
        if stripped.startswith("|"):
            kept.append("")
        elif stripped.startswith("#"):  # a heading is a paragraph of its own
            kept.extend(["", stripped.lstrip("#").strip(), ""])
        else:
            kept.append(line)
    return text_paragraphs("\n".join(kept))


def module_docstrings(root: Path) -> list[tuple[str, str]]:
    """(dotted module name, docstring) of every module of the package that has one, in sorted path order."""
    found = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # a file being edited: leave it out rather than fail
            continue
        doc = ast.get_docstring(tree)
        if doc:
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join(parts), doc))
    return found


def _first_words(paragraphs: list[str], limit: int) -> list[str]:
    """The paragraphs before the first one that would take the word count past `limit`."""
    kept, words = [], 0
    for paragraph in paragraphs:
        words += len(paragraph.split())
        if words > limit:
            break
        kept.append(paragraph)
    return kept


def corpus_paragraphs(root: str | Path | None = None, max_words: int = MAX_WORDS) -> list[str]:
    """The fixed text, then the README (up to README_WORDS), then the module docstrings (each after a heading
    sentence), cut before the first paragraph that would take the corpus past `max_words`."""
    root = Path(root) if root is not None else REPO_ROOT
    paragraphs = text_paragraphs(PROJECT_TEXT)
    readme = root / "README.md"
    if readme.exists():
        paragraphs += _first_words(markdown_paragraphs(readme.read_text(encoding="utf-8")), README_WORDS)
    for module, doc in module_docstrings(root):
        paragraphs.append(f"The module {module} is documented as follows.")
        paragraphs += text_paragraphs(doc)
    kept = _first_words(paragraphs, max_words)
    if kept and kept[-1].startswith("The module ") and kept[-1].endswith(" is documented as follows."):
        kept.pop()  # a heading whose text was cut
    return kept


def build_corpus(root: str | Path | None = None, max_words: int = MAX_WORDS) -> str:
    """The whole training text: paragraphs separated by blank lines, ending with a newline."""
    return "\n\n".join(corpus_paragraphs(root, max_words)) + "\n"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])")


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences. Splitting only at whitespace keeps every word whole: joining the sentences'
    words gives the paragraph's words."""
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def corpus_sentences(corpus: str) -> list[str]:
    """Every sentence of a corpus, in order (paragraph boundaries are not marked)."""
    return [s for p in text_paragraphs(corpus) for s in split_sentences(p)]
