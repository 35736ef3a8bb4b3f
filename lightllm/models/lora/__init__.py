"""LoRA adapters served beside the base weights: reading PEFT folders (adapter.py) and the per-step
low-rank products of a batch whose rows use different adapters (batch.py)."""
