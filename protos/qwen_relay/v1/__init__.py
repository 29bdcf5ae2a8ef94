"""Generated gRPC stubs for the qwen_relay.v1 API (regenerate with `make protos`)."""
