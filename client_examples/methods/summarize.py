"""An example method (docs/methods.md): summarize a text in one sentence of at most `max_words` words.

Registered at conversion and served as the models NAME_summarize (streamed) and NAME_summarize_unary (one
response), beside the LLM NAME; `make smollm2` registers it for SmolLM2:

    python tools/convert.py --checkpoint ... --name smollm2 --model-repository model_repository \\
        --method summarize=client_examples/methods/summarize.py

and client_examples/method_client.py calls it. The client names the model and the method (`smollm2_summarize`)
and sends the text to summarize as `text_input` (or as a chat whose last user message is the text), plus a field
of this method's own, `max_words` (default 30): as a request parameter, or inside the JSON object `method_fields`,
or, through the HTTP frontend's OpenAI doors, as a field of the body. The request to generate is a chat, so the
model needs a chat template (its own, or the converter's --template); the client's settings (max_tokens,
temperature, ...) pass through, and max_tokens defaults to 2 * max_words + 8.

The contract every method file keeps:

preprocess(request: dict) -> dict
    `request` holds the client's fields by name: the inputs it sent (`text_input` a str, `messages` a list of
    {"role", "content"} dicts, numbers as numbers, lists as lists), its request parameters, and the fields of the
    JSON object `method_fields` (an input tensor wins over a `method_fields` field, which wins over a request
    parameter, of the same name). It returns the request to generate: exactly one of `text_input` (a prompt) and
    `messages` (a chat, rendered by the model's chat template), and any settings of docs/inputs.md
    (`max_tokens`, `temperature`, `stop_words`, ...). Other keys are ignored, so returning the request with the
    prompt replaced is fine. `stream` and `stop` stay the client's.
postprocess(text: str, request: dict) -> dict
    `text` is the whole generated text; `request` the same fields preprocess was given (the client's, not what
    preprocess returned). It returns the response's fields: a `text_output` (a str) replaces the text of a response
    that is not streamed (a streamed one has sent its pieces already), and the whole dict, which must be
    JSON-serializable, goes back as the JSON object `method_output` with the last response.

Both run in the method's front model, one call at a time. A ValueError they raise refuses that request (HTTP 400,
"method summarize: preprocess raised ValueError: ..."); any other error, or a return value that is not a dict, is
that request's internal error (HTTP 500). Other requests carry on.
"""

DEFAULT_WORDS = 30
MAX_WORDS = 200
SYSTEM = "You are a helpful assistant that writes short summaries."


def _max_words(request: dict) -> int:
    value = request.get("max_words", DEFAULT_WORDS)
    if isinstance(value, str) and value.strip().isdigit():  # a request parameter sent as text
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORDS:
        raise ValueError(f"max_words must be an integer in [1, {MAX_WORDS}], got {value!r}")
    return value


def _document(request: dict) -> str:
    text = request.get("text_input")
    if text is None and request.get("messages"):
        users = [m["content"] for m in request["messages"] if m["role"] == "user"]
        text = users[-1] if users else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError("send the text to summarize as text_input, or as a chat's last user message")
    return " ".join(text.split())


def preprocess(request: dict) -> dict:
    words = _max_words(request)
    ask = f"Summarize this text in one sentence of at most {words} words:\n\n{_document(request)}"
    generate = {key: value for key, value in request.items() if key not in ("text_input", "messages")}
    generate["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]
    generate.setdefault("max_tokens", 2 * words + 8)  # words are a token or two each
    return generate


def postprocess(text: str, request: dict) -> dict:
    limit = _max_words(request)
    words = text.split()
    summary = " ".join(words[:limit])
    return {"text_output": summary, "summary_words": len(words[:limit]), "truncated": len(words) > limit}
