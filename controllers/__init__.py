"""Controllers for parallelcity, found through the ``parallelcity.controllers`` entry points."""
