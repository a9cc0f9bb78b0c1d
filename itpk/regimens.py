"""Named clinical regimens: the T-VEC (talimogene laherparepvec) label schedule.

Imlygic label (DOMAIN.md §5): 10^6 PFU/mL at the first visit, 10^8 PFU/mL
three weeks later, then every two weeks; the volume injected into a lesion
depends on its longest diameter; at most 4 mL per visit across lesions.
"""

from __future__ import annotations

from itpk.errors import ItpkError
from itpk.events import Dose, Schedule, Target

HOURS_PER_DAY = 24.0
FIRST_CONCENTRATION = 1e6  # PFU/mL, visit 1 (seroconversion dose)
LATER_CONCENTRATION = 1e8  # PFU/mL, visits 2+
SECOND_VISIT_DAY = 21.0
INTERVAL_DAYS = 14.0
MAX_VOLUME_PER_VISIT = 4.0  # mL across all lesions

# (lower bound exclusive, volume mL) by longest diameter in cm, from the label table
_VOLUME_BY_DIAMETER = ((5.0, 4.0), (2.5, 2.0), (1.5, 1.0), (0.5, 0.5), (0.0, 0.1))


def tvec_volume(diameter_cm: float) -> float:
    """Injection volume (mL) for a lesion of this longest diameter (cm), per the label.

    > 5 cm: up to 4 mL; 2.5–5 cm: 2 mL; 1.5–2.5 cm: 1 mL; 0.5–1.5 cm: 0.5 mL; ≤ 0.5 cm: 0.1 mL.
    """
    if not diameter_cm > 0:
        raise ItpkError(f"--diam must be a lesion diameter > 0 cm, found {diameter_cm}")
    return next(volume for lower, volume in _VOLUME_BY_DIAMETER if diameter_cm > lower)


def tvec_schedule(diameter_cm: float, *, visits: int = 6, route: str = "it", site: str | None = None,
                  hours: float = 1.0) -> Schedule:
    """T-VEC visits into one lesion: amounts in PFU, times in the model's time unit (``hours``: that unit per hour).

    Visit 1 at day 0 with 10^6 PFU/mL, visit 2 at day 21 with 10^8 PFU/mL, then
    every 14 days; each visit injects ``tvec_volume(diameter_cm)`` mL into the
    route's site (``site``: another of the route's sites, e.g. ``lesion2``).
    """
    if visits < 1:
        raise ItpkError(f"--doses (visits) must be >= 1, found {visits}")
    volume = tvec_volume(diameter_cm)
    target = Target(route, site=site)
    doses = [Dose(0.0, FIRST_CONCENTRATION * volume, target)]
    if visits > 1:
        doses.append(
            Dose(
                SECOND_VISIT_DAY * HOURS_PER_DAY * hours,
                LATER_CONCENTRATION * volume,
                target,
                ii=INTERVAL_DAYS * HOURS_PER_DAY * hours if visits > 2 else 0.0,
                addl=visits - 2,
            )
        )
    return Schedule(tuple(doses))


REGIMENS = {"tvec": tvec_schedule}
AMOUNT_UNITS = {"tvec": "PFU"}  # what a regimen's amounts count: the receiving compartment must count the same


def unit_problem(name: str, amount_unit: str, route: str) -> str | None:
    """Why regimen ``name`` cannot dose a compartment counted in ``amount_unit`` by ``route``, or None."""
    wanted = AMOUNT_UNITS.get(name)
    if wanted is None or amount_unit == wanted:
        return None
    return (f"--regimen {name} doses {wanted} (a virus), but route {route} doses {amount_unit}: "
            f"give --dose in {amount_unit} instead, or a model whose {route} route doses {wanted}")
