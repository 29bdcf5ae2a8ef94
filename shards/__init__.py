"""Layer slices of a Qwen2 decoder: weight loading, KV cache, forward, and the Ray actor that hosts one."""
