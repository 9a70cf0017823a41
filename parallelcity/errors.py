"""The one exception tree of parallelcity.

Every error the runtime raises on purpose derives from ``ParallelCityError``;
errors of lower libraries (asyncua, pyzmq, sqlite3, casadi) are translated at
the module that talks to them, with the original kept as ``__cause__``::

    ParallelCityError
    ├── ScenarioError            a scenario file is missing, unreadable or invalid
    │   └── GatewayConfigError       the same for a stand-alone gateway's config file
    │   └── ExperimentError          the same for an experiment file (its variants' scenarios)
    │   └── NodeIdError              a NodeId text does not parse (also a ValueError)
    ├── PluginError              a controller / rig / model kind is unknown or broken
    ├── SecurityError            a transport would run without the security it needs
    ├── FieldError               talking to field equipment failed
    │   ├── FieldConnectionError     cannot reach or lost an OPC UA endpoint
    │   │   └── FieldUnavailableError    the session is down, reconnecting: nothing written
    │   └── NodeMappingError         a scenario NodeId does not exist on the server
    ├── DispatchError            a command could not be delivered or acknowledged
    ├── WireFormatError          a message on the wire does not follow the protocol
    ├── JournalError             the journal could not be written or read
    └── RigError                 a test rig failed, or was driven out of order

Solver failures, stale data and rejected plans are *not* exceptions: they are
values (``ControlResult.status``, ``Snapshot.stale``, ``Verdict.approved``) that
the cycle handles explicitly.
"""

from __future__ import annotations


class ParallelCityError(Exception):
    """Base class of every error parallelcity raises on purpose."""


class ScenarioError(ParallelCityError):
    """A scenario file is missing, unreadable or does not validate.

    ``problems`` lists one line per problem, each naming the key path.
    """

    what = "scenario"

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{path}: invalid {self.what}\n{lines}")

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # rebuilt from its own arguments, so it survives a process pool or a cluster worker
        return type(self), (self.path, self.problems)


class GatewayConfigError(ScenarioError):
    """A stand-alone gateway's config file is missing, unreadable or does not validate."""

    what = "gateway config"


class ExperimentError(ScenarioError):
    """An experiment file is missing, unreadable or does not validate (its variants included)."""

    what = "experiment"


class NodeIdError(ScenarioError, ValueError):
    """A NodeId as written in a scenario or config does not parse."""

    def __init__(self, node: str, why: str) -> None:
        self.node = node
        self.why = why
        super().__init__("NodeId", [f"NodeId {node!r}: {why}"])

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return type(self), (self.node, self.why)

    def __str__(self) -> str:
        return f"NodeId {self.node!r}: {self.why}"


class PluginError(ParallelCityError):
    """A plug-in kind named by a scenario is not installed or failed to load."""


class SecurityError(ParallelCityError):
    """A transport would run without the security the configuration demands."""


class FieldError(ParallelCityError):
    """Talking to field equipment (OPC UA) failed."""


class FieldConnectionError(FieldError):
    """An OPC UA endpoint cannot be reached, or the session was lost."""


class FieldUnavailableError(FieldConnectionError):
    """The OPC UA session is down and being re-established: nothing was sent, nothing queued."""


class NodeMappingError(FieldError):
    """A NodeId named in the scenario does not exist on the server."""


class DispatchError(ParallelCityError):
    """A command could not be delivered to the field gateway or was not acknowledged."""


class UnauthorisedError(SecurityError, DispatchError):
    """The gateway refused a request because the client's key may not make it."""


class WireFormatError(ParallelCityError):
    """A message does not follow the documented wire protocol."""


class JournalError(ParallelCityError):
    """The journal could not be written or read."""


class RigError(ParallelCityError):
    """A test rig (simulated, FMU, OPC UA bench) failed, or was driven out of order."""
