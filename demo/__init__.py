"""`qwen-relay demo`: train a LoRA adapter, serve base and adapter in slices, show one conversation."""
