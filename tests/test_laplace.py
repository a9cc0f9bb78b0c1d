"""The Laplace fit's inner Newton step."""

import numpy as np

from itpk.laplace import _solve_blocks


def test_newton_step_descends_on_the_curvature_scale_where_the_hessian_is_indefinite():
    # H = diag(4, -2) (a saddle of -log p, as at a population draw in the tail): the step H⁻¹g with
    # |eigenvalues| is (g1/4, g2/2), a descent direction of the right size; a floor of the negative
    # eigenvalue alone gave g2/1e-8, which the line search could not shorten enough. Exact to 1e-15.
    H = np.array([[[4.0, 0.0], [0.0, -2.0]]])
    g = np.array([[1.0], [3.0]])  # (k, N)
    np.testing.assert_allclose(_solve_blocks(H, g), [[0.25], [1.5]], rtol=1e-15)
    # a positive definite block is plain Newton: H⁻¹g
    H = np.array([[[2.0, 1.0], [1.0, 3.0]]])
    np.testing.assert_allclose(_solve_blocks(H, g)[:, 0], np.linalg.solve(H[0], g[:, 0]), rtol=1e-13)
