"""Generate the simulated example trials in data/ (fixed seeds; run from the repo root).

    python tools/make_example_data.py            # rewrites data/example_it_vs_iv.csv and data/example_virus.csv

True values, designs and units are documented in data/README.md; tests/test_examples.py checks
that this script reproduces the bundled files exactly and that they read back as written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from itpk import load_model
from itpk.events import Dose, Schedule, Target
from itpk.population import sample_population
from itpk.regimens import tvec_schedule
from itpk.simulate import simulate

PLASMA_TIMES = [0.5, 2, 8, 24, 48, 96, 168, 336, 504, 672]  # h
BIOPSY_TIMES = [24, 168]  # h, IT arm only
PLASMA_LLOQ = 0.3  # ug/mL (= mg/L)
VIRUS_TIMES = [24, 72, 168, 504, 528, 840, 1176, 1512]  # h (days 1, 3, 7, 21, 22, 35, 49, 63)
DIAMETER_TIMES = [0, 504, 1176, 1848]  # h
VIRUS_LLOQ = 10.0  # copies/mL


def it_vs_iv(seed: int = 20261127) -> pd.DataFrame:
    """it_antibody, 10 mg: 6 subjects IV (1 h infusion) and 6 IT; plasma, plus 2 tumour biopsies in IT."""
    spec = load_model("it_antibody")
    rng = np.random.default_rng(seed)
    rows = []
    for arm, route, ids in (("IV", "iv", range(1, 7)), ("IT", "it", range(7, 13))):
        n = len(ids)
        params = sample_population(spec, n, seed=int(rng.integers(2**31)))
        wt = np.round(rng.normal(75, 12, n).clip(45, 120), 1)
        diam = np.round(rng.uniform(1.5, 4.0, n), 1)
        params["DIAM"] = diam
        dose = Dose(0.0, 10.0, Target(route), duration=1.0 if route == "iv" else 0.0)
        times = sorted(set(PLASMA_TIMES) | (set(BIOPSY_TIMES) if route == "it" else set()))
        prof = simulate(spec, Schedule((dose,)), params, times)
        for k, sid in enumerate(ids):
            rows.append(_dose_row(sid, 10.0, route, arm, wt[k], diam[k], rate=10.0 if route == "iv" else None))
            for j, t in enumerate(times):
                for output, sd, lloq in (("plasma", 0.15, PLASMA_LLOQ), ("tumor", 0.25, None)):
                    if output == "tumor" and (route != "it" or t not in BIOPSY_TIMES):
                        continue
                    if output == "plasma" and t not in PLASMA_TIMES:
                        continue
                    value = prof.outputs[output][k, j] * np.exp(rng.normal(0, sd))
                    rows.append(_obs_row(sid, t, output, value, arm, wt[k], diam[k], lloq))
    return pd.DataFrame(rows)


def virus(seed: int = 20261128) -> pd.DataFrame:
    """it_oncolytic_virus on the T-VEC schedule (4 visits): blood copies/mL and lesion diameters, 6 subjects."""
    spec = load_model("it_oncolytic_virus")
    rng = np.random.default_rng(seed)
    params = sample_population(spec, 6, seed=int(rng.integers(2**31)))
    rows = []
    for k in range(6):
        sid, diam = k + 1, float(np.round(rng.uniform(1.0, 5.0), 1))
        one = {name: v[k] for name, v in params.items()} | {"DIAM": diam}
        schedule = tvec_schedule(diam, visits=4)
        times = sorted(set(VIRUS_TIMES) | set(DIAMETER_TIMES))
        prof = simulate(spec, schedule, one, times)
        for d in schedule.doses:
            for t in d.times():
                rows.append(_dose_row(sid, d.amount, "it", "T-VEC", None, diam, time=t))
        for j, t in enumerate(times):
            if t in VIRUS_TIMES:
                value = prof.outputs["virus_blood"][0, j] * np.exp(rng.normal(0, 0.5))
                rows.append(_obs_row(sid, t, "virus_blood", value, "T-VEC", None, diam, VIRUS_LLOQ))
            if t in DIAMETER_TIMES:
                value = prof.outputs["tumor_diameter"][0, j] * (1 + rng.normal(0, 0.05))
                rows.append(_obs_row(sid, t, "tumor_diameter", value, "T-VEC", None, diam, None))
    frame = pd.DataFrame(rows).drop(columns=["WT"])
    return frame.sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable", ignore_index=True)


def _dose_row(sid, amt, route, arm, wt, diam, *, time=0.0, rate=None) -> dict:  # noqa: ANN001
    return {"ID": sid, "TIME": time, "EVID": 1, "AMT": amt, "RATE": rate if rate else "", "ROUTE": route,
            "CMT": "", "DV": "", "BLQ": 0, "ARM": arm, "WT": wt, "DIAM": diam}


def _obs_row(sid, t, output, value, arm, wt, diam, lloq) -> dict:  # noqa: ANN001
    blq = lloq is not None and value < lloq
    return {"ID": sid, "TIME": float(t), "EVID": 0, "AMT": "", "RATE": "", "ROUTE": "", "CMT": output,
            "DV": float(f"{(lloq if blq else value):.4g}"), "BLQ": int(blq), "ARM": arm, "WT": wt, "DIAM": diam}


def write_all(folder: Path) -> list[Path]:
    """Write both example trials (and their units sidecars) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, frame, units in (
        ("example_it_vs_iv", it_vs_iv(), 'TIME = "h"\nAMT = "mg"\nRATE = "mg/h"\n\n[DV]\nplasma = "ug/mL"\ntumor = "ug/g"\n'),
        ("example_virus", virus(), 'TIME = "h"\nAMT = "PFU"\n\n[DV]\nvirus_blood = "copies/mL"\ntumor_diameter = "cm"\n'),
    ):
        path = folder / f"{name}.csv"
        frame.to_csv(path, index=False)
        (folder / f"{name}.units.toml").write_text(units)
        out.append(path)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "data"
    for p in write_all(target):
        print(f"wrote {p}")
