"""huggingface_hub's InferenceClient against the frontend's TGI routes (/generate, /generate_stream).

    .venv/bin/python client_examples/tgi_client.py "Triton is an inference server."

Prints the streamed tokens as they come, then the details TGI reports (finish reason, tokens generated).
The TGI routes serve the frontend's default model: --default-model, else the first LLM the server serves.
"""

from __future__ import annotations

import argparse
import os
import sys

from huggingface_hub import InferenceClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default=os.environ.get("MSTRITON_FRONTEND", "http://localhost:9000"))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    client = InferenceClient(base_url=args.url, api_key=os.environ.get("MSTRITON_API_KEY"))
    last = None
    for event in client.text_generation(args.prompt, max_new_tokens=args.max_new_tokens, stream=True, details=True):
        if not event.token.special:
            sys.stdout.write(event.token.text)
            sys.stdout.flush()
        last = event
    print()
    print(f"[finish reason: {last.details.finish_reason}, generated tokens: {last.details.generated_tokens}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
