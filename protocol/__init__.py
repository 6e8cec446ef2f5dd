"""The wire: protobuf schema, tensor codec, DHT record schema, model spec and error table."""
