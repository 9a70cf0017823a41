"""The contract a field protocol implements (OPC UA, Modbus TCP, ...).

A field protocol is a plug-in: an object installed under the entry point group
``parallelcity.protocols``, for example in its distribution's ``pyproject.toml``::

    [project.entry-points."parallelcity.protocols"]
    opcua = "parallelcity.field.opcua.protocol:PROTOCOL"

The entry point's name is what a scenario writes in ``[field] protocol = "..."``
(default ``"opcua"``).  The object is an instance of a ``FieldProtocol`` subclass
and supplies four things:

1. **Scenario keys** (``field_model``): a subclass of ``config.FieldConfig`` adding the
   protocol-wide settings (OPC UA: ``namespace``, ``sampling_interval_ms``,
   ``start_timeout_s``), whose ``point_model`` / ``input_model`` are subclasses of
   ``config.PointMap`` / ``config.InputMap`` adding the address keys of one point or
   input (OPC UA: ``node``; Modbus: ``table``, ``address``, ...), with ``points`` /
   ``inputs`` narrowed to them.  The common keys (``name``, ``max_age_s``,
   ``required``, ``type``, ``min``, ``max``, ``max_clock_skew_s``, ``safe``) stay as
   they are.  Unknown keys are refused; every error is reported with its key path
   (``field.points[3].register: ...``).  Keep this module free of I/O imports: it is
   imported by ``validate`` and ``schema``.  A point that the protocol reports only
   when it changes overrides ``PointMap.on_change_only``; ``address_text()`` shows an
   address in listings.  A key may not reuse a common key or a name pydantic models
   already have (``register``, ``copy``, ``json``, ...).

2. **A reader** (``reader()`` returns a ``FieldReader``) that feeds the generic
   mirror (``parallelcity.field.mirror.Mirror``).  ``open(sink)`` connects, checks
   the mapping (every address the device does not have, reported at once, as
   ``NodeMappingError``; an unreachable device as ``FieldConnectionError``;
   certificates or users as ``SecurityError``), and from then on hands each reading
   to ``sink.offer(name, raw, source, status)``:

   * ``raw`` is the decoded value (``float`` for a float point, ``int`` for an int
     point, ``bool`` for a bool point); the mirror's pure point table judges type,
     range, order and clock skew;
   * ``source`` is when the value was measured, in epoch seconds on the run's clock
     (``clock.now()`` time base).  A protocol without source timestamps (Modbus)
     gives the time the response arrived, read from the clock;
   * ``status`` uses the OPC UA severity bits: ``STATUS_GOOD``, ``STATUS_UNCERTAIN``,
     ``STATUS_BAD`` (the lower bits may carry the protocol's own detail).

   ``sink.alive()`` says "the link answered, nothing changed" (a keep-alive, a poll
   round that succeeded), for points that report only on change.  ``problem()``
   says, cheaply and without waiting, why the link is not healthy now (a closed
   socket, silence beyond what the protocol allows), or None: the mirror calls it
   from ``snapshot()`` and a watcher.  On a problem the mirror opens a connection
   gap (every point held as stale), calls ``close()``, then ``open()`` again with a
   fresh sink and exponential backoff until it succeeds; readings offered through a
   sink of an earlier session are dropped.  ``read_inputs()`` reads the values the
   input addresses hold now (the runner's starting point).

3. **A writer** (``writer()`` returns a ``FieldWriter``) for the field gateway:
   ``connect()`` (the first connection must succeed), ``write(setpoints)`` (all or
   ``FieldError``; while the link is down ``FieldUnavailableError`` at once, nothing
   queued), ``read(names)`` (the read-back that settles a write left in doubt),
   ``available`` and ``aclose()``.  Every wait is bounded.  Link losses and recoveries
   go to ``on_link(kind, detail)`` with kind ``field_lost`` / ``field_restored``.

4. Optionally a **stand-in** (``stand_in()`` returns a ``FieldStandIn``): a server on
   127.0.0.1 that serves a plant's outputs at the point addresses and applies what is
   written to the input addresses (the simulated rig's field, so ``run`` and
   ``parallelcity field`` work on the protocol).  The plant comes from the rig kind as a
   factory ``make_plant(t0)`` returning a ``Plant``, so the protocol knows no rig.  And
   optionally a **browse** (``browse()``, with ``can_browse``) that lists a live server's
   variables as scenario TOML.

Security objects (``security=``) are the protocol's own (OPC UA: ``ClientSecurity``);
None means an unauthenticated lab link, which callers allow only for an
``insecure_lab`` scenario.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from parallelcity.errors import PluginError, SecurityError
from parallelcity.field.config import FieldConfig

if TYPE_CHECKING:
    from pathlib import Path

    from parallelcity.clock import Clock
    from parallelcity.scenario.definition import Scenario
    from parallelcity.twin.model import Array
    from parallelcity.verify.rig import ReceivedWrite

GROUP = "parallelcity.protocols"

_log = logging.getLogger(__name__)

STATUS_GOOD = 0x0000_0000
STATUS_UNCERTAIN = 0x4000_0000
STATUS_BAD = 0x8000_0000

LinkListener = Callable[[str, str], None]
"""``on_link(kind, detail)``: kind ``field_lost`` or ``field_restored``."""


class ReadingSink(Protocol):
    """What the mirror gives a reader for one session."""

    def offer(self, name: str, raw: object, source: float, status: int) -> None:
        """One reading of point ``name`` (see the module docstring for the arguments)."""

    def alive(self) -> None:
        """The link answered although nothing changed."""


@runtime_checkable
class FieldReader(Protocol):
    """One link that reads the scenario's points into the mirror."""

    @property
    def endpoint(self) -> str: ...

    @property
    def start_budget_s(self) -> float:
        """Wall seconds one ``open`` may take (a reconnect too)."""
        ...

    async def open(self, sink: ReadingSink) -> None:
        """Connect, check every address, start delivering readings; leave nothing open on
        failure."""

    async def close(self) -> None:
        """Stop delivering and disconnect; errors only logged; bounded."""

    def problem(self) -> str | None:
        """Why the link is not healthy now, or None.  Must not wait."""

    async def read_inputs(self) -> dict[str, float]:
        """The values every input address holds now."""


