"""The wire: protobuf schema, tensor codec, DHT record schema, model spec and error table."""

import os

# hivemind's default torch sharing strategy ("file_system") starts a torch_shm_manager process the
# first time it shares a tensor; file descriptors need no extra process. Set before hivemind loads.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
