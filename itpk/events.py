"""Dosing histories with NONMEM semantics, expanded to atomic events.

A :class:`Schedule` holds doses (bolus or zero-order infusion, with II/ADDL and
SS) and resets. :func:`expand` turns it into a time-ordered tuple of atomic
events that every solver consumes the same way:

- ``reset``: all amounts to zero and every running infusion stopped (EVID 3,
  and the first half of EVID 4);
- ``steady_state``: the state replaced (SS=1) or incremented (SS=2) by the
  periodic steady state of the dose repeated every II;
- ``bolus``: an amount added through a route;
- ``infusion_on`` / ``infusion_off``: a zero-order input starts or stops;
- ``covariate``: time-varying covariates take new values (NOCB, see
  :class:`CovariateChange`).

At one time, events apply in that order (resets, steady states, boluses,
infusion switches, then covariate changes), and observations at that time see
the state after them: a value at a dose time is the value just after the dose
(SPEC.md §4). A covariate change at t moves no amount; it applies from t on,
exclusive, so outputs at t still use the old values.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from itpk.errors import ScheduleError

MAX_DOSES = 100_000  # doses of one regimen or dataset row (ADDL): 270 years of daily doses; more is a typo that runs for hours

RESET, STEADY_STATE, BOLUS, INFUSION_ON, INFUSION_OFF = "reset", "steady_state", "bolus", "infusion_on", "infusion_off"
COVARIATE = "covariate"
_ORDER = {RESET: 0, STEADY_STATE: 1, BOLUS: 2, INFUSION_OFF: 3, INFUSION_ON: 4, COVARIATE: 5}


@dataclass(frozen=True)
class Target:
    """Where a dose goes: a route of the model (``iv``, ``it``...) or, with
    ``compartment=True``, straight into the named compartment (fraction 1).

    ``site`` sends a route to another of its sites (``ROUTE=it, CMT=lesion2``:
    the second lesion is injected, with the route's leak); None is the route's own.
    """

    name: str
    compartment: bool = False
    site: str | None = None

    def __post_init__(self) -> None:
        if self.compartment and self.site is not None:
            raise ScheduleError(f"dose into compartment {self.name!r}: a site is for routes only (found {self.site!r})")

    def __str__(self) -> str:
        if self.compartment:
            return f"cmt:{self.name}"
        return self.name if self.site is None else f"{self.name}@{self.site}"

    @classmethod
    def parse(cls, label: str) -> Target:
        """The target ``str(target)`` wrote (``iv``, ``it@lesion2``, ``cmt:central``)."""
        if label.startswith("cmt:"):
            return cls(label[4:], compartment=True)
        name, _, site = label.partition("@")
        return cls(name, site=site or None)


@dataclass(frozen=True)
class Dose:
    """One dose record (NONMEM EVID 1, or 4 with ``reset=True``).

    Parameters
    ----------
    time
        Time of the (first) dose, model time unit.
    amount
        Amount given (model amount unit). Ignored for a steady-state constant
        infusion (``ss`` with ``ii == 0`` and ``rate > 0``).
    target
        Route or compartment receiving the dose.
    rate, duration
        Zero-order infusion, amount/time or time; give one of them (or neither
        for a bolus). ``duration = amount / rate``.
    ii, addl
        ``addl`` more doses every ``ii`` (time unit).
    ss
        0 none; 1 the state is reset and replaced by the steady state of this
        dose repeated every ``ii``; 2 the steady state is added to the state.
    reset
        True for EVID 4: reset everything just before this dose.
    """

    time: float
    amount: float
    target: Target
    rate: float = 0.0
    duration: float = 0.0
    ii: float = 0.0
    addl: int = 0
    ss: int = 0
    reset: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("time", "rate", "duration", "ii"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0, found {value!r}")
        if not isinstance(self.addl, int) or self.addl < 0:
            problems.append(f"addl must be a whole number >= 0, found {self.addl!r}")
        if self.ss not in (0, 1, 2):
            problems.append(f"ss must be 0, 1 or 2, found {self.ss!r}")
        if self.rate > 0 and self.duration > 0:
            problems.append(f"give rate or duration, not both (rate={self.rate}, duration={self.duration})")
        if self.addl > 0 and self.ii <= 0:
            problems.append(f"addl={self.addl} needs ii > 0")
        constant_ss = self.ss and self.ii == 0 and self.rate > 0
        if self.ss and self.ii <= 0 and not constant_ss:
            problems.append("a steady-state dose needs ii > 0 (or ii = 0 with rate > 0 for a constant infusion)")
        amount_ok = isinstance(self.amount, (int, float)) and math.isfinite(self.amount)
        if not amount_ok or (self.amount <= 0 and not constant_ss) or self.amount < 0:
            problems.append(f"amount must be a finite number > 0, found {self.amount!r}")
        if problems:
            raise ScheduleError(f"dose at time {self.time} into {self.target}: " + "; ".join(problems))

    @property
    def is_infusion(self) -> bool:
        return self.rate > 0 or self.duration > 0

    @property
    def infusion_rate(self) -> float:
        """Rate in amount/time (0 for a bolus)."""
        if self.rate > 0:
            return self.rate
        return self.amount / self.duration if self.duration > 0 else 0.0

    @property
    def infusion_duration(self) -> float:
        """Duration in time units (inf for a steady-state constant infusion, 0 for a bolus)."""
        if self.duration > 0:
            return self.duration
        if self.rate > 0:
            return self.amount / self.rate if self.ii > 0 or not self.ss else math.inf
        return 0.0

    def times(self) -> tuple[float, ...]:
        """Times of this dose and its ADDL repeats."""
        return tuple(self.time + k * self.ii for k in range(self.addl + 1))


@dataclass(frozen=True)
class CovariateChange:
    """Time-varying covariates taking new values on the open interval after ``time``.

    NONMEM's NOCB: a data record's covariates hold from the previous record's
    time (exclusive) up to its own (inclusive). So when a record's value
    differs from the previous record's, the change happens at the previous
    record's time, after everything at that time (:func:`itpk.subjects.subjects`
    builds them from a subject's rows).

    Parameters
    ----------
    time
        Time of the change, model time unit; the new values hold for t > time.
    values
        (covariate name, new value in the covariate's unit), sorted by name.
    """

    time: float
    values: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time) and self.time >= 0):
            raise ScheduleError(f"covariate change time must be a finite number >= 0, found {self.time!r}")
        bad = [name for name, v in self.values if not math.isfinite(v)]
        if bad or not self.values:
            raise ScheduleError(f"covariate change at {self.time:g}: values must be finite numbers"
                                + (f" ({', '.join(bad)})" if bad else ", and at least one is needed"))


@dataclass(frozen=True)
class Schedule:
    """A subject's dosing history: doses, resets (EVID 3) and covariate changes.

    Hashable, so subjects that share a schedule are solved together.
    """

    doses: tuple[Dose, ...] = ()
    resets: tuple[float, ...] = ()
    changes: tuple[CovariateChange, ...] = ()

    def __post_init__(self) -> None:
        for t in self.resets:
            if not (math.isfinite(t) and t >= 0):
                raise ScheduleError(f"reset time must be a finite number >= 0, found {t!r}")
        times = [c.time for c in self.changes]
        if any(b <= a for a, b in itertools.pairwise(times)):
            raise ScheduleError(f"covariate changes must be in increasing time order, found times {times}")

    def targets(self) -> tuple[Target, ...]:
        """Distinct dose targets, in first-use order."""
        return tuple(dict.fromkeys(d.target for d in self.doses))

    def scaled(self, factor: float) -> Schedule:
        """The same regimen with every amount and rate multiplied by ``factor`` (durations kept)."""
        from dataclasses import replace

        return Schedule(
            tuple(replace(d, amount=d.amount * factor, rate=d.rate * factor) for d in self.doses), self.resets,
            self.changes,
        )

    def retarget(self, route: str, site: str | None = None) -> Schedule:
        """The same doses given by another route (to another of its sites with ``site``)."""
        from dataclasses import replace

        return Schedule(tuple(replace(d, target=Target(route, site=site)) for d in self.doses), self.resets, self.changes)

    def dose_times(self) -> tuple[float, ...]:
        """Every dose time after ADDL expansion, sorted."""
        return tuple(sorted({t for d in self.doses for t in d.times()}))


@dataclass(frozen=True)
class Event:
    """An atomic event. ``infusion`` identifies an infusion across its on/off pair;
    ``segment`` numbers a covariate change (1 for the schedule's first)."""

    time: float
    kind: str
    target: Target | None = None
    amount: float = 0.0
    rate: float = 0.0
    infusion: int = -1
    dose: Dose | None = field(default=None, compare=False)
    segment: int = -1


def expand(schedule: Schedule) -> tuple[Event, ...]:
    """Expand ADDL/II, infusions and resets into time-ordered atomic events.

    A steady-state dose emits one ``steady_state`` event; the solver puts the
    periodic state in place and reports which earlier (phantom) infusions are
    still running, via :func:`steady_state_infusions`.
    """
    events: list[Event] = [Event(t, RESET) for t in schedule.resets]
    serial = 0
    for dose in schedule.doses:
        for k, t in enumerate(dose.times()):
            if dose.reset and k == 0:
                events.append(Event(t, RESET))
            if dose.ss and k == 0:
                events.append(Event(t, STEADY_STATE, dose.target, dose.amount, dose.infusion_rate, -1, dose))
                if not dose.is_infusion:
                    continue
                # The steady-state dose itself (and the phantom infusions still
                # running) are switched on by the solver at this time.
                for end in steady_state_infusions(dose):
                    serial += 1
                    events.append(Event(t, INFUSION_ON, dose.target, 0.0, dose.infusion_rate, serial, dose))
                    if math.isfinite(end):
                        events.append(Event(end, INFUSION_OFF, dose.target, 0.0, dose.infusion_rate, serial, dose))
                continue
            if dose.is_infusion:
                serial += 1
                events.append(Event(t, INFUSION_ON, dose.target, dose.amount, dose.infusion_rate, serial, dose))
                events.append(Event(t + dose.infusion_duration, INFUSION_OFF, dose.target, 0.0, dose.infusion_rate, serial, dose))
            else:
                events.append(Event(t, BOLUS, dose.target, dose.amount, 0.0, -1, dose))
    events += [Event(c.time, COVARIATE, segment=j + 1) for j, c in enumerate(schedule.changes)]
    events.sort(key=lambda e: (e.time, _ORDER[e.kind], e.infusion))
    return tuple(events)


def steady_state_infusions(dose: Dose) -> tuple[float, ...]:
    """End times of the infusions running just after a steady-state infusion dose.

    With duration D = m·II + d (0 <= d < II), the dose itself ends at t + D and
    m earlier doses of the periodic regimen are still running, ending at
    t + D - j·II for j = 1..m (those that end after t).
    """
    t, ii, duration = dose.time, dose.ii, dose.infusion_duration
    if not math.isfinite(duration):
        return (math.inf,)
    m = math.floor(duration / ii + 1e-12)
    ends = [t + duration - j * ii for j in range(m + 1)]
    return tuple(e for e in ends if e > t + 1e-12 * max(1.0, t))


def breakpoints(events: tuple[Event, ...], times: tuple[float, ...]) -> tuple[float, ...]:
    """Every time at which the solver must stop: events and observations, sorted."""
    return tuple(sorted({e.time for e in events} | set(times)))


def regimen(
    target: str | Target,
    dose: float,
    *,
    every: float | None = None,
    doses: int = 1,
    infusion: float | None = None,
    start: float = 0.0,
) -> Schedule:
    """A regular regimen: ``doses`` doses of ``dose`` every ``every`` hours.

    Parameters
    ----------
    target
        Route name (``"iv"``, ``"it"``...) or a :class:`Target`.
    dose
        Amount per dose, model amount unit.
    every
        Dosing interval, model time unit; required when ``doses > 1``.
    doses
        Number of doses.
    infusion
        Infusion duration (time unit); None for bolus doses.
    start
        Time of the first dose.
    """
    if doses < 1:
        raise ScheduleError(f"doses must be >= 1, found {doses}")
    if doses > 1 and not (every and every > 0):
        raise ScheduleError(f"{doses} doses need an interval > 0 (--every), found {every!r}")
    tgt = target if isinstance(target, Target) else Target(target)
    dose_record = Dose(
        time=start,
        amount=dose,
        target=tgt,
        duration=infusion or 0.0,
        ii=float(every or 0.0) if doses > 1 else 0.0,
        addl=doses - 1,
    )
    return Schedule(doses=(dose_record,))
