"""The benchmarks, the soak and the harness they share (bench/harness: start a server, stream a request, sample a
process, run a closed loop). Not part of the mstriton package: the wheel does not ship it. tools/ holds the thin
entry points (`make bench`, `make soak`, ...); tests and tools import it from the repository root."""
