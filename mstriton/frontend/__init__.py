"""The HTTP frontend: OpenAI's API, MindSpore Serving's REST API and TGI's, in front of tritonserver.

A process of its own beside tritonserver (`python -m mstriton.frontend --triton-grpc HOST:8001`), since
tritonserver's HTTP server has no custom routes and no in-process Python API installs here. Every door is an
adapter: it reads its protocol's body into a `generation.Generation` and writes the chunks of the one shared
request path (`generation.py`, which streams over gRPC from the front model, `triton.py`) in its protocol's
format.
"""
