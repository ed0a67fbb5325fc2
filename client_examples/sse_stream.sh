#!/usr/bin/env bash
# Stream a completion from the decoupled model over HTTP: POST /v2/models/MODEL/generate_stream answers with
# Server-Sent Events, one "data: {json}" line per generated token; the last one has a non-empty finish_reason.
#
#   bash client_examples/sse_stream.sh ["prompt"] [max_tokens]
#   TRITON_HTTP=host:8000 MODEL=demo bash client_examples/sse_stream.sh "Triton is an inference server." 24
#
# curl -N turns off curl's output buffering, so each event is printed when it arrives.
set -euo pipefail

HOST="${TRITON_HTTP:-localhost:8000}"
MODEL="${MODEL:-demo}"
PROMPT="${1:-Triton is an inference server.}"
MAX_TOKENS="${2:-16}"

# JSON-escape the prompt: backslash, double quote, newline, carriage return, tab.
json_prompt="${PROMPT//\\/\\\\}"
json_prompt="${json_prompt//\"/\\\"}"
json_prompt="${json_prompt//$'\n'/\\n}"
json_prompt="${json_prompt//$'\r'/\\r}"
json_prompt="${json_prompt//$'\t'/\\t}"

curl -sS -N --fail-with-body -X POST "http://${HOST}/v2/models/${MODEL}/generate_stream" \
  -H 'Content-Type: application/json' \
  -d "{\"text_input\": \"${json_prompt}\", \"max_tokens\": ${MAX_TOKENS}, \"stream\": true}"
