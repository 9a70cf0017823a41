"""Fault diagnosis from twin-vs-field residuals: detect, isolate, estimate (docs/diagnosis.md)."""
