"""Model specifications: the frozen, validated form of a model file.

``load_model`` is the only place that finds and reads model files (TOML, see
SPEC.md §3). Everything downstream (simulation, fitting, reports) works from a
:class:`ModelSpec`; a parameter's TOML name is its identity everywhere.
"""

from __future__ import annotations

import hashlib
import keyword
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from itpk.errors import ModelSpecError
from itpk.expr import CONSTANTS, FUNCTIONS, Expr, parse_expr, state_degree

AGENTS = ("small_molecule", "cytokine", "antibody", "peptide", "virus", "generic")
ERROR_MODELS = ("additive", "proportional", "combined", "log")
ELIMINATION = "out"
PRIORS: dict[str, tuple[str, ...]] = {
    "lognormal": ("median", "sigma"),
    "normal": ("mu", "sigma"),
    "halfnormal": ("sigma",),
    "beta": ("alpha", "beta"),
    "uniform": ("lower", "upper"),
    "logitnormal": ("median", "sigma"),
}
DEFAULT_IIV_CV = 0.3
_RESERVED = frozenset(FUNCTIONS) | frozenset(CONSTANTS) | {ELIMINATION}


@dataclass(frozen=True)
class Prior:
    """A prior distribution of a population parameter.

    ``lognormal`` and ``logitnormal`` take the median (in the parameter's unit)
    and ``sigma`` on the log/logit scale; the others take their usual arguments.
    """

    dist: str
    args: Mapping[str, float]

    def __post_init__(self) -> None:
        if self.dist not in PRIORS:
            raise ModelSpecError(f"prior distribution {self.dist!r} is unknown; allowed: {', '.join(PRIORS)}")
        want = set(PRIORS[self.dist])
        if set(self.args) != want:
            raise ModelSpecError(
                f"prior {self.dist!r} takes {', '.join(sorted(want))}; found {', '.join(sorted(self.args)) or 'nothing'}"
            )
        for key, value in self.args.items():
            if not math.isfinite(value):
                raise ModelSpecError(f"prior {self.dist!r}: {key} = {value} is not a finite number")
        positive = {"sigma", "alpha", "beta"} | ({"median"} if self.dist == "lognormal" else set())
        for key in positive & set(self.args):
            if self.args[key] <= 0:
                raise ModelSpecError(f"prior {self.dist!r}: {key} must be > 0, found {self.args[key]}")
        if self.dist == "uniform" and not self.args["lower"] < self.args["upper"]:
            raise ModelSpecError(f"prior 'uniform': lower must be < upper, found {dict(self.args)}")
        if self.dist == "logitnormal" and not 0 < self.args["median"] < 1:
            raise ModelSpecError(f"prior 'logitnormal': median must be in (0, 1), found {self.args['median']}")

    def describe(self) -> str:
        """Short text such as ``lognormal(median=2, sigma=0.5)``."""
        inner = ", ".join(f"{k}={v:g}" for k, v in self.args.items())
        return f"{self.dist}({inner})"


@dataclass(frozen=True)
class Parameter:
    """A model parameter with its default, unit and (optional) prior and IIV.

    Attributes
    ----------
    iiv_cv : float or None
        Between-subject variability as a coefficient of variation (0.3 = 30%),
        log-normal (logit-normal for fractions); None when the parameter has none.
    fraction : bool
        True for parameters bounded to [0, 1] (leak, extraction, bioavailability).
    """

    name: str
    value: float
    unit: str
    description: str = ""
    prior: Prior | None = None
    iiv_cv: float | None = None
    fraction: bool = False
    fixed: bool = False
    source: str = ""

    @property
    def iiv_scale(self) -> str:
        """``log`` or ``logit``: the scale a fit puts this parameter's between-subject η on.

        A lognormal prior means log and a logitnormal one logit, whatever ``fraction`` says;
        otherwise fractions and beta priors are logit, the rest log (:func:`itpk.inference.build_model`).
        """
        dist = self.prior.dist if self.prior is not None else None
        if dist in ("lognormal", "logitnormal"):
            return "log" if dist == "lognormal" else "logit"
        return "logit" if self.fraction or dist == "beta" else "log"

    def __post_init__(self) -> None:
        problems = _parameter_problems(self.value, prior=self.prior, iiv_cv=self.iiv_cv, fraction=self.fraction, fixed=self.fixed)
        if problems:
            raise ModelSpecError(f"parameter {self.name!r}: " + "; ".join(problems))


def _parameter_problems(value: float, *, prior: Prior | None = None, iiv_cv: float | None = None,
                       fraction: bool = False, fixed: bool = False) -> list[str]:
    """Every reason a parameter with these fields is invalid (empty if none), one text each."""
    if not math.isfinite(value):
        return [f"value {value} is not a finite number"]
    problems = []
    if fraction and not 0 <= value <= 1:
        problems.append(f"a fraction must be in [0, 1], found {value}")
    if iiv_cv is not None and not (iiv_cv > 0 and math.isfinite(iiv_cv)):
        problems.append(f"iiv must be a finite CV > 0, found {iiv_cv}")
    if fixed and iiv_cv is not None:
        problems.append("a fixed parameter has no between-subject variability (drop iiv or fixed)")
    if prior is not None:
        support = "" if fraction and not 0 <= value <= 1 else _support_problem(prior, value)  # a fraction out of [0, 1]: said once
        problems += [p for p in (_prior_problem(prior, fraction, iiv_cv), support) if p]
    return problems


