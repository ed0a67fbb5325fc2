#!/usr/bin/env bash
# MindSpore Serving's request bodies, as its clients send them, against the frontend (make run: port 9000).
#   bash client_examples/mindspore_serving.sh "Triton is an inference server." [MAX_NEW_TOKENS] [MODEL]
# 1. the whole answer: POST /models/MODEL/generate -> {"generated_text": ...}
# 2. streamed, SSE (return_protocol "sse", the default): one event per token, then the whole text
# 3. the batch size the server runs now: GET /serving/get_bs
set -euo pipefail
prompt=${1:?usage: mindspore_serving.sh PROMPT [MAX_NEW_TOKENS] [MODEL]}
max_new_tokens=${2:-16}
model=${3:-demo}
url=${MSTRITON_FRONTEND:-http://localhost:9000}
auth=()
[ -n "${MSTRITON_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $MSTRITON_API_KEY")
body=$(python3 -c 'import json, sys; print(json.dumps({"inputs": sys.argv[1], "parameters": {
    "max_new_tokens": int(sys.argv[2]), "return_full_text": True}}))' "$prompt" "$max_new_tokens")
curl -sS --fail-with-body "${auth[@]}" "$url/models/$model/generate" -d "$body"
curl -sS -N --fail-with-body "${auth[@]}" "$url/models/$model/generate_stream" -d "$body"
curl -sS --fail-with-body "${auth[@]}" "$url/serving/get_bs"
