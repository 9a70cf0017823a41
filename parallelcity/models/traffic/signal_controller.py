"""The field-side signal controller of one junction: which program the signal runs, cycle by
cycle.  Pure decision logic; the SUMO plant (``sumo_plant``) installs what it decides.

Rules it keeps whatever is written to it:

* a plan (splits, cycle, offset) takes effect only at the next cycle boundary; a cycle once
  started runs to its end unchanged;
* the phases shown are the junction program's own states in its own order; only green
  durations change, through ``network.greens`` (every minimum green kept), rounded to whole
  simulation steps; intergreens (yellow, all-red) keep their programmed durations;
* the cycle stays within ``[min cycle, max cycle]`` (min cycle: intergreens plus minimum
  greens, rounded up to whole steps);
* an offset is reached by a bounded transition: each cycle is shortened or lengthened by at
  most ``max_shift`` of its length (and within the cycle limits) until its start is aligned;
* no plan, a plan with a non-finite value, or a plan equal to the junction's own program (a
  gateway watchdog revert writes exactly that) runs the junction's own program.  A fixed-time
  program is the plan of its own splits, cycle and offset; an actuated program (``actuated``)
  is handed back to the simulator's own logic (``CycleProgram.actuated``), and a written plan
  takes over again at the actuated program's next return to its first phase.

Coordinated-actuated operation (``gap_out_s > 0``): a plan's greens are maximum greens.  In a
planned cycle the *coordinated* phase is the green phase with the longest green (on an
arterial, the main street's); every other green phase may gap out (``gap_out``) once its
minimum green has run, when the caller's stop-line loops saw no vehicle for ``gap_out_s``.
The time it leaves goes to the coordinated phase: to its green later in the same cycle, or,
when the coordinated phase is the program's first, as an early start of its next green (a
``tail_s`` after the cycle's last phase, showing phase 0).  The cycle's start, length and end
never change, so neither do the offsets; intergreens stay as programmed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .network import Junction, greens

SAME_PLAN_TOLERANCE = 1e-6  # relative: a written plan this close to the own program is it
DEFAULT_MAX_SHIFT = 0.2  # an offset transition changes a cycle by at most this fraction


@dataclass(frozen=True)
class Plan:
    splits: tuple[float, ...]
    cycle_s: float
    offset_s: float


@dataclass(frozen=True)
class CycleProgram:
    """One cycle of a junction: program phase ``i`` shown for ``durations_s[i]`` seconds from
    ``start_s`` on (simulation seconds); ``actuated``: the simulator's own actuated logic
    runs instead and the cycle ends when it returns to its first phase (``durations_s`` are
    the program's nominal ones)."""

    start_s: float
    durations_s: tuple[float, ...]
    own: bool  # the junction's own program (no plan, or the plan equal to it)
    actuated: bool = False
    coordinated: int | None = None  # program phase that takes the time others gap out of
    tail_s: float = 0.0  # phase 0 shown early after the last phase (time gapped out)

    @property
    def length_s(self) -> float:
        return sum(self.durations_s) + self.tail_s

    def phase_at(self, second: float) -> int:
        """Program phase shown ``second`` s into the cycle (a phase ending then still shows;
        in the tail, phase 0)."""
        end = 0.0
        for i, d in enumerate(self.durations_s):
            end += d
            if second <= end + 1e-9:
                return i
        return 0 if self.tail_s > 0 else len(self.durations_s) - 1

    @property
    def end_s(self) -> float:
        return self.start_s + self.length_s


class SignalController:
    """Cycle-by-cycle program of one junction (see the module docstring)."""

    def __init__(
        self,
        junction: Junction,
        max_cycle_s: float,
        *,
        actuated: bool = False,
        step_s: float = 1.0,
        max_shift: float = DEFAULT_MAX_SHIFT,
        gap_out_s: float = 0.0,
    ) -> None:
        if not (step_s > 0 and math.isfinite(step_s)):
            raise ValueError(f"step_s must be positive, got {step_s}")
        if not 0 < max_shift < 1:
            raise ValueError(f"max_shift must be in (0, 1), got {max_shift}")
        self.junction = junction
        self.step_s = float(step_s)
        self.actuated = actuated
        self.max_shift = float(max_shift)
        if not (gap_out_s >= 0 and math.isfinite(gap_out_s)):
            raise ValueError(f"gap_out_s must be >= 0, got {gap_out_s}")
        self.gap_out_s = float(gap_out_s)
        mins = [self._up(m) for m in junction.min_greens_s]
        self.min_greens_s = tuple(mins)
        self.lost_s = tuple(
            self._round(p.duration_s)
            for i, p in enumerate(junction.phases)
            if i not in junction.green
        )
        self.min_cycle_s = sum(self.lost_s) + sum(mins)
        self.max_cycle_s = max(self._round(max_cycle_s), self.min_cycle_s)
        self.own_plan = Plan(junction.splits, junction.cycle_s, junction.offset_s)
        self._pending: Plan | None = None
        self.current: CycleProgram | None = None

    def write(self, splits: Sequence[float], cycle_s: float, offset_s: float) -> None:
        """A plan for the cycles from the next boundary on (garbage falls back, see module)."""
        values = [*splits, cycle_s, offset_s]
        if len(splits) != len(self.junction.green) - 1 or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in values
        ):
            self._pending = None
            return
        self._pending = Plan(tuple(float(s) for s in splits), float(cycle_s), float(offset_s))

    def revert(self) -> None:
        """No plan: the junction's own program from the next boundary on."""
        self._pending = None

    @property
    def plan(self) -> Plan | None:
        """The plan the next cycle will run (None: the own program)."""
        p = self._pending
        return None if p is None or self._is_own(p) else p

    def start(self, t_s: float) -> CycleProgram:
        """The first cycle, starting at ``t_s``."""
        self.current = self._cycle(self._round(t_s))
        return self.current

    def next_cycle(self) -> CycleProgram:
        """The cycle starting where the current one ends."""
        if self.current is None:
            raise RuntimeError("start() first")
        self.current = self._cycle(self.current.end_s)
        return self.current

    def restart_at(self, t_s: float) -> CycleProgram:
        """The next cycle starts at ``t_s`` (an actuated cycle ended when its logic said)."""
        self.current = self._cycle(self._round(t_s))
        return self.current

    def gap_window(self, cyc: CycleProgram) -> list[tuple[int, float, float]]:
        """``(phase, from_s, to_s)``: when each phase of ``cyc`` may gap out (simulation
        seconds from its minimum green to its planned end); empty without gap-out."""
        if cyc.coordinated is None:
            return []
        out: list[tuple[int, float, float]] = []
        t = cyc.start_s
        for i, d in enumerate(cyc.durations_s):
            if i in self.junction.green and i != cyc.coordinated:
                earliest = t + max(self.min_greens_s[self.junction.green.index(i)], self.step_s)
                if earliest < t + d - 1e-9:
                    out.append((i, earliest, t + d))
            t += d
        return out

    def gap_out(self, now_s: float) -> CycleProgram | None:
        """End the running non-coordinated green at ``now_s`` (the caller saw a gap on its
        loops); returns the changed cycle, or None where it may not gap out."""
        cyc = self.current
        if cyc is None:
            return None
        now = self._round(now_s)
        window = [w for w in self.gap_window(cyc) if w[1] - 1e-9 <= now < w[2] - 1e-9]
        if not window:
            return None
        i, _, end = window[0]
        c = cyc.coordinated
        assert c is not None
        left = end - now
        durations = list(cyc.durations_s)
        durations[i] -= left
        tail = cyc.tail_s
        if c > i:
            durations[c] += left
        elif c == 0:
            tail += left
        else:
            return None  # the coordinated green does not follow: keep the maximum green
        self.current = replace(cyc, durations_s=tuple(durations), tail_s=tail)
        return self.current

    # -- decisions ---------------------------------------------------------------------------

    def _cycle(self, start: float) -> CycleProgram:
        plan = self.plan
        if plan is None and self.actuated:
            nominal = tuple(p.duration_s for p in self.junction.phases)
            return CycleProgram(start, nominal, own=True, actuated=True)
        own = plan is None
        plan = self.own_plan if plan is None else plan
        cycle = min(max(self._round(plan.cycle_s), self.min_cycle_s), self.max_cycle_s)
        length = self._aligned_length(start, cycle, self._round(plan.offset_s))
        green = self._whole_greens(plan.splits, length)
        durations: list[float] = []
        gi = li = 0
        for i in range(len(self.junction.phases)):
            if i in self.junction.green:
                durations.append(green[gi])
                gi += 1
            else:
                durations.append(self.lost_s[li])
                li += 1
        coordinated = None
        if self.gap_out_s > 0 and not own:
            coordinated = max(self.junction.green, key=lambda i: durations[i])
        return CycleProgram(start, tuple(durations), own=own, coordinated=coordinated)

    def _aligned_length(self, start: float, cycle: float, offset: float) -> float:
        """This cycle's length: ``cycle``, shortened or lengthened (bounded) so the cycles
        after it start at ``offset`` modulo ``cycle``."""
        error = (start - offset) % cycle
        if error < self.step_s / 2 or cycle - error < self.step_s / 2:
            return cycle
        cap = self._down(self.max_shift * cycle)
        shorten, lengthen = error, cycle - error  # the nearer aligned start wins
        length = cycle - min(shorten, cap) if shorten <= lengthen else cycle + min(lengthen, cap)
        return min(max(length, self.min_cycle_s), self.max_cycle_s)

    def _whole_greens(self, splits: Sequence[float], length: float) -> tuple[float, ...]:
        """``network.greens`` rounded to whole steps, each at least its minimum, summing to
        ``length`` minus the intergreens."""
        effective = length - sum(self.lost_s)
        raw = greens(self.junction, splits, length)
        scale = effective / sum(raw) if sum(raw) > 0 else 1.0
        wanted = [g * scale for g in raw]
        steps = [max(m, self._down(g)) for g, m in zip(wanted, self.min_greens_s, strict=True)]
        left = round((effective - sum(steps)) / self.step_s)
        order = sorted(range(len(steps)), key=lambda k: steps[k] - wanted[k])
        k, limit = 0, len(steps) * (abs(left) + 1)
        while left != 0 and k < limit:
            i = order[k % len(order)]
            if left > 0:
                steps[i] += self.step_s
                left -= 1
            elif steps[i] - self.step_s >= self.min_greens_s[i] - 1e-9:
                steps[i] -= self.step_s
                left += 1
            k += 1
        return tuple(steps)

    def _is_own(self, plan: Plan) -> bool:
        own = self.own_plan
        scale = max(1.0, own.cycle_s)
        return (
            all(
                abs(a - b) <= SAME_PLAN_TOLERANCE
                for a, b in zip(plan.splits, own.splits, strict=True)
            )
            and abs(plan.cycle_s - own.cycle_s) <= SAME_PLAN_TOLERANCE * scale
            and abs(plan.offset_s - own.offset_s) <= SAME_PLAN_TOLERANCE * scale
        )

    def _round(self, t: float) -> float:
        return round(t / self.step_s) * self.step_s

    def _down(self, t: float) -> float:
        return math.floor(t / self.step_s + 1e-9) * self.step_s

    def _up(self, t: float) -> float:
        return math.ceil(t / self.step_s - 1e-9) * self.step_s
