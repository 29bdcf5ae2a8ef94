"""Random-weight Qwen checkpoints built locally, in the published tensor layout, for tests and the demo."""
