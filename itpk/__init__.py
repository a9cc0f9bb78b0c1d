"""itpk: intratumoral-immunotherapy dose and pharmacokinetics modeller."""

from itpk.errors import DatasetError, FitError, ItpkError, ModelSpecError, ScheduleError
from itpk.spec import ModelSpec, load_model

# Numerical verbs import numpy/scipy/pandas: loaded on first use so `itpk --help` stays instant.
_LAZY = {
    "simulate": "itpk.simulate",
    "Profiles": "itpk.simulate",
    "read_dataset": "itpk.dataset",
    "Dataset": "itpk.dataset",
    "nca": "itpk.nca",
    "compare_routes": "itpk.exposure",
    "route_exposure": "itpk.exposure",
    "regimen": "itpk.events",
    "Schedule": "itpk.events",
    "Dose": "itpk.events",
    "Target": "itpk.events",
    "sample_population": "itpk.population",
}


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy attributes
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'itpk' has no attribute {name!r}")

__version__ = "0.2.0"

__all__ = [
    *_LAZY,
    "DatasetError",
    "FitError",
    "ItpkError",
    "ModelSpec",
    "ModelSpecError",
    "ScheduleError",
    "__version__",
    "load_model",
]
