"""Prompts: the prompt and chat templates and document fitting (templates), what `generate` accepts as
prompts, encoded into one batch (encoding), and the JSONL documents the commands read (documents).

May import every floor below it (calm.errors up to calm.checkpoints); never the model facade."""