def _prior_problem(prior: Prior, fraction: bool, iiv_cv: float | None) -> str:
    """Why ``prior`` cannot describe the parameter ('' if it can): its support must be the parameter's domain."""
    dist, args = prior.dist, prior.args
    lower = {"normal": -math.inf, "uniform": args.get("lower", 0.0)}.get(dist, 0.0)
    upper = {"beta": 1.0, "logitnormal": 1.0, "uniform": args.get("upper", math.inf)}.get(dist, math.inf)
    if fraction and not (lower >= 0.0 and upper <= 1.0):
        return f"a fraction needs a prior on [0, 1] (beta, logitnormal, or uniform within [0, 1]), found {prior.describe()}"
    if not fraction and dist in ("beta", "logitnormal"):
        return f"a {dist} prior bounds the parameter to (0, 1): mark it fraction = true, or use a prior on (0, inf)"
    if iiv_cv is not None and lower < 0.0:
        return (f"between-subject variability is log-normal, so the prior must keep the parameter positive "
                f"(lognormal, halfnormal, or uniform with lower >= 0), found {prior.describe()}")
    return ""


def _support_problem(prior: Prior, value: float) -> str:
    """Why ``value`` lies outside the support of ``prior`` ('' if inside): a fit could never return it."""
    dist, args = prior.dist, prior.args
    inside, support = {
        "lognormal": (value > 0, "> 0"),
        "halfnormal": (value >= 0, ">= 0"),
        "beta": (0 < value < 1, "in (0, 1)"),
        "logitnormal": (0 < value < 1, "in (0, 1)"),
        "uniform": (args.get("lower", -math.inf) <= value <= args.get("upper", math.inf),
                    f"in [{args.get('lower', -math.inf):g}, {args.get('upper', math.inf):g}]"),
    }.get(dist, (True, ""))
    if inside:
        return ""
    return f"value {value:g} is outside its prior {prior.describe()}, whose values are {support}"


@dataclass(frozen=True)
class Covariate:
    """A subject-level input (weight, lesion diameter...) with its default."""

    name: str
    value: float
    unit: str
    description: str = ""
    time_varying: bool = False


@dataclass(frozen=True)
class Derived:
    """A named quantity computed from parameters and covariates (e.g. ``V_T``)."""

    name: str
    expr: Expr
    unit: str = ""
    description: str = ""


@dataclass(frozen=True)
class Compartment:
    """A state of the ODE system: an amount, with an optional volume expression."""

    name: str
    amount_unit: str
    volume: Expr | None = None
    description: str = ""
    initial: Expr | None = None


@dataclass(frozen=True)
class Flow:
    """A first-order transfer: amount/time = ``rate`` × amount in ``source``."""

    source: str
    target: str
    rate: Expr

    @property
    def key(self) -> str:
        return f"{self.source} -> {self.target}"


@dataclass(frozen=True)
class Route:
    """Where a dose given by this route goes: compartment -> fraction expression.

    The first compartment of ``into`` is the route's site (the injected lesion of ``it``).
    ``sites`` lists the compartments a dose row may send the route to instead (``ROUTE=it``,
    ``CMT=lesion2``: SPEC §2); there the site's fraction goes into that compartment and the
    other fractions (a leak into blood) are unchanged. Default: the site only.
    """

    name: str
    into: Mapping[str, Expr]
    description: str = ""
    sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.into:
            raise ModelSpecError(f"route {self.name!r}: 'into' is empty")
        site = self.site
        object.__setattr__(self, "sites", tuple(dict.fromkeys((site, *self.sites))))
        others = sorted(set(self.sites) & (set(self.into) - {site}))
        if others:
            raise ModelSpecError(f"route {self.name!r}: sites {', '.join(others)} already receive another fraction of the dose "
                                 f"(the route's own site is {site}, the first compartment of 'into')")

    @property
    def site(self) -> str:
        """The compartment a dose by this route goes to unless CMT names another of ``sites``."""
        return next(iter(self.into))

    def into_at(self, site: str | None) -> Mapping[str, Expr]:
        """``into`` with the site's fraction sent to ``site`` (one of ``sites``; None: the route's own)."""
        if site is None or site == self.site:
            return self.into
        if site not in self.sites:
            raise ModelSpecError(f"route {self.name!r} cannot send a dose to {site!r}; allowed: {', '.join(self.sites)}")
        return {(site if cmt == self.site else cmt): frac for cmt, frac in self.into.items()}


@dataclass(frozen=True)
class Output:
    """A measurable quantity: an expression of amounts and parameters, with unit and error model."""

    name: str
    expr: Expr
    unit: str
    error: str = "proportional"
    description: str = ""

    def __post_init__(self) -> None:
        if self.error not in ERROR_MODELS:
            raise ModelSpecError(f"output {self.name!r}: error {self.error!r} is unknown; allowed: {', '.join(ERROR_MODELS)}")


