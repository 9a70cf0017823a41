"""The field gateway: pure decision, durable store, watchdog, ZAP, and its I/O shell."""
