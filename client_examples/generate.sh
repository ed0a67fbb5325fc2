#!/usr/bin/env bash
# One whole completion from the non-decoupled model over HTTP: POST /v2/models/MODEL/generate answers with one
# JSON object (text_output, finish_reason, num_input_tokens, num_output_tokens, output_log_probs, ...).
#
#   bash client_examples/generate.sh ["prompt"] [max_tokens]
#   TRITON_HTTP=host:8000 MODEL=demo_unary bash client_examples/generate.sh "Triton is an inference server." 24
set -euo pipefail

HOST="${TRITON_HTTP:-localhost:8000}"
MODEL="${MODEL:-demo_unary}"
PROMPT="${1:-Triton is an inference server.}"
MAX_TOKENS="${2:-16}"

# JSON-escape the prompt: backslash, double quote, newline, carriage return, tab.
json_prompt="${PROMPT//\\/\\\\}"
json_prompt="${json_prompt//\"/\\\"}"
json_prompt="${json_prompt//$'\n'/\\n}"
json_prompt="${json_prompt//$'\r'/\\r}"
json_prompt="${json_prompt//$'\t'/\\t}"

curl -sS --fail-with-body -X POST "http://${HOST}/v2/models/${MODEL}/generate" \
  -H 'Content-Type: application/json' \
  -d "{\"text_input\": \"${json_prompt}\", \"max_tokens\": ${MAX_TOKENS}}"
echo
