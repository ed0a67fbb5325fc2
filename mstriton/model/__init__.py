"""The MindSpore LLaMA network and its weights."""
