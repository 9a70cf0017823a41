"""Built-in subsystem models, registered under the ``parallelcity.models`` entry point group."""
