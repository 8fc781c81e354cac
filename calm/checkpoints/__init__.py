"""Checkpoints: resolving and loading backbones (loading), calm checkpoint files (checkpoint), LoRA
adapters of the backbone (lora), and device and dtype names (devices).

May import every floor below it (calm.errors up to calm.speculative); never the model facade."""
