"""A PyMC model's variables evaluated at many posterior points at once.

NUTS stores only the free parameters; the deterministics (typical values, η, individual
parameters, IPRED) are computed afterwards, for all draws in one call. Computed inside the
sampler they cost a numba compile of the prediction graph (nutpie's "expand" function: 0.2–0.4 s
of a 3.6 s Theoph fit, measured) to save evaluations that, vectorised over draws with the python
linker, take 0.02 s to build and 0.09 s to run for 4 000 Theoph draws.

The graph is vectorised over a leading draw axis (:func:`pytensor.graph.replace.vectorize_graph`):
elementwise closed forms become numpy array operations over (draws, pairs); the eigen and ODE
Ops become loops over draws that call their numba kernels (:class:`DrawLoop`), the ODE Op
without its forward sensitivities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytensor
from pytensor.compile.mode import Mode
from pytensor.graph.basic import Apply, Constant
from pytensor.graph.op import Op
from pytensor.graph.replace import _vectorize_node, vectorize_graph
from pytensor.tensor import as_tensor_variable, tensor

from itpk.linop import LinearPredict
from itpk.odeop import OdePredict

__all__ = ["DrawLoop", "add_deterministics", "data_array", "evaluate", "log_density", "prior_draws"]


class DrawLoop(Op):
    """The Apply node ``core`` evaluated once per draw.

    Inputs with one more (leading) axis than the core node's are sliced draw by draw; the
    others (the design's constants) are passed as they are. The outputs gain the draw axis.
    """

    __props__ = ("core",)

    def __init__(self, core: Apply) -> None:
        self.core = core
        super().__init__()

    def make_node(self, *inputs: Any) -> Apply:
        variables = [as_tensor_variable(x) for x in inputs]
        outputs = [tensor(dtype=o.type.dtype, shape=(None, *o.type.shape)) for o in self.core.outputs]
        return Apply(self, variables, outputs)

    def perform(self, node: Apply, inputs: Sequence[np.ndarray], output_storage: list[list[Any]]) -> None:
        batched = [x.ndim == c.type.ndim + 1 for x, c in zip(inputs, self.core.inputs, strict=True)]
        S = next(x.shape[0] for x, b in zip(inputs, batched, strict=True) if b)
        results: list[list[np.ndarray]] = [[] for _ in output_storage]
        for s in range(S):
            storage: list[list[Any]] = [[None] for _ in self.core.outputs]
            self.core.op.perform(self.core, [x[s] if b else x for x, b in zip(inputs, batched, strict=True)], storage)
            for result, (value,) in zip(results, storage, strict=True):
                result.append(np.asarray(value))
        for out, result in zip(output_storage, results, strict=True):
            out[0] = np.stack(result)


# pytensor's fallback (Blockwise) would turn every input of the node into a variable, but the
# small-system kernels read their design arrays once, as constants, when the node is made
_vectorize_node.register(LinearPredict)(lambda op, node, *inputs: DrawLoop(node).make_node(*inputs))


@_vectorize_node.register(OdePredict)
def _vectorize_ode(op: OdePredict, node: Apply, *inputs: Any) -> Apply:
    """The ODE node draw by draw, without the forward sensitivities nothing here differentiates.

    Unless the sensitivities take part in the error control, the steps (and so y) are the
    same with and without them, bit for bit, at about a quarter of the cost (measured on the
    virus example: 2.6 against 10.1 ms per draw).
    """
    settings = node.inputs[-1]
    if isinstance(settings, Constant) and settings.data[3] == 1.0 and settings.data[4] == 0.0:
        values = settings.data.copy()
        values[3] = 0.0  # settings: rtol, atol, max_steps, sensitivities, sensitivities in the error control, …
        settings = as_tensor_variable(values)
        node = op.make_node(*node.inputs[:-1], settings)
        inputs = (*inputs[:-1], settings)
    return DrawLoop(node).make_node(*inputs)


def evaluate(inputs: Sequence[Any], outputs: Sequence[Any], values: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``outputs`` at each of S points, as arrays of shape ``(S, *output.shape)``.

    Parameters
    ----------
    inputs
        Root variables of the graph (free random variables or value variables).
    outputs
        Variables computed from ``inputs`` only.
    values
        One array per input with shape ``(S, *input.shape)``, in the input's units.
    """
    batched = [tensor(dtype=v.dtype, shape=(None, *v.type.shape), name=v.name) for v in inputs]
    vectorised = vectorize_graph(list(outputs), replace=dict(zip(inputs, batched, strict=True)))
    # the python linker without graph rewrites: one call over all draws, so compiling (or even
    # rewriting: 0.08 s of FAST_COMPILE's 0.1 s on Theoph) would cost more than it saves
    fn = pytensor.function(batched, vectorised, mode=Mode(linker="py", optimizer=None), on_unused_input="ignore")
    results = fn(*[np.asarray(v, dtype=b.dtype) for v, b in zip(values, batched, strict=True)])
    return [np.asarray(r) for r in results]


def add_deterministics(tree: Any, model: Any) -> Any:
    """Add ``model``'s deterministics to ``tree["posterior"]``, which holds its free variables.

    Parameters
    ----------
    tree
        ``xarray.DataTree`` whose ``posterior`` has every free random variable (constrained
        scale) with leading ``chain`` and ``draw`` dimensions.
    model
        The ``pm.Model`` that was sampled.
    """
    import xarray as xr

    post = tree["posterior"].to_dataset()
    missing = [d for d in model.deterministics if d.name not in post]
    if not missing:
        return tree
    lead = ("chain", "draw")
    shape = tuple(post.sizes[d] for d in lead)
    values = [post[rv.name].transpose(*lead, ...).values.reshape(-1, *post[rv.name].shape[2:]) for rv in model.free_RVs]
    for var, value in zip(missing, evaluate(model.free_RVs, missing, values), strict=True):
        post[var.name] = data_array(model, var.name, value.reshape(*shape, *value.shape[1:]))
    tree["posterior"] = xr.DataTree(post)
    return tree


def log_density(model: Any, posterior: Any) -> np.ndarray:
    """The model's log posterior density (up to a constant) at each draw, shape ``(chain, draw)``.

    The density of the parameters as the model states them (rates, SDs, fractions), without the
    Jacobian of the sampler's log/logit transforms: the ``lp`` of ArviZ's ``sample_stats``.

    Parameters
    ----------
    posterior
        ``xarray.Dataset`` holding every free random variable (constrained scale) with leading
        ``chain`` and ``draw`` dimensions.
    """
    from pytensor.graph.replace import graph_replace

    rvs = list(model.free_RVs)
    # the density reads the value variables (the transforms' unconstrained scale): each is
    # the forward transform of its random variable, so the graph's roots are the free variables
    forward = {}
    for rv in rvs:
        value = model.rvs_to_values[rv]
        transform = model.rvs_to_transforms.get(rv)
        forward[value] = rv if transform is None else transform.forward(rv, *rv.owner.inputs)
    lp = graph_replace(model.logp(jacobian=False), forward, strict=False)
    lead = ("chain", "draw")
    shape = tuple(posterior.sizes[d] for d in lead)
    values = [posterior[rv.name].transpose(*lead, ...).values.reshape(-1, *posterior[rv.name].shape[2:]) for rv in rvs]
    (result,) = evaluate(rvs, [lp], values)
    return result.reshape(shape)


def prior_draws(model: Any, draws: int, seed: int) -> Any:
    """``draws`` draws of the free variables from their priors and the deterministics they imply.

    Returns
    -------
    xarray.Dataset
        One chain: every free random variable (constrained scale) and deterministic, with
        dimensions ``(chain, draw, ...)``.
    """
    import pymc as pm
    import xarray as xr

    rvs = list(model.free_RVs)
    # the python linker: a few hundred calls of a graph of a dozen draws cost less than a compile
    values = pm.draw(rvs, draws=draws, random_seed=np.random.default_rng(seed), mode="FAST_COMPILE")
    values = [np.asarray(v) if draws > 1 else np.asarray(v)[None] for v in values]  # pm.draw drops the axis of 1 draw
    deterministics = list(model.deterministics)
    variables = [*rvs, *deterministics]
    arrays = [*values, *evaluate(rvs, deterministics, values)]
    return xr.Dataset({v.name: data_array(model, v.name, a[None]) for v, a in zip(variables, arrays, strict=True)})


def posterior_dataset(model: Any, values: Mapping[str, np.ndarray], chains: int = 1) -> Any:
    """The constrained free variables and deterministics of ``model`` at draws of its value variables.

    Parameters
    ----------
    values
        Value-variable name ↦ draws (n, ...) on PyMC's unconstrained scale, n = chains × draws,
        chain-major.
    chains
        Number of chains the n draws split into.

    Returns
    -------
    xarray.Dataset
        Every free random variable (constrained) and deterministic, dims ``(chain, draw, ...)``;
        computed as functions of the value variables (``model["CL"]`` itself would be a random
        draw from the prior, not a function of the draws).
    """
    import xarray as xr

    outs = [v for v in model.unobserved_value_vars if not v.name.endswith("__")]
    evaluated = evaluate(model.value_vars, outs, [values[v.name] for v in model.value_vars])
    return xr.Dataset({v.name: data_array(model, v.name, value.reshape(chains, -1, *value.shape[1:]))
                       for v, value in zip(outs, evaluated, strict=True)})


def data_array(model: Any, name: str, value: np.ndarray) -> Any:
    """``value`` (chain, draw, ...) of the model variable ``name`` with its named dimensions."""
    import xarray as xr

    coords = {k: np.asarray(v) for k, v in model.coords.items() if v is not None}
    dims = list(model.named_vars_to_dims.get(name, ())) or [f"{name}_dim_{i}" for i in range(value.ndim - 2)]
    chains, draws = value.shape[:2]
    return xr.DataArray(value, dims=("chain", "draw", *dims),
                        coords={"chain": np.arange(chains), "draw": np.arange(draws)} | {d: coords[d] for d in dims if d in coords})