@dataclass(frozen=True)
class ModelSpec:
    """A validated model. Build it with :func:`load_model` (or :func:`parse_model`)."""

    name: str
    description: str
    agent: str
    time_unit: str
    compartments: tuple[Compartment, ...]
    parameters: Mapping[str, Parameter]
    covariates: Mapping[str, Covariate]
    derived: Mapping[str, Derived]
    flows: tuple[Flow, ...]
    odes: Mapping[str, Expr]
    routes: Mapping[str, Route]
    outputs: Mapping[str, Output]
    references: tuple[str, ...] = ()
    exposure: Mapping[str, str] = field(default_factory=dict)
    source: str = "<memory>"
    text: str = field(default="", repr=False)
    conversions: tuple[str, ...] = ()  # unit conversions put into expressions (itpk.dimensions)
    path: str = field(default="", compare=False)  # absolute path of the file load_model read ('' for a model built in memory)

    @property
    def state_names(self) -> tuple[str, ...]:
        """Compartment names in their declared (1-based CMT) order."""
        return tuple(c.name for c in self.compartments)

    @property
    def is_linear(self) -> bool:
        """True when the system is made of first-order flows only and outputs are linear in amounts."""
        states = frozenset(self.state_names)
        return not self.odes and all(
            (d := state_degree(o.expr, states)) is not None and d <= 1 for o in self.outputs.values()
        )

    @property
    def text_toml(self) -> str:
        """The resolved model (``extends`` merged) as a TOML file that loads back to the same model."""
        import json

        from itpk.tomlio import dumps

        return dumps(json.loads(self.text))

    @property
    def sha256(self) -> str:
        """SHA-256 of the resolved model text (with any ``extends`` chain)."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    def index(self, compartment: str) -> int:
        """0-based position of a compartment."""
        return self.state_names.index(compartment)

    def dose_into(self, target: Any) -> Mapping[str, Expr]:
        """Compartment -> fraction expression for a dose target (:class:`itpk.events.Target`).

        A compartment takes the whole dose; a route splits it by its ``into``, its site moved
        to ``target.site`` when one is given. Unknown routes, compartments and sites raise
        :class:`ModelSpecError` naming what is allowed.
        """
        if target.compartment:
            if target.name not in self.state_names:
                raise ModelSpecError(f"model {self.name!r} has no compartment {target.name!r}; compartments: {', '.join(self.state_names)}")
            return {target.name: _WHOLE_DOSE}
        route = self.routes.get(target.name)
        if route is None:
            raise ModelSpecError(f"model {self.name!r} has no route {target.name!r}; routes: {', '.join(self.routes)}")
        return route.into_at(target.site)


_WHOLE_DOSE = parse_expr(1, where="a dose into one compartment")
_TOP_KEYS = (
    "name", "description", "agent", "time_unit", "references", "extends",
    "compartments", "parameters", "covariates", "derived", "flows", "odes", "routes", "outputs", "exposure",
)
EXPOSURE_ROLES = {"systemic": "plasma", "local": "tumor", "abscopal": "lesion2"}
_PARAM_KEYS = ("value", "unit", "description", "prior", "iiv", "fraction", "fixed", "source")
_COV_KEYS = ("value", "unit", "description", "time_varying")
_CMT_KEYS = ("amount_unit", "volume", "description", "initial")
_OUT_KEYS = ("expr", "unit", "error", "description")
_ROUTE_KEYS = ("into", "description", "sites")
_DERIVED_KEYS = ("expr", "unit", "description")


def builtin_models() -> list[str]:
    """Names of the model files shipped with itpk, sorted."""
    root = resources.files("itpk.models")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_model(name_or_path: str | Path) -> ModelSpec:
    """Load a model by built-in name or by path to a TOML file.

    Parameters
    ----------
    name_or_path
        A built-in model name (``itpk models list``) or a path to a ``.toml`` file.

    Raises
    ------
    ModelSpecError
        If the model cannot be found or the file is invalid; the message names
        the file, the key and the offending text.

    Examples
    --------
    >>> spec = load_model("one_cpt_iv")
    >>> sorted(spec.parameters)
    ['CL', 'V']
    """
    raw, source, inherited = _read_resolved(str(name_or_path), seen=())
    spec = parse_model(raw, source=source, units=source != f"models/{name_or_path}.toml", inherited=inherited)
    return replace(spec, path=_file_path(str(name_or_path)))


def _file_path(name_or_path: str) -> str:
    """The absolute path of the file ``_read_text`` reads for ``name_or_path``."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        return str(path.resolve())
    resource = resources.files("itpk.models") / f"{name_or_path}.toml"
    try:
        return str(Path(str(resource)).resolve())
    except (OSError, ValueError):
        return str(resource)


def _read_resolved(name_or_path: str, seen: tuple[str, ...]) -> tuple[dict[str, Any], str, list[str]]:
    """Read a model file and merge the chain of ``extends`` it names.

    Also returns the problems of the merge itself (a child that changes a parameter's unit but keeps
    the parent's prior), so that they are listed with the rest of the file's problems.
    """
    text, source = _read_text(name_or_path)
    if source in seen:
        raise ModelSpecError(f"{source}: 'extends' forms a cycle: {' -> '.join((*seen, source))}")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelSpecError(f"{source}: not valid TOML ({exc})") from None
    parent = raw_parent = raw.pop("extends", None)
    if parent is None:
        return raw, source, []
    if not isinstance(parent, str):
        raise ModelSpecError(f"{source}: 'extends' must be a model name or path, found {parent!r}")
    here = Path(source).parent  # a relative path is relative to the file that names it, as a name is
    if not parent.endswith(".toml") and (here / f"{parent}.toml").is_file():
        parent = str(here / f"{parent}.toml")
    elif parent.endswith(".toml") and not Path(parent).expanduser().is_absolute() and not _builtin(name_or_path):
        parent = str(here / parent)
    try:
        base, base_source, problems = _read_resolved(parent, seen=(*seen, source))
    except ModelSpecError as exc:
        if not str(exc).startswith(("cannot read model file", "unknown model")):  # the parent's own problems name it
            raise
        raise ModelSpecError(f"{source}: extends {raw_parent!r}: {exc}") from None
    return _merge(base, raw), source, problems + _prior_unit_problems(base, raw, base_source)


