"""The expert-hosting node: gRPC service, request batching, DHT announcing, checkpoints."""