class SetpointWriter(Protocol):
    """What the field gateway needs: write setpoints, read input values back."""

    async def write(self, setpoints: Mapping[str, float]) -> None:
        """Write every setpoint or raise a ``FieldError``."""

    async def read(self, names: Sequence[str]) -> Mapping[str, float]:
        """The values the field holds now (to settle a write a crash left in doubt)."""
        ...


@runtime_checkable
class FieldWriter(SetpointWriter, Protocol):
    """A ``SetpointWriter`` with a lifecycle and a link state."""

    @property
    def available(self) -> bool:
        """True while a write would be sent."""
        ...

    async def connect(self) -> None:
        """Connect and check every input address; raises when the first connection fails."""

    async def aclose(self) -> None:
        """Disconnect; bounded; errors only logged."""

    async def __aenter__(self) -> FieldWriter:
        """``connect()``."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """``aclose()``."""


class Plant(Protocol):
    """What a field stand-in needs of the plant it serves (a rig kind's simulator)."""

    @property
    def t(self) -> float:
        """The time the plant's state belongs to (epoch seconds on the run's clock)."""
        ...

    @property
    def max_step_s(self) -> float:
        """The longest step one ``advance`` takes (a catch-up is chunked by it)."""
        ...

    @property
    def input_vector(self) -> Array:
        """The inputs held now, in the model's input order."""
        ...

    def advance(self, t: float) -> None:
        """Step the plant to ``t`` (a ``t`` in the past is a no-op)."""

    def outputs(self) -> Array:
        """What the points may carry now: the model's outputs, then its measured-only
        signals (``SubsystemModel.point_signals`` order)."""
        ...

    def set_input(self, name: str, value: float) -> None:
        """Hold input ``name`` at ``value`` from now on (ValueError if it cannot)."""


PlantFactory = Callable[[float], Plant]
"""``make_plant(t0)``: a new plant at time ``t0``, in its initial state."""


class FieldStandIn(Protocol):
    """A plant simulator served on loopback at the scenario's addresses: ``async with`` it.

    Every tick it publishes the plant's outputs at the point addresses (stamped with the
    simulated time where the protocol carries one) and applies whatever a client writes to
    an input address to the plant at once, recording it in ``applied``.
    """

    @property
    def endpoint(self) -> str:
        """Where a reader and a writer reach it (valid once entered)."""
        ...

    @property
    def applied(self) -> list[ReceivedWrite]:
        """Every value written to an input address, in order."""
        ...

    def listen_on(self, host: str, port: int) -> None:
        """Serve on ``host:port`` instead of a free loopback port (``parallelcity field``)."""

    def allow_insecure_lab(self) -> None:
        """Serve without the protocol's security whatever the scenario says."""

    async def __aenter__(self) -> FieldStandIn: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@dataclass(frozen=True)
class LinkSecurity:
    """What a run secures its field links with: ``client`` goes to the reader and the
    writer, ``server`` to the embedded stand-in (None: no security on that side)."""

    client: object | None = None
    server: object | None = None


class FieldProtocol(ABC):
    """A field protocol plug-in: subclass it and install an instance as an entry point."""

    name: ClassVar[str]
    field_model: ClassVar[type[FieldConfig]]
    title: ClassVar[str] = ""
    """How people write the protocol's name (``"Modbus TCP"``); default ``name``."""
    has_security: ClassVar[bool] = False
    """True if the protocol authenticates and encrypts (then it overrides ``security`` and
    ``secure_stand_in``); False: its stand-in serves loopback only unless a lab allows more."""

    @property
    def label(self) -> str:
        return self.title or self.name

    @property
    def can_browse(self) -> bool:
        """True if the protocol implements ``browse``."""
        return type(self).browse is not FieldProtocol.browse

    @abstractmethod
    def reader(
        self,
        field: FieldConfig,
        clock: Clock,
        *,
        endpoint: str,
        security: object | None = None,
        **options: Any,
    ) -> FieldReader:
        """A reader for ``field`` (an instance of ``field_model``) at ``endpoint``;
        ``options`` are the mirror's tuning keywords the protocol understands."""

    @abstractmethod
    def writer(
        self,
        field: FieldConfig,
        *,
        endpoint: str,
        security: object | None = None,
        on_link: LinkListener | None = None,
        **options: Any,
    ) -> FieldWriter:
        """A writer of ``field``'s inputs at ``endpoint`` (not yet connected)."""

    def stand_in(
        self,
        scenario: Scenario,
        clock: Clock,
        *,
        make_plant: PlantFactory,
        tick_ms: float = 50.0,
    ) -> FieldStandIn:
        """A stand-in serving the plant ``make_plant(t0)`` makes (``scenario``'s model with
        the rig's parameters and disturbances) at ``scenario``'s addresses, ticking every
        ``tick_ms`` wall milliseconds; optional (rig kinds call it in ``field_stand_in``)."""
        raise PluginError(f"field protocol {self.name!r} has no field stand-in")

    def endpoint_problem(self, endpoint: str) -> str | None:
        """Why ``endpoint`` is not an address this protocol's reader and writer can use
        (``run --field``, ``[field] endpoint``), or None; the default accepts any."""
        return None

    def check_security(self, scenario: Scenario, *, embedded: bool) -> None:
        """Refuse (``SecurityError``) a run this protocol cannot secure, before anything
        starts.  The default, for a protocol without security: only a lab run may reach
        real equipment; the embedded stand-in listens on loopback only."""
        if not embedded and not scenario.insecure_lab:
            raise SecurityError(
                f"field protocol {self.name!r} has no security: talking to field equipment "
                "over it needs [security] insecure_lab = true (a lab run)"
            )

    def security(self, scenario: Scenario, *, embedded: bool, out_dir: Path) -> LinkSecurity:
        """The run's security objects (generated under ``out_dir`` if need be)."""
        self.check_security(scenario, embedded=embedded)
        if embedded and not scenario.insecure_lab:
            _log.info("embedded %s field stand-in on loopback, without security", self.name)
        return LinkSecurity()

    def secure_stand_in(self, stand_in: object, server: object) -> None:
        """Make ``stand_in`` (not yet entered) serve with ``server`` security."""
        raise SecurityError(f"field protocol {self.name!r} cannot serve with security")

    async def browse(
        self,
        endpoint: str,
        security: object | None = None,
        *,
        max_age_s: float = 60.0,
        **options: Any,
    ) -> str:
        """A live server's variables as a ``[field]`` table with one ``[[field.points]]``
        entry each (``max_age_s`` as their max age), to edit into a scenario; optional."""
        raise PluginError(f"field protocol {self.name!r} cannot browse a server")

    def describe(self, field: FieldConfig) -> list[tuple[str, str, str]]:
        """``(name, address, role)`` per point and input, for listings."""
        rows = [
            (p.name, p.address_text(), f"measurement ({p.type}, read-only)") for p in field.points
        ]
        rows += [(i.name, i.address_text(), "input (writable)") for i in field.inputs]
        return rows

    def summary(self, field: FieldConfig) -> str:
        """One line saying where the addresses live, for listings."""
        return f"{self.name}: {len(field.points)} points, {len(field.inputs)} inputs"