def _prior_unit_problems(base: Mapping[str, Any], child: Mapping[str, Any], parent: str) -> list[str]:
    """Parameters whose unit ``child`` changes while it keeps the prior of ``base``, meant in the old unit.

    Such a prior is refused rather than converted: a lognormal median or a uniform bound would scale
    with the unit, but the child may well mean another prior anyway; it must say so in its own unit.
    """
    params, inherited = child.get("parameters"), base.get("parameters")
    if not isinstance(params, dict) or not isinstance(inherited, dict):
        return []
    problems = []
    for name, entry in params.items():
        old = inherited.get(name)
        if not (isinstance(entry, dict) and isinstance(old, dict)) or "unit" not in entry or "prior" in entry:
            continue
        prior = old.get("prior")
        if prior is None or not _unit_changed(old.get("unit"), entry["unit"]):
            continue
        shown = ", ".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v:g}" if isinstance(v, (int, float)) else f"{k} = {v!r}"
                          for k, v in prior.items()) if isinstance(prior, dict) else repr(prior)
        problems.append(
            f"[parameters] {name!r}: unit changed from {old.get('unit')!r} (in {parent}, which this file extends) to "
            f"{entry['unit']!r}, but the inherited prior {{ {shown} }} is in {old.get('unit')}; give the prior in {entry['unit']} "
            f"next to the new unit (prior = {{ dist = ..., ... }})"
        )
    return problems


def _unit_changed(old: Any, new: Any) -> bool:
    """Whether two unit texts differ in meaning (``L/h`` and ``L / h`` do not; ``mL/min`` and ``L/h`` do)."""
    if not (isinstance(old, str) and isinstance(new, str)):
        return old != new
    if old.replace(" ", "") == new.replace(" ", ""):
        return False
    from itpk.units import parse_unit

    try:
        a, b = parse_unit(old), parse_unit(new)
        return (1 * a).dimensionality != (1 * b).dimensionality or not math.isclose((1 * a).to(b).magnitude, 1.0, rel_tol=1e-12)
    except Exception:  # noqa: BLE001 - DatasetError or pint's own errors: taken as a change (the unit is reported anyway)
        return True


def _builtin(name_or_path: str) -> bool:
    """Whether :func:`_read_text` reads ``name_or_path`` from the model library (not from a file)."""
    return not (name_or_path.endswith(".toml") or Path(name_or_path).is_file())


