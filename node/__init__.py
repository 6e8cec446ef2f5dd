"""The expert-hosting node: gRPC service, request batching, DHT announcing, checkpoints."""

import moeswarm.protocol  # noqa: F401  (sets hivemind's sharing strategy before hivemind loads)
