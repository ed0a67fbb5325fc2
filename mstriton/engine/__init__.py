"""The serving engine: MindIR graphs, the KV-cache pool and the batched prefill/decode loop."""
