"""Distributed LoRA fine-tuning with Ray Train."""
