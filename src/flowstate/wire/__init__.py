"""Wire formats of the flowstate.v1 protocol, compatible with the Go implementation.

:mod:`flowstate.wire.codec` encodes and decodes Commands, StateCtxs and error bodies (binary
protobuf and JSON); :mod:`flowstate.wire.binary` holds the model messages' binary codec;
:mod:`flowstate.wire.flowstate_pb2` is generated from ``proto/flowstate/v1/flowstate.proto``
(``scripts/gen_proto.sh``) for use with the official protobuf runtime.
"""
