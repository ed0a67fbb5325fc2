"""Train the demo model with MindSpore and save it as a Hugging Face LLaMA folder.

The model is a small LLaMA (``DEMO_ARCHITECTURE``) trained from scratch on the CPU until it knows its corpus
(``corpus.py``) by heart: greedy continuation of the first words of any sentence of the corpus gives back the words
that follow them. That makes the whole path - training, export, conversion, serving - checkable by eye and by test.

Training examples are windows of the corpus's token stream that start at a sentence, with a BOS token in front:
exactly the form of a prompt that the tokenizer model sends (BOS, then the sentence's first words). The network is
``model.llama.LlamaLM``, the same math as the served graphs, compiled in graph mode (about three times faster per
step than PyNative on a 2-core CPU).

The folder written holds config.json, model.safetensors (Hugging Face names, [out, in] matrices), tokenizer.model,
tokenizer_config.json, corpus.txt (the training text) and training.json (settings and results). It is built
beside the destination and renamed into place, so a reader never sees half a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import LlamaConfig
from .corpus import build_corpus, corpus_sentences

DEMO_ARCHITECTURE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False)
VOCAB_SIZE = 1500


@dataclasses.dataclass
class TrainSettings:
    steps: int | None = None     # None: `epochs` passes over the rows (one row per sentence of the corpus)
    epochs: float = 20.0
    batch_size: int = 16
    window: int = 96             # the model's input length: BOS, then a sentence and what follows it
    learning_rate: float = 2e-3  # peak; linear warm-up over a tenth of the steps, then cosine decay to a tenth
    clip_norm: float = 1.0
    seed: int = 0
    vocab_size: int = VOCAB_SIZE

    def steps_for(self, n_rows: int) -> int:
        return self.steps if self.steps is not None else math.ceil(self.epochs * n_rows / self.batch_size)


# ---- tokenizer ----------------------------------------------------------------------------------------------

def train_tokenizer(sentences: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """A sentencepiece BPE model of the sentences, returned as the bytes of tokenizer.model.

    byte_fallback spells any character outside the vocabulary as its UTF-8 bytes, and the identity normalization
    with extra whitespace kept makes decode(encode(text)) == text for any text (Chinese, emoji, runs of spaces,
    newlines). Ids follow LLaMA: unk 0, bos 1, eos 2, no pad.
    """
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    return buffer.getvalue()


def encode_corpus(sp, sentences: list[str]) -> tuple[np.ndarray, list[int]]:
    """The token stream of the corpus and the index in it where each sentence starts.

    Sentences are encoded one by one; since sentencepiece never merges across a space, this is the same stream
    as encoding the text at once, and a prompt made of a sentence's first words encodes to a prefix of it.
    """
    stream, starts = [], []
    for sentence in sentences:
        starts.append(len(stream))
        stream.extend(sp.encode(sentence))
    return np.asarray(stream, np.int32), starts


def training_rows(stream: np.ndarray, starts: list[int], window: int, bos_id: int) -> np.ndarray:
    """One row [BOS, tokens...] of window + 1 ids per sentence start (inputs row[:-1], targets row[1:]).
    The stream wraps around at the end, so the last sentences get full rows too."""
    cyclic = np.concatenate([stream] * (1 + math.ceil(window / len(stream))))
    rows = np.empty((len(starts), window + 1), np.int32)
    rows[:, 0] = bos_id
    for i, start in enumerate(starts):
        rows[i, 1:] = cyclic[start:start + window]
    return rows


# ---- weights ------------------------------------------------------------------------------------------------

def initial_weights(config: LlamaConfig, seed: int) -> dict[str, np.ndarray]:
    """GPT-2 style: normal(0, 0.02); projections into the residual stream scaled by 1/sqrt(2 * layers); norms 1."""
    from ..model.llama import weight_shapes

    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)
    weights = {}
    for name, shape in weight_shapes(config).items():
        if len(shape) == 1:
            weights[name] = np.ones(shape, np.float32)
        else:
            std = residual_std if name.endswith((".wo", ".w_down")) else 0.02
            weights[name] = rng.normal(0.0, std, shape).astype(np.float32)
    return weights


def to_hf_tensors(config: LlamaConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Network layout ([in, out], fused q|k|v and gate|up) -> Hugging Face names and [out, in] matrices.
    The inverse of ``model.weights.to_network_layout``."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    ffn = config.intermediate_size
    out = {"model.embed_tokens.weight": weights["embed_tokens"], "model.norm.weight": weights["norm"]}
    for i in range(config.num_hidden_layers):
        w = {k: weights[f"layers.{i}.{k}"] for k in ("attention_norm", "wqkv", "wo", "ffn_norm", "w_gate_up",
                                                    "w_down")}
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = w["wqkv"][:, :q].T
        out[p + "self_attn.k_proj.weight"] = w["wqkv"][:, q:q + kv].T
        out[p + "self_attn.v_proj.weight"] = w["wqkv"][:, q + kv:q + 2 * kv].T
        out[p + "self_attn.o_proj.weight"] = w["wo"].T
        out[p + "mlp.gate_proj.weight"] = w["w_gate_up"][:, :ffn].T
        out[p + "mlp.up_proj.weight"] = w["w_gate_up"][:, ffn:].T
        out[p + "mlp.down_proj.weight"] = w["w_down"].T
        out[p + "input_layernorm.weight"] = w["attention_norm"]
        out[p + "post_attention_layernorm.weight"] = w["ffn_norm"]
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = weights["lm_head"].T
    return {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in out.items()}


# ---- training -----------------------------------------------------------------------------------------------

def learning_rates(peak: float, steps: int) -> list[float]:
    warmup = max(1, steps // 10)
    rates = []
    for step in range(steps):
        if step < warmup:
            rates.append(peak * (step + 1) / warmup)
        else:
            done = (step - warmup) / max(1, steps - warmup)
            rates.append(peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * done))))
    return rates


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def train(config: LlamaConfig, rows: np.ndarray, settings: TrainSettings,
          progress: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], dict]:
    """Train from fresh weights on `rows` ([N, window + 1] token ids). Returns the weights in the network's
    layout and a summary (losses, next-token accuracy on every row, time)."""
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    from ..model.llama import LlamaLM, weight_names

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.set_seed(settings.seed)

    names = weight_names(config)  # the order of net.weights (MindSpore later prefixes the parameter names)
    net = LlamaLM(config)
    initial = initial_weights(config, settings.seed)
    for param, name in zip(net.weights, names):
        assert param.name == name, (param.name, name)
        param.set_data(Tensor(initial[name]))

    class Loss(nn.Cell):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def construct(self, inputs, targets):
            # Position 0 (BOS -> a sentence's first token) is left out: nothing tells the sentences apart there.
            logits = self.lm(inputs)[:, 1:]
            return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))

    class TrainStep(nn.Cell):
        """Loss, gradients, gradient clipping by global norm and the optimizer update, as one graph."""

        def __init__(self, loss, optimizer, clip_norm):
            super().__init__(auto_prefix=False)
            self.loss, self.optimizer, self.clip_norm = loss, optimizer, clip_norm
            self.params = optimizer.parameters
            self.grad = ops.GradOperation(get_by_list=True)

        def construct(self, inputs, targets):
            loss = self.loss(inputs, targets)
            grads = self.grad(self.loss, self.params)(inputs, targets)
            grads = ops.clip_by_global_norm(grads, self.clip_norm)
            self.optimizer(grads)
            return loss

    steps = settings.steps_for(len(rows))
    # No weight decay: the goal is to memorize the corpus, not to generalize from it.
    optimizer = nn.AdamWeightDecay(net.trainable_params(),
                                   learning_rate=learning_rates(settings.learning_rate, steps),
                                   beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.0)
    step_fn = TrainStep(Loss(net), optimizer, settings.clip_norm)
    step_fn.set_train()

    rng = np.random.default_rng(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.monotonic()
    first_step_done = None
    report_every = max(1, steps // 12)
    progress(f"training {sum(v.size for v in net.weights) / 1e6:.2f}M parameters on {len(rows)} rows of "
             f"{settings.window} tokens: {steps} steps of batch {settings.batch_size} "
             f"(the first step compiles the graph)")
    for step in range(steps):
        if len(order) < settings.batch_size:  # a new shuffled pass over the rows
            order += rng.permutation(len(rows)).tolist()
        batch = rows[order[:settings.batch_size]]
        del order[:settings.batch_size]
        loss = float(step_fn(Tensor(batch[:, :-1]), Tensor(batch[:, 1:])).asnumpy())
        if not math.isfinite(loss):
            raise RuntimeError(f"training diverged: loss {loss} at step {step + 1}")
        losses.append(loss)
        now = time.monotonic()
        if first_step_done is None:
            first_step_done = now
        done = step + 1
        if done == 1 or done % report_every == 0 or done == steps:
            # Time left from the pace of the steps after the first (which includes compiling).
            pace = (now - first_step_done) / (done - 1) if done > 1 else None
            left = f"about {_duration(pace * (steps - done))} left" if pace else "estimating time left"
            recent = losses[-report_every:]
            progress(f"step {done}/{steps}: loss {loss:.3f} (mean of last {len(recent)}: "
                     f"{sum(recent) / len(recent):.3f}), {_duration(now - started)} elapsed, {left}")
    train_seconds = time.monotonic() - started

    # How well the corpus is known: next-token accuracy and loss over every row, teacher forced (position 0
    # left out, as in training).
    net.set_train(False)
    correct, total, loss_sum = 0, 0, 0.0
    for begin in range(0, len(rows), settings.batch_size):
        batch = rows[begin:begin + settings.batch_size]
        if len(batch) < settings.batch_size:  # keep one static shape: pad with rows already seen
            batch = np.concatenate([batch, rows[:settings.batch_size - len(batch)]])
        n = min(settings.batch_size, len(rows) - begin)
        logits = net(Tensor(batch[:, :-1])).asnumpy()[:n, 1:]
        targets = batch[:n, 2:]
        correct += int((logits.argmax(-1) == targets).sum())
        total += targets.size
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        loss_sum += float(-np.take_along_axis(log_probs, targets[..., None], -1).sum())
    summary = {"steps": steps, "final_loss": losses[-1],
               "mean_loss_last_steps": float(np.mean(losses[-report_every:])),
               "eval_loss": loss_sum / total, "eval_token_accuracy": correct / total,
               "train_seconds": round(train_seconds, 1), "losses": [round(x, 4) for x in losses]}
    weights = {name: p.asnumpy().astype(np.float32) for name, p in zip(names, net.weights)}
    return weights, summary


# ---- the folder ---------------------------------------------------------------------------------------------

def write_hf_folder(folder: Path, config: LlamaConfig, weights: dict[str, np.ndarray], tokenizer_model: bytes,
                    corpus: str, training: dict) -> None:
    from safetensors.numpy import save_file

    from ..sources import sentencepiece_tokenizer_config

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    save_file(to_hf_tensors(config, weights), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    (folder / "tokenizer_config.json").write_text(json.dumps(sentencepiece_tokenizer_config(), indent=2) + "\n")
    (folder / "corpus.txt").write_text(corpus, encoding="utf-8")
    (folder / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    for file in folder.iterdir():  # safetensors writes its file private; the model is for every reader
        file.chmod(0o644)


def replace_folder(built: Path, destination: Path) -> None:
    """Move `built` to `destination`, replacing any previous folder there (two renames)."""
    old = None
    if destination.exists():
        old = destination.with_name(f"{destination.name}.old-{os.getpid()}")
        destination.rename(old)
    try:
        built.rename(destination)
    except OSError:
        if old is not None:
            old.rename(destination)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def corpus_digest(corpus: str) -> str:
    return hashlib.sha256(corpus.encode("utf-8")).hexdigest()


def is_current(folder: str | Path, settings: TrainSettings | None = None, root: str | Path | None = None) -> bool:
    """Whether `folder` holds a complete demo model trained with `settings` on the corpus of the repository as it
    is now (a docstring edited since changes the corpus, and the model no longer knows it)."""
    folder = Path(folder)
    needed = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "corpus.txt",
              "training.json")
    if not all((folder / name).is_file() for name in needed):
        return False
    try:
        recorded = json.loads((folder / "training.json").read_text())["settings"]
    except (ValueError, KeyError, TypeError):
        return False
    return (recorded == dataclasses.asdict(settings or TrainSettings())
            and (folder / "corpus.txt").read_text(encoding="utf-8") == build_corpus(root))


def build_demo_model(out: str | Path, settings: TrainSettings | None = None, root: str | Path | None = None,
                     progress: Callable[[str], None] = print) -> dict:
    """Build the corpus and tokenizer, train, and write the Hugging Face folder `out`. Returns training.json."""
    import sentencepiece as spm

    settings = settings or TrainSettings()
    out = Path(out).resolve()
    started = time.monotonic()
    corpus = build_corpus(root)
    sentences = corpus_sentences(corpus)
    progress(f"corpus: {len(corpus.split())} words in {len(sentences)} sentences")
    tokenizer_model = train_tokenizer(sentences, settings.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    stream, starts = encode_corpus(sp, sentences)
    progress(f"tokenizer: {sp.get_piece_size()} pieces (BPE, byte fallback); corpus is {len(stream)} tokens")
    config = LlamaConfig(vocab_size=sp.get_piece_size(), bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
                         pad_token_id=None, **DEMO_ARCHITECTURE)
    rows = training_rows(stream, starts, settings.window, sp.bos_id())
    weights, summary = train(config, rows, settings, progress)
    training = {"settings": dataclasses.asdict(settings), "corpus_sha256": corpus_digest(corpus),
                "corpus_tokens": int(len(stream)), "sentences": len(sentences), **summary}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model folder is for everyone who may read `out`
    try:
        write_hf_folder(staging, config, weights, tokenizer_model, corpus, training)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"wrote {out} in {_duration(time.monotonic() - started)}: final loss {summary['final_loss']:.4f}, "
             f"next-token accuracy on the corpus {100 * summary['eval_token_accuracy']:.2f}%")
    return training
