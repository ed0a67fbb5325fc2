"""The OpenAI Python SDK against mstriton's HTTP frontend (`make run` serves it on port 9000).

    .venv/bin/python client_examples/openai_client.py "Triton is an inference server."
    .venv/bin/python client_examples/openai_client.py --chat --model smollm2 "What is the capital of France?"

Streams the completion (or, with --chat, the chat answer through the model's chat template) to stdout, then
prints the usage counts to stderr. --no-stream asks for one response; --logprobs N adds each token's
log-probability and its N best alternatives.
"""

from __future__ import annotations

import argparse
import os
import sys

import openai


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default=os.environ.get("MSTRITON_FRONTEND", "http://localhost:9000"))
    parser.add_argument("--api-key", default=os.environ.get("MSTRITON_API_KEY", "none"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--chat", action="store_true", help="a chat message instead of a completion prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None)
    parser.add_argument("--logprobs", type=int, default=None)
    parser.add_argument("--no-stream", action="store_true")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
    settings = dict(model=args.model, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                    stop=args.stop)
    settings = {k: v for k, v in settings.items() if v is not None}
    if args.chat:
        settings["messages"] = [{"role": "user", "content": args.prompt}]
        if args.logprobs is not None:
            settings.update(logprobs=True, top_logprobs=args.logprobs)
        create = client.chat.completions.create
    else:
        settings["prompt"] = args.prompt
        if args.logprobs is not None:
            settings["logprobs"] = args.logprobs
        create = client.completions.create

    if args.no_stream:
        reply = create(**settings)
        choice = reply.choices[0]
        print(choice.message.content if args.chat else choice.text)
        if args.logprobs is not None:
            print_logprobs(choice, args.chat)
        usage, reason = reply.usage, choice.finish_reason
    else:
        usage = reason = None
        for chunk in create(stream=True, stream_options={"include_usage": True}, **settings):
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                text = (choice.delta.content if args.chat else choice.text) or ""
                sys.stdout.write(text)
                sys.stdout.flush()
                reason = choice.finish_reason or reason
        print()
    print(f"[finish reason: {reason}, prompt tokens: {usage.prompt_tokens}, completion tokens: "
          f"{usage.completion_tokens}]", file=sys.stderr)
    return 0


def print_logprobs(choice, chat: bool) -> None:
    if chat:
        for token in choice.logprobs.content:
            alternatives = ", ".join(f"{a.token!r} {a.logprob:.3f}" for a in token.top_logprobs)
            print(f"  {token.token!r} {token.logprob:.3f}   [{alternatives}]")
    else:
        lp = choice.logprobs
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            alternatives = ", ".join(f"{t!r} {v:.3f}" for t, v in top.items())
            print(f"  {token!r} {logprob:.3f}   [{alternatives}]")


if __name__ == "__main__":
    sys.exit(main())
