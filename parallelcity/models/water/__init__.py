"""The water domain: a drinking-water network on EPANET (docs/models/water_network.md)."""