def _read_text(name_or_path: str) -> tuple[str, str]:
    path = Path(name_or_path)
    if not _builtin(name_or_path):
        try:
            return path.read_text(encoding="utf-8-sig"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelSpecError(f"cannot read model file {str(path)!r}: {exc}") from None
    names = builtin_models()
    if name_or_path not in names:
        raise ModelSpecError(f"unknown model {name_or_path!r}; built-in models: {', '.join(names)} (or a path to a .toml file)")
    resource = resources.files("itpk.models") / f"{name_or_path}.toml"
    return resource.read_text(encoding="utf-8"), f"models/{name_or_path}.toml"


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge tables (child wins key by key); arrays and values are replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_model(raw: Mapping[str, Any], *, source: str = "<memory>", units: bool = True, inherited: Sequence[str] = ()) -> ModelSpec:
    """Validate a model given as a parsed TOML mapping; every problem is reported at once.

    Checks that do not depend on a broken part still run when other parts are broken (the units of
    the expressions that parsed, the route fractions and rates that can be evaluated), so one message
    lists every problem the file has.

    Parameters
    ----------
    raw
        The model file's tables (``extends`` already merged).
    source
        Where it came from, for messages.
    units
        Work out, check and convert the units of every expression
        (:func:`itpk.dimensions.check_units`). Only the built-in models skip it
        (a test checks that it changes nothing there), since pint takes ~1 s to load.
    inherited
        Problems found while merging the ``extends`` chain, listed with the others.
    """
    return _Parser(raw, source, units, inherited).parse()


class _Parser:
    """Collects every problem in a model file, then raises one ModelSpecError."""

    def __init__(self, raw: Mapping[str, Any], source: str, units: bool = True, inherited: Sequence[str] = ()) -> None:
        self.raw = raw
        self.source = source
        self.units = units
        self.dropped: set[str] = set()  # declared names refused for their own problems
        self.standins: dict[str, Parameter] = {}  # refused parameters with a usable unit: their units are still checked
        self.declared_outputs = 0
        self.problems: list[str] = list(inherited)

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def parse(self) -> ModelSpec:
        raw = self.raw
        for key in raw:
            if key not in _TOP_KEYS:
                self.fail(f"key {key!r}", f"unknown top-level key; allowed: {', '.join(_TOP_KEYS)}")
        name = self._string(raw, "name", required=True, where="key 'name'")
        agent = self._string(raw, "agent", where="key 'agent'") or "generic"
        if agent not in AGENTS:
            self.fail("key 'agent'", f"{agent!r} is unknown; allowed: {', '.join(AGENTS)}")
        compartments = self._compartments()
        parameters = self._parameters()
        covariates = self._covariates()
        derived = self._derived()
        states = tuple(c.name for c in compartments)
        self._check_names(states, {**parameters, **self.standins}, covariates, derived)
        inputs = set(parameters) | set(covariates) | self.dropped
        self._check_derived(derived, inputs)
        known = inputs | set(derived)
        for c in compartments:
            self._unknown_names(c.initial, known, f"[compartments] {c.name!r} initial (may use parameters, covariates, derived quantities)")
            self._unknown_names(c.volume, known, f"[compartments] {c.name!r} volume")
        flows = self._flows(states, known)
        odes = self._odes(states, known)
        routes = self._routes(states, known)
        outputs = self._outputs(states, known)
        if not compartments:
            self.fail("[compartments]", "a model needs at least one compartment")
        if not self.declared_outputs:
            self.fail("[outputs]", "a model needs at least one output")
        exposure = self._exposure(outputs)
        description = self._string(raw, "description", where="key 'description'")
        time_unit = self._string(raw, "time_unit", required=True, where="key 'time_unit' (e.g. \"h\")")
        references = self._references(raw.get("references", []))
        self._check_positive(parameters, compartments, flows)
        # From here on the checks also run on what parsed of a broken file (refused parameters stand in
        # with their units only), so that one message lists every problem; a broken file is never returned.
        spec = ModelSpec(
            name=name,
            description=description,
            agent=agent,
            time_unit=time_unit,
            compartments=compartments,
            parameters={**parameters, **self.standins},
            covariates=covariates,
            derived=derived,
            flows=flows,
            odes=odes,
            routes=routes,
            outputs=outputs,
            references=references,
            exposure=exposure,
            source=self.source,
            text=_canonical_text(raw),
        )
        skip_names, skip_wheres = set(self.dropped), set()  # not evaluated: refused, or maybe off by a unit factor
        if self.units:
            spec, names, wheres = self._check_units(spec, time_unit)
            skip_names |= names
            skip_wheres |= wheres
        if "*" not in skip_wheres:
            self.problems += _value_problems(spec, skip_names, skip_wheres)
        self._raise()
        return spec

    def _raise(self) -> None:
        if self.problems:
            raise ModelSpecError(f"{self.source}: invalid model file\n  - " + "\n  - ".join(self.problems))

    def _check_units(self, spec: ModelSpec, time_unit: str) -> tuple[ModelSpec, set[str], set[str]]:
        """Unit texts and the units of every expression that parsed.

        Also returns the names whose unit does not parse and the places whose units are wrong: their
        values may be off by a unit factor, so they are not evaluated.
        """
        from itpk.dimensions import check_units, unit_problems

        texts = self._unit_texts(spec.compartments, spec.parameters, spec.covariates, spec.derived, spec.outputs)
        time_ok = bool(time_unit) and isinstance(self.raw.get("time_unit"), str)
        problems = unit_problems(texts, time_unit if time_ok else None)
        names = {where.split("'")[1] for where in texts if where.startswith(("[parameters]", "[covariates]", "[derived]"))
                 and any(p.startswith(f"{where}:") for p in problems)}
        self.problems += problems
        broken = bool(self.problems)
        try:
            analysis = check_units(spec)
        except Exception:  # a broken part in a way not foreseen: say what was not checked
            if not broken:
                raise
            self.problems.append("the units of expressions, route fractions, rates and volumes are checked once these are fixed")
            return spec, names, {"*"}
        self.problems += analysis.problems
        return analysis.spec, names, {p.split(": ", 1)[0] for p in analysis.problems}

    def _check_positive(self, parameters: Mapping[str, Parameter], compartments: tuple[Compartment, ...],
                        flows: tuple[Flow, ...]) -> None:
        """A parameter that is by itself a compartment's volume (> 0) or a first-order rate constant (>= 0)."""
        uses: dict[str, list[str]] = {}
        for c in compartments:
            if c.volume is not None and c.volume.text.strip() in parameters:
                uses.setdefault(c.volume.text.strip(), []).append(f"the volume of compartment {c.name!r}")
        for f in flows:
            if f.rate.text.strip() in parameters:
                uses.setdefault(f.rate.text.strip(), []).append(f"the first-order rate constant of [flows] {f.key!r}")
        for name, roles in uses.items():
            value, volume = parameters[name].value, any(r.startswith("the volume") for r in roles)
            if value <= 0 if volume else value < 0:
                self.fail(f"[parameters] {name!r}", f"value {value:g} must be {'> 0' if volume else '>= 0'}: it is {' and '.join(roles)}")
                self.dropped.add(name)

    def _references(self, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
            self.fail("key 'references'", f"must be a list of texts (citations), found {value!r}")
            return ()
        return tuple(value)

    @staticmethod
    def _unit_texts(compartments: tuple[Compartment, ...], parameters: Mapping[str, Parameter], covariates: Mapping[str, Covariate],
                    derived: Mapping[str, Derived], outputs: Mapping[str, Output]) -> dict[str, str]:
        """Where → unit text of every declared unit (an empty covariate or derived unit means 'not given')."""
        texts = {f"[compartments] {c.name!r} amount_unit": c.amount_unit for c in compartments if c.amount_unit}
        texts.update({f"[parameters] {p.name!r} unit": p.unit for p in parameters.values()})
        texts.update({f"[covariates] {c.name!r} unit": c.unit for c in covariates.values() if c.unit})
        texts.update({f"[derived] {d.name!r} unit": d.unit for d in derived.values() if d.unit})
        texts.update({f"[outputs] {o.name!r} unit": o.unit for o in outputs.values()})
        return texts

    # -- small readers -------------------------------------------------------------
    def _string(self, table: Mapping[str, Any], key: str, *, where: str, required: bool = False) -> str:
        value = table.get(key)
        if value is None:
            if required:
                self.fail(where, "is required")
            return ""
        if not isinstance(value, str):
            self.fail(where, f"must be text, found {value!r}")
            return ""
        return value

    def _table(self, key: str) -> Mapping[str, Any]:
        value = self.raw.get(key, {})
        if not isinstance(value, dict):
            self.fail(f"[{key}]", f"must be a table, found {value!r}")
            return {}
        return value

    def _entry(self, section: str, name: str, value: Any, allowed: tuple[str, ...], shorthand: str) -> dict[str, Any]:
        """An entry is a table, or a bare value meaning ``{shorthand = value}``."""
        if not isinstance(value, dict):
            return {shorthand: value}
        for key in value:
            if key not in allowed:
                self.fail(f"[{section}] {name!r}", f"unknown key {key!r}; allowed: {', '.join(allowed)}")
        return value

    def _expr(self, text: Any, where: str) -> Expr | None:
        try:
            return parse_expr(text, where=where)
        except ModelSpecError as exc:
            self.problems.append(str(exc))
            return None

    def _flag(self, entry: Mapping[str, Any], key: str, where: str) -> bool:
        value = entry.get(key, False)
        if not isinstance(value, bool):
            self.fail(f"{where} {key}", f"must be true or false, found {value!r}")
            return False
        return value

    def _number(self, value: Any, where: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, f"must be a number, found {value!r}")
            return None
        return float(value)

    def _unknown_names(self, expr: Expr | None, allowed: set[str], where: str) -> None:
        if expr is None:
            return
        unknown = sorted(expr.names - allowed)
        if unknown:
            self.fail(
                where,
                f"unknown name(s) {', '.join(unknown)} in {expr.text!r}; known here: {', '.join(sorted(allowed)) or 'none'}",
            )

    # -- sections --------------------------------------------------------------------
    def _compartments(self) -> tuple[Compartment, ...]:
        out = []
        for name, value in self._table("compartments").items():
            entry = self._entry("compartments", name, value, _CMT_KEYS, "amount_unit")
            where = f"[compartments] {name!r}"
            unit = entry.get("amount_unit")
            if not isinstance(unit, str) or not unit:
                self.fail(where, f"needs amount_unit (e.g. \"mg\"), found {unit!r}")
                unit = ""
            volume = self._expr(entry["volume"], f"{where} volume") if "volume" in entry else None
            initial = self._expr(entry["initial"], f"{where} initial") if "initial" in entry else None
            out.append(Compartment(name, unit, volume, str(entry.get("description", "")), initial))
        return tuple(out)

    def _parameters(self) -> dict[str, Parameter]:
        out = {}
        for name, value in self._table("parameters").items():
            entry = self._entry("parameters", name, value, _PARAM_KEYS, "value")
            where = f"[parameters] {name!r}"
            number = self._number(entry.get("value"), f"{where} value")
            unit = entry.get("unit")
            if not isinstance(unit, str) or not unit.strip():  # "" would pass as dimensionless, and blame a flow later
                self.fail(where, f"needs a unit (text; \"1\" for dimensionless), found {unit!r}")
            prior = self._prior(entry.get("prior"), where)
            iiv = self._iiv(entry.get("iiv"), where)
            fraction, fixed = self._flag(entry, "fraction", where), self._flag(entry, "fixed", where)
            problems = [] if number is None else _parameter_problems(number, prior=prior, iiv_cv=iiv, fraction=fraction, fixed=fixed)
            for problem in problems:
                self.fail(where, problem)
            if number is None or problems or not isinstance(unit, str):
                self.dropped.add(name)  # reported once here, not again as unknown wherever it is used
                if isinstance(unit, str):  # its unit is still checked wherever it is used
                    self.standins[name] = Parameter(name, 1.0, unit)
                continue
            out[name] = Parameter(
                name, number, unit, str(entry.get("description", "")), prior, iiv, fraction, fixed, str(entry.get("source", "")),
            )
        return out

    def _prior(self, value: Any, where: str) -> Prior | None:
        if value is None:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("dist"), str):
            self.fail(f"{where} prior", f"must be a table with 'dist' and its arguments, found {value!r}")
            return None
        args = {k: v for k, v in value.items() if k != "dist"}
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in args.values()):
            self.fail(f"{where} prior", f"arguments must be numbers, found {args!r}")
            return None
        try:
            return Prior(value["dist"], {k: float(v) for k, v in args.items()})
        except ModelSpecError as exc:
            self.fail(f"{where} prior", str(exc))
            return None

    def _iiv(self, value: Any, where: str) -> float | None:
        if value is None or value is False:
            return None
        if value is True:
            return DEFAULT_IIV_CV
        number = self._number(value, f"{where} iiv")
        if number is not None and number <= 0:
            self.fail(f"{where} iiv", f"must be true/false or a CV > 0, found {value!r}")
            return None
        return number

    def _covariates(self) -> dict[str, Covariate]:
        out = {}
        for name, value in self._table("covariates").items():
            entry = self._entry("covariates", name, value, _COV_KEYS, "value")
            where = f"[covariates] {name!r}"
            if isinstance(entry.get("value"), str):  # an expression: SPEC §3's own example writes one here
                self.fail(f"{where} value", f"found {entry['value']!r}: a covariate is a number read from the data (this is its "
                                            f"default); an expression belongs in [derived], e.g. {name} = {{ expr = {entry['value']!r} }}")
                continue
            number = self._number(entry.get("value"), f"{where} value")
            unit = entry.get("unit", "")
            if number is not None:
                out[name] = Covariate(name, number, str(unit), str(entry.get("description", "")), self._flag(entry, "time_varying", where))
        return out

    def _derived(self) -> dict[str, Derived]:
        out = {}
        for name, value in self._table("derived").items():
            entry = self._entry("derived", name, value, _DERIVED_KEYS, "expr")
            expr = self._expr(entry.get("expr"), f"[derived] {name!r}")
            if expr is not None:
                out[name] = Derived(name, expr, str(entry.get("unit", "")), str(entry.get("description", "")))
        return out

    def _check_names(self, states: tuple[str, ...], *groups: Mapping[str, Any]) -> None:
        seen: dict[str, str] = {s: "compartment" for s in states}
        labels = ("parameter", "covariate", "derived quantity")
        for label, group in zip(labels, groups, strict=True):
            for name in group:
                if name in seen:
                    self.fail(f"name {name!r}", f"declared both as {seen[name]} and as {label}")
                seen[name] = label
        for name, label in seen.items():
            if not (name.isascii() and name.isidentifier()) or name.startswith("_") or keyword.iskeyword(name):
                self.fail(f"{label} {name!r}", "names must be identifiers of ASCII letters, digits and '_', not starting with '_' "
                                               "and not a Python keyword (expressions read names through Python's parser)")
            if name in _RESERVED:
                self.fail(f"{label} {name!r}", f"is reserved ({', '.join(sorted(_RESERVED))})")

    def _check_derived(self, derived: Mapping[str, Derived], inputs: set[str]) -> None:
        known = set(inputs)
        for name, item in derived.items():
            self._unknown_names(item.expr, known, f"[derived] {name!r} (derived quantities may use parameters, covariates and derived quantities above them)")
            known.add(name)

    def _flows(self, states: tuple[str, ...], known: set[str]) -> tuple[Flow, ...]:
        out = []
        seen: dict[tuple[str, str], str] = {}
        for key, value in self._table("flows").items():
            where = f"[flows] {key!r}"
            parts = [p.strip() for p in key.split("->")]
            if len(parts) != 2:
                self.fail(where, "key must read 'source -> target'")
                continue
            source, target = parts
            if (source, target) in seen:  # 'a -> b' and 'a->b': one flow written twice, which would add up silently
                self.fail(where, f"the same flow as {seen[source, target]!r}; write each flow once")
                continue
            seen[source, target] = key
            if source not in states:
                self.fail(where, f"source {source!r} is not a compartment; compartments: {', '.join(states)}")
            if target not in states and target != ELIMINATION:
                self.fail(where, f"target {target!r} is not a compartment or '{ELIMINATION}'; compartments: {', '.join(states)}")
            if source == target:
                self.fail(where, "a flow cannot go from a compartment to itself")
            rate = self._expr(value, where)
            amounts = sorted(rate.names & set(states)) if rate is not None else []
            if amounts:
                self.fail(where, f"a first-order rate constant may not use amounts ({', '.join(amounts)} in {rate.text!r}); "
                                 f"write such a term in [odes]")
            unknown = sorted(rate.names - known - set(states)) if rate is not None else []
            if unknown:  # amounts are not known here either, but are reported above as what they are
                self.fail(where, f"unknown name(s) {', '.join(unknown)} in {rate.text!r}; known here: {', '.join(sorted(known)) or 'none'}")
            if rate is not None and not amounts:
                out.append(Flow(source, target, rate))
        return tuple(out)

    def _odes(self, states: tuple[str, ...], known: set[str]) -> dict[str, Expr]:
        out = {}
        for name, value in self._table("odes").items():
            where = f"[odes] {name!r}"
            if name not in states:
                self.fail(where, f"is not a compartment; compartments: {', '.join(states)}")
            expr = self._expr(value, where)
            self._unknown_names(expr, known | set(states), where)
            if expr is not None:
                out[name] = expr
        return out

    def _routes(self, states: tuple[str, ...], known: set[str]) -> dict[str, Route]:
        out = {}
        for name, value in self._table("routes").items():
            where = f"[routes] {name!r}"
            if not isinstance(value, dict) or not isinstance(value.get("into"), dict) or not value["into"]:
                self.fail(where, "must be a table with 'into = { compartment = fraction, ... }'")
                continue
            self._entry("routes", name, value, _ROUTE_KEYS, "into")
            if not (name.isascii() and name.isidentifier() and name == name.lower()):
                self.fail(where, "route names are lower-case ASCII identifiers (it, ia, iv, sc, po, ...): a dataset's ROUTE matches them")
            into = {}
            for cmt, frac in value["into"].items():
                if cmt not in states:
                    self.fail(where, f"receiving compartment {cmt!r} is unknown; compartments: {', '.join(states)}")
                expr = self._expr(frac, f"{where} into {cmt!r}")
                self._unknown_names(expr, known, f"{where} into {cmt!r}")
                if expr is not None:
                    into[cmt] = expr
            sites = value.get("sites", [])
            if not isinstance(sites, list) or not all(isinstance(c, str) for c in sites):
                self.fail(where, f"sites must be a list of compartment names, found {sites!r}")
                sites = []
            for cmt in sites:
                if cmt not in states:
                    self.fail(where, f"site {cmt!r} is not a compartment; compartments: {', '.join(states)}")
            if not into or len(into) < len(value["into"]):
                continue
            try:  # the known sites still get their own checks, so every problem is listed at once
                out[name] = Route(name, into, str(value.get("description", "")), tuple(c for c in sites if c in states))
            except ModelSpecError as exc:
                self.fail(where, str(exc).removeprefix(f"route {name!r}: "))
        return out

    def _exposure(self, outputs: Mapping[str, Output]) -> dict[str, str]:
        """Which outputs play the systemic, local (injected lesion) and abscopal roles of SPEC §6.

        Defaults: ``plasma``, ``tumor``, ``lesion2``, kept only when the model has them.
        """
        table = self._table("exposure")
        out = {role: name for role, name in EXPOSURE_ROLES.items() if name in outputs}
        for role, name in table.items():
            if role not in EXPOSURE_ROLES:
                self.fail(f"[exposure] {role!r}", f"unknown role; allowed: {', '.join(EXPOSURE_ROLES)}")
            elif name not in outputs:
                self.fail(f"[exposure] {role!r}", f"output {name!r} is unknown; outputs: {', '.join(outputs)}")
            else:
                out[role] = name
        return out

    def _outputs(self, states: tuple[str, ...], known: set[str]) -> dict[str, Output]:
        out = {}
        table = self._table("outputs")
        self.declared_outputs = len(table)
        for name, value in table.items():
            entry = self._entry("outputs", name, value, _OUT_KEYS, "expr")
            where = f"[outputs] {name!r}"
            expr = self._expr(entry.get("expr"), where)
            self._unknown_names(expr, known | set(states), where)
            unit = entry.get("unit")
            if not isinstance(unit, str) or not unit:
                self.fail(where, f"needs a unit, found {unit!r}")
            error = str(entry.get("error", "proportional"))
            if error not in ERROR_MODELS:
                self.fail(where, f"error {error!r} is unknown; allowed: {', '.join(ERROR_MODELS)}")
                error = "proportional"  # reported: the output still counts, and its unit is still checked
            if expr is None or not isinstance(unit, str):
                continue
            out[name] = Output(name, expr, unit, error, str(entry.get("description", "")))
        return out


