"""The demo model: a small LLaMA trained with MindSpore on the project's own documentation, so that serving can be
shown and tested end to end without downloading anything."""
