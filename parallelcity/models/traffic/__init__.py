"""The traffic domain: signalised networks on SUMO."""
