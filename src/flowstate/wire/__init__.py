"""Wire formats of the flowstate.v1 protocol (binary protobuf, matching the Go implementation)."""
