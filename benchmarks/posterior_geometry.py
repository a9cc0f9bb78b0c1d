"""Why a fit's R-hat stalls: the posterior's local curvature against its global spread, and the R-hat
that its per-parameter ESS allows.

    python benchmarks/bench_fit.py --virus --seed 2 --virus-save /tmp/virus_s2.nc
    python benchmarks/posterior_geometry.py /tmp/virus_s2.nc [/tmp/virus_s3.nc ...]

Three measurements on the draws of one or more fits of the same model and data (pooled):

1. **Marginal shape.** SD, skewness and excess kurtosis of every free variable on the sampler's
   unconstrained scale (log of SDs, logit of fractions).
2. **Local curvature in whitened coordinates.** With m and C the pooled mean and covariance and
   x = m + L·u (L·Lᵀ = C), a Gaussian posterior has the Hessian of −log p equal to I everywhere in
   u. At ``--points`` posterior draws the script takes that Hessian (central differences of the
   model's gradient along the columns of L, step ``--step`` in u) and prints its largest
   eigenvalue λ and the variables of its eigenvector. NUTS's leapfrog needs a step below 2/√λ to be
   stable and about half that to keep the acceptance rate: λ ≈ 50 means step sizes ≈ 0.15–0.2
   whatever the (linear) mass matrix, because the thin direction turns from draw to draw (a
   curved ridge), which no constant metric can follow.
3. **The R-hat the ESS allows.** For each free scalar of the *first* file, its bulk ESS gives an
   AR(1) chain with the same ESS per draw; ``--replicates`` sets of 4 such chains of the file's
   length (one per scalar, independent) give the distribution of the maximum rank-normalised split
   R-hat (ArviZ) over all scalars, i.e. P(max R-hat ≤ 1.01) for a sampler that mixes exactly as well
   as this one did, with the chains otherwise perfect. ``--ess 450,550x12,1200x11`` puts in a
   profile instead (VALUExCOUNT), as for the figures of benchmarks/README.md, session 14.

Model and data default to the virus example; the IIV parametrisation (centred or not) is read off
the posterior's variables. Nothing here changes a fit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def unconstrained_draws(model, posterior) -> tuple[np.ndarray, list[str]]:
    """(chains·draws, d) draws on the sampler's unconstrained scale, in the order of
    ``model.value_vars`` (the flat layout of ``logp_dlogp_function(ravel_inputs=True)``)."""
    import pytensor.tensor as pt

    columns, names = [], []
    for rv in model.free_RVs:
        transform = model.rvs_to_transforms.get(rv)
        x = np.asarray(posterior[rv.name].transpose("chain", "draw", ...).values, dtype=float)
        # .eval() of the transform's inputs: constants for itpk's priors (a bound that were itself a
        # random variable would be drawn from its prior here)
        u = x if transform is None else transform.forward(pt.as_tensor(x), *rv.owner.inputs).eval()
        u = u.reshape(u.shape[0] * u.shape[1], -1)
        for j in range(u.shape[1]):
            columns.append(u[:, j])
            names.append(rv.name + (f"[{j}]" if u.shape[1] > 1 else ""))
    return np.column_stack(columns), names


def local_curvature(logp_dlogp, draws: np.ndarray, root: np.ndarray, step: float) -> tuple[float, np.ndarray]:
    """Largest eigenvalue of the Hessian of −log p in whitened coordinates at ``draws``, and its eigenvector in x."""
    d = draws.size
    H = np.empty((d, d))
    for j in range(d):
        e = root[:, j] * step
        H[:, j] = -(root.T @ (logp_dlogp(draws + e)[1] - logp_dlogp(draws - e)[1])) / (2 * step)
    values, vectors = np.linalg.eigh(0.5 * (H + H.T))
    return float(values[-1]), root @ vectors[:, -1]


def ar1_chains(ess_fraction: float, chains: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(chains, draws) stationary AR(1) chains, unit variance, whose ESS per draw is ``ess_fraction``
    (ρ = (1 − f)/(1 + f), the integrated autocorrelation time of AR(1) being (1 + ρ)/(1 − ρ))."""
    from scipy.signal import lfilter

    rho = (1.0 - ess_fraction) / (1.0 + ess_fraction)
    noise = rng.standard_normal((chains, draws))
    noise[:, 1:] *= np.sqrt(max(1.0 - rho * rho, 0.0))  # the first draw from the stationary N(0, 1)
    return lfilter([1.0], [1.0, -rho], noise, axis=1)


def ar1_max_rhat(ess_fraction: np.ndarray, chains: int, draws: int, rng: np.random.Generator) -> float:
    """Max R-hat over independent AR(1) chains whose ESS per draw is ``ess_fraction`` (one per scalar);
    NaN if any R-hat is NaN."""
    import arviz as az

    return float(np.max([float(az.rhat(ar1_chains(f, chains, draws, rng))) for f in ess_fraction]))


