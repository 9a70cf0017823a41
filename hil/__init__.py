"""Test rigs and plant simulators for parallelcity (``parallelcity.rigs`` entry points)."""
