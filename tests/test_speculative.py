"""Speculative decoding by n-gram lookup in the decode loop, without a server (a tiny converted model on the CPU
kernels): drafted tokens are verified as extra rows of a decode step, and the output is the one the request gets
without speculation, token for token, greedy or sampled with a seed, with stop words, max_tokens and
log-probabilities; rejected drafts give their blocks back; the float32 MindSpore path is refused."""

from __future__ import annotations

import pytest

from mstriton.engine.engine import Engine
from mstriton.engine.graphs import EngineGraphs
from mstriton.params import GenerationParams
from mstriton.serving.scheduler import DecodeRequest, Scheduler
from mstriton.serving.speculation import Speculation

# Repetitive prompts (drafts found at once) and plain ones; a random model's greedy output loops, so drafts from
# its own output are accepted too.
PROMPTS = [[1, 5, 9, 22, 7] * 6, [1, 40, 3], [1] + list(range(10, 30)) * 2, [1, 17, 4, 17, 4, 17], [1, 8, 8, 8]]


@pytest.fixture(scope="module", params=["int8", "bfloat16"])
def graphs(request, hf_checkpoint_factory, tmp_path_factory):
    from mstriton.convert import convert

    repo = tmp_path_factory.mktemp(f"repo-spec-{request.param}")
    convert(hf_checkpoint_factory("mha"), "tiny", repo, max_batch_size=8, max_seq_len=256, weights=request.param,
            progress=lambda _: None)
    return EngineGraphs(repo / "tiny_decode/1/engine")


def run(graphs, requests: list[dict], speculation: Speculation | None, slots: int = 4):
    """Every request through one scheduler until all end: (events by key, the scheduler)."""
    scheduler = Scheduler(Engine(graphs, max_slots=slots), max_waiting=16, speculation=speculation)
    events: dict[str, list] = {}
    for i, settings in enumerate(requests):
        settings = dict(settings)
        prompt = settings.pop("prompt")
        scheduler.submit(DecodeRequest(key=f"r{i}", prompt_ids=list(prompt), params=GenerationParams(**settings),
                                       emit=events.setdefault(f"r{i}", []).append,
                                       stop_words=[[17, 4]] if i == 3 else []))
    for _ in range(2000):
        if not scheduler.running and not scheduler.waiting:
            return events, scheduler
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


def outputs(events):
    return {key: ([e.token for e in got if e.token >= 0], [round(e.logprob, 6) for e in got if e.token >= 0],
                  got[-1].finish_reason) for key, got in events.items()}


@pytest.mark.parametrize("slots", [1, 4])
def test_greedy_output_is_the_same_token_for_token(graphs, slots):
    requests = [{"prompt": p, "max_tokens": n, "temperature": 0.0} for p, n in zip(PROMPTS, [40, 33, 60, 25, 50])]
    plain, _ = run(graphs, requests, None, slots)
    speculated, scheduler = run(graphs, requests, Speculation(tokens=4, max_rows=8), slots)
    assert outputs(speculated) == outputs(plain)
    assert scheduler.drafted_tokens > 0 and scheduler.accepted_tokens > 0, scheduler.stats()
    # rejected drafts gave their blocks back: nothing is held once every request ended
    assert scheduler.engine.blocks.usage().used == 0


def test_sampled_output_with_a_seed_is_the_same_token_for_token(graphs):
    requests = [{"prompt": p, "max_tokens": 40, "temperature": 0.7, "top_k": 5, "seed": 3 + i,
                 "repetition_penalty": 1.1} for i, p in enumerate(PROMPTS)]
    plain, _ = run(graphs, requests, None)
    speculated, scheduler = run(graphs, requests, Speculation(tokens=3, max_rows=8))
    assert outputs(speculated) == outputs(plain)
    assert scheduler.drafted_tokens > 0


def test_a_request_may_opt_out_and_a_big_batch_drafts_nothing(graphs):
    requests = [{"prompt": p, "max_tokens": 20, "temperature": 0.0, "speculative": False} for p in PROMPTS]
    _, scheduler = run(graphs, requests, Speculation())
    assert scheduler.drafted_tokens == 0
    # four sequences of one row each, and rows for at most 4: no room for a draft
    requests = [{"prompt": p, "max_tokens": 20, "temperature": 0.0} for p in PROMPTS[:4]]
    plain, _ = run(graphs, requests, None)
    speculated, scheduler = run(graphs, requests, Speculation(max_rows=4))
    assert outputs(speculated) == outputs(plain)
    assert scheduler.drafted_tokens <= 4 * 20  # only once requests end and rows free up


def test_the_float32_mindspore_path_cannot_verify_drafts(hf_checkpoint_factory, tmp_path):
    from mstriton.convert import convert

    convert(hf_checkpoint_factory("mha"), "tiny", tmp_path, max_batch_size=2, max_seq_len=64,
            progress=lambda _: None)
    engine = Engine(EngineGraphs(tmp_path / "tiny_decode/1/engine"))
    assert not engine.can_verify_drafts
    with pytest.raises(ValueError, match="CPU kernels"):
        Scheduler(engine, speculation=Speculation())
    with pytest.raises(ValueError, match="--speculative ngram needs"):
        convert(hf_checkpoint_factory("mha"), "tiny2", tmp_path, speculative="ngram", progress=lambda _: None)