def parse_ess(text: str) -> np.ndarray:
    """``450,550x12,1200x11`` -> the bulk ESS of 24 scalars (VALUExCOUNT repeats a value)."""
    values = []
    for item in text.split(","):
        value, _, count = item.strip().partition("x")
        values += [float(value)] * (int(count) if count else 1)
    return np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("posteriors", nargs="+", type=Path, help="netCDF trees with a posterior group (same model and data)")
    parser.add_argument("--model", default="it_oncolytic_virus")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "example_virus.csv")
    parser.add_argument("--points", type=int, default=40, help="draws at which the Hessian is taken")
    parser.add_argument("--step", type=float, default=1e-2, help="central-difference step in whitened units")
    parser.add_argument("--replicates", type=int, default=200, help="AR(1) replicates for the R-hat distribution")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ess", default=None,
                        help="an ESS profile instead of the first file's, e.g. 450,550x12,1200x11 (VALUExCOUNT)")
    args = parser.parse_args()

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import arviz as az
    import xarray as xr
    from scipy import stats

    from itpk import load_model
    from itpk.dataset import read_dataset
    from itpk.inference import build_model, prepare

    spec = load_model(args.model)
    dataset = read_dataset(args.data, spec)
    trees = [xr.open_datatree(p) for p in args.posteriors]
    posterior0 = trees[0]["posterior"].to_dataset()
    iiv = {p: "centred" if f"log_{p}_i" in posterior0 or f"logit_{p}_i" in posterior0 else "non-centred"
           for p in prepare(spec, dataset).iiv}
    model, _ = build_model(spec, dataset, iiv=iiv)
    pooled = [unconstrained_draws(model, t["posterior"].to_dataset()) for t in trees]
    U, names = np.vstack([u for u, _ in pooled]), pooled[0][1]
    print(f"{args.model} on {args.data.name}: {len(trees)} fit(s), {U.shape[0]} draws, {U.shape[1]} unconstrained "
          f"dimensions; IIV {iiv}")

    print("\n1. marginals on the unconstrained scale")
    for j, name in enumerate(names):
        print(f"   {name:28s} sd {U[:, j].std():7.3f}  skew {stats.skew(U[:, j]):6.2f}  excess kurtosis {stats.kurtosis(U[:, j]):6.2f}")

    cov = np.cov(U.T)
    root = np.linalg.cholesky(cov)
    corr_eigen = np.linalg.eigvalsh(np.corrcoef(U.T))
    f = model.logp_dlogp_function(ravel_inputs=True)
    f.set_extra_values({})
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(U.shape[0], size=min(args.points, U.shape[0]), replace=False)
    start = time.perf_counter()
    tops, leading = [], {}
    for i in picks:
        lam, vector = local_curvature(f, U[i], root, args.step)
        tops.append(lam)
        scaled = np.abs(vector) / np.sqrt(np.diag(cov))
        lead = names[int(np.argmax(scaled))].split("[")[0]
        leading[lead] = leading.get(lead, 0) + 1
    tops = np.array(tops)
    print(f"\n2. local curvature, whitened by the pooled covariance (correlation eigenvalues {corr_eigen.min():.4f}–"
          f"{corr_eigen.max():.1f}); Hessian at {len(picks)} draws ({time.perf_counter() - start:.0f} s)")
    print(f"   largest eigenvalue: median {np.median(tops):.1f}, 75% {np.quantile(tops, 0.75):.1f}, 90% "
          f"{np.quantile(tops, 0.9):.1f}, max {tops.max():.1f} (a Gaussian posterior: 1)")
    print(f"   -> stable leapfrog steps below 2/sqrt(median) = {2 / np.sqrt(np.median(tops)):.2f} in whitened units")
    print("   variable leading the stiffest direction: " + ", ".join(f"{k} {v}" for k, v in sorted(leading.items(), key=lambda kv: -kv[1])))

    chains, draws = posterior0.sizes["chain"], posterior0.sizes["draw"]
    free = [rv.name for rv in model.free_RVs]
    ess = az.ess(posterior0[free], method="bulk")
    fractions = np.concatenate([np.atleast_1d(ess[v].values).ravel() for v in free]) / (chains * draws)
    if args.ess:
        fractions = parse_ess(args.ess) / (chains * draws)
    observed = az.rhat(posterior0[free])
    observed_max = max(float(observed[v].max()) for v in free)
    maxima = np.array([ar1_max_rhat(fractions, chains, draws, rng) for _ in range(args.replicates)])
    source = f"the profile {args.ess}" if args.ess else f"the ESS of {args.posteriors[0].name}"
    print(f"\n3. R-hat allowed by {source} ({chains} x {draws}; min bulk ESS "
          f"{fractions.min() * chains * draws:.0f}, median {np.median(fractions) * chains * draws:.0f}; observed max R-hat "
          f"{observed_max:.4f})")
    print(f"   {args.replicates} AR(1) replicates: max R-hat median {np.median(maxima):.4f}, 90% {np.quantile(maxima, 0.9):.4f}; "
          f"P(max R-hat <= 1.01) = {np.mean(maxima <= 1.01):.2f}")


if __name__ == "__main__":
    main()
