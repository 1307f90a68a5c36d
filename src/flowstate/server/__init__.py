"""The flowstate server: the flowstate.v1 Driver and Flow services over Connect (HTTP/1.1 and
h2c, binary protobuf and JSON), wire-compatible with the Go server and its clients."""

from flowstate.server.app import create_app
from flowstate.server.run import BackgroundServer, run_server, serve, settings

__all__ = ["BackgroundServer", "create_app", "run_server", "serve", "settings"]
