"""itpk: intratumoral-immunotherapy dose and pharmacokinetics modeller."""

from itpk.errors import DatasetError, FitError, ItpkError, ModelSpecError, ScheduleError
from itpk.spec import ModelSpec, load_model

__version__ = "0.1.0"

__all__ = [
    "DatasetError",
    "FitError",
    "ItpkError",
    "ModelSpec",
    "ModelSpecError",
    "ScheduleError",
    "__version__",
    "load_model",
]