def _value_problems(spec: ModelSpec, skip_names: set[str], skip_wheres: set[str]) -> list[str]:
    """Route fractions, first-order rates and volumes at the model's own values, checked as every
    simulation checks them (:mod:`itpk.system`): here, when the model loads.

    Only what can be evaluated is checked: expressions of valid parameters, covariates (fractions
    only: a rate or volume may rely on the data's covariates) and the derived quantities made of them,
    none of it in ``skip_names`` (refused names, units that do not parse) or at ``skip_wheres``
    (places whose units are wrong, so that a value may be off by a factor).
    """
    import numpy as np

    from itpk.events import Target
    from itpk.system import Values, input_fractions

    params = {n: np.array([p.value]) for n, p in spec.parameters.items() if n not in skip_names}
    covariates = {n: np.array([c.value]) for n, c in spec.covariates.items() if n not in skip_names}
    envs = []
    for env in (params, {**params, **covariates}):
        with np.errstate(all="ignore"):
            for name, d in spec.derived.items():
                if name not in skip_names and f"[derived] {name!r}" not in skip_wheres and d.expr.names <= set(env):
                    env[name] = np.broadcast_to(np.asarray(d.expr.evaluate(env), dtype=float), (1,))
        envs.append(env)
    own, full = envs

    def value(expr: Expr, env: Mapping[str, np.ndarray]) -> float:
        with np.errstate(all="ignore"):
            return float(np.asarray(expr.evaluate(env), dtype=float).reshape(-1)[0])

    def inputs(expr: Expr) -> str:
        from itpk.system import inputs_of

        shown = ", ".join(f"{n}={spec.parameters[n].value if n in spec.parameters else spec.covariates[n].value:g}"
                          for n in inputs_of(spec, expr.names))
        return f" ({shown})" if shown and expr.text.strip() not in spec.parameters else ""

    problems = []
    for c in spec.compartments:
        where = f"[compartments] {c.name!r} volume"
        if c.volume is None or where in skip_wheres or not c.volume.names <= set(own):
            continue
        v = value(c.volume, own)
        if not (math.isfinite(v) and v > 0):
            problems.append(f"{where}: {c.volume.text} = {v:g} at the model's own values{inputs(c.volume)}; a volume must be > 0")
    for f in spec.flows:
        where = f"[flows] {f.key!r}"
        if where in skip_wheres or not f.rate.names <= set(own):
            continue
        k = value(f.rate, own)
        if not (math.isfinite(k) and k >= 0):
            problems.append(f"{where}: the rate {f.rate.text} = {k:g} at the model's own values{inputs(f.rate)}; "
                            f"a first-order rate constant must be finite and >= 0")
    states = set(spec.state_names)
    values = Values(spec, full, 1)
    for name, route in spec.routes.items():
        where = f"[routes] {name!r}"
        if not set(route.into) <= states or any(w.startswith(f"{where} ") for w in skip_wheres) \
                or not all(e.names <= set(full) for e in route.into.values()):
            continue
        try:
            with np.errstate(all="ignore"):
                input_fractions(values, Target(name))
        except ModelSpecError as exc:
            problems.append(f"{where}: at the model's own values: {exc}")
    return problems


def _canonical_text(raw: Mapping[str, Any]) -> str:
    """A stable text of the resolved model, for hashing and for ``model.toml`` in run directories."""
    import json

    return json.dumps(raw, default=str)  # file order kept: [derived] entries depend on it