def test_parameters_read_into_settings_and_bad_ones_name_themselves():
    values = {"speculative": "ngram", "num_speculative_tokens": "6"}
    spec = Speculation.from_parameters(lambda key, default: values.get(key, default))
    assert spec == Speculation(tokens=6, max_rows=12, ngram_max=4, ngram_min=2)
    assert Speculation.from_parameters(lambda key, default: default) is None  # off unless asked
    with pytest.raises(ValueError, match="'num_speculative_tokens' must be an integer >= 1"):
        Speculation.from_parameters(lambda key, default: {"speculative": "ngram",
                                                          "num_speculative_tokens": "0"}.get(key, default))
    with pytest.raises(ValueError, match="'speculative' must be 'off' or 'ngram'"):
        Speculation.from_parameters(lambda key, default: "eagle" if key == "speculative" else default)


GOLDEN = ["mha", "gqa-tied", "mqa-rope500k-odd-vocab", "llama3-rope-biases", "linear-rope-head-dim-24", "qwen2-tied"]


@pytest.mark.parametrize("key", GOLDEN)
def test_golden_configs_give_the_same_greedy_tokens_with_speculation(key, hf_checkpoint_factory, tmp_path):
    """The golden configs (tests/test_golden.py: biases, scaled rope, GQA/MQA, an odd head_dim, Qwen2) on the CPU
    kernels (bfloat16 weights, where drafts can be verified), with and without speculation."""
    from conftest import copy_test_hf_tokenizer, save_random_hf_qwen2
    from mstriton.convert import convert
    from test_golden import CONFIGS, QWEN2_CONFIGS

    if key in CONFIGS:
        folder = hf_checkpoint_factory(key, **CONFIGS[key])
    else:
        folder = save_random_hf_qwen2(tmp_path / "hf", **QWEN2_CONFIGS[key])
        copy_test_hf_tokenizer(folder)
    convert(folder, "tiny", tmp_path / "repo", max_batch_size=8, max_seq_len=128, weights="bfloat16",
            progress=lambda _: None)
    graphs = EngineGraphs(tmp_path / "repo" / "tiny_decode/1/engine")
    requests = [{"prompt": p, "max_tokens": 40, "temperature": 0.0} for p in PROMPTS]
    plain, _ = run(graphs, requests, None)
    speculated, scheduler = run(graphs, requests, Speculation())
    assert outputs(speculated) == outputs(plain)
    assert scheduler.accepted_tokens > 0


def test_smollm2_gives_the_same_greedy_tokens_with_speculation(smollm2_repository):
    """SmolLM2 as `make run` converts it (Q4_1 / Q8_0 blocks, int8 activations; 2 slots, so one draft a step),
    rewriting a text its prompt carries."""
    from mstriton.kernels import activations
    from mstriton.tokenizer import load_tokenizer

    before = activations.activations()
    activations.set_activations("int8")  # as the decode model serves it
    graphs = EngineGraphs(smollm2_repository / "smollm2_decode/1/engine")
    tokenizer = load_tokenizer(smollm2_repository / "smollm2_tokenizer/1")
    text = ("The decode model batches continuously over a paged KV cache with prefix caching. A decoupled front "
            "model in front of it sees cancels and detokenizes. ")
    prompt = tokenizer.encode_rendered(
        f"<|im_start|>user\nRepeat this text exactly: {text}<|im_end|>\n<|im_start|>assistant\n")
    requests = [{"prompt": prompt, "max_tokens": 48, "temperature": 0.0}]
    try:
        plain, _ = run(graphs, requests, None, slots=1)
        speculated, scheduler = run(graphs, requests, Speculation(tokens=1, max_rows=2), slots=1)
    finally:
        activations.set_activations(before)
    assert outputs(speculated) == outputs(plain)
    assert scheduler.accepted_tokens > 0, tokenizer.decode(outputs(plain)["r0"][0])


def test_a_grammar_request_drafts_too_and_keeps_to_its_grammar(graphs):
    """Each drafted row's token is chosen under the grammar's mask after the tokens accepted before it (the matcher
    takes only accepted tokens): a draft the grammar forbids is simply not the chosen token."""
    import re

    import llguidance

    from mstriton.engine.structured_output import GrammarCompiler, grammar_of
    from test_scheduler import _ByteVocabulary

    compiler = GrammarCompiler(lambda: llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()),
                                                              n_vocab=128))
    pattern = "(ab|abc){6,12}x"

    def outcome(speculation):
        scheduler = Scheduler(Engine(graphs, max_slots=2), speculation=speculation)
        events: dict[str, list] = {}
        for i, seed in enumerate((1, 2)):
            grammar = compiler.submit(grammar_of({"regex": pattern}))
            grammar.result()  # compiled before the steps run
            scheduler.submit(DecodeRequest(
                key=f"g{i}", prompt_ids=[1, 97, 98, 97, 98, 97, 98], emit=events.setdefault(f"g{i}", []).append,
                params=GenerationParams(max_tokens=40, temperature=0.8, seed=seed), end_ids=(0,), grammar=grammar))
        for _ in range(500):
            if not scheduler.running and not scheduler.waiting:
                break
            scheduler.step()
        return outputs(events), scheduler

    plain, _ = outcome(None)
    speculated, scheduler = outcome(Speculation())
    compiler.close()
    assert speculated == plain
    for tokens, _, reason in plain.values():
        assert re.fullmatch(pattern + "\x00", bytes(tokens).decode()) and reason == "end_id"
    assert scheduler.accepted_tokens > 0
