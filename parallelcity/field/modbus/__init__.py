"""Modbus TCP, the second field protocol: codec, poller reader, gateway writer, stand-in."""
