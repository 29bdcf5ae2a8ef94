"""The gRPC gateway: servicer, engine (sequences, scheduler) and the pipeline that drives the slices."""
