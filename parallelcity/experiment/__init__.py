"""Computational experiments: a base scenario under variants times seeds, each a closed loop
on the rig's field plant (``parallelcity experiment``)."""
