"""The OPC UA field protocol: sessions, NodeIds, reading, writing, browse, certificates."""
