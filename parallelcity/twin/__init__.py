"""The twin: subsystem models, state estimation, forecasts and the divergence monitor."""
