"""Trajectory geometry: Menger curvature and per-trajectory PCA projection."""
import numpy as np
import pytest

from omnicache_export.calibration.trajectory import menger_curvature, project_3d, trajectory_curvature


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def circle(radius, n=12, arc=1.5 * np.pi):
    t = np.linspace(0.0, arc, n) ** 1.3 / arc**0.3  # uneven spacing on purpose
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


@pytest.mark.parametrize("radius", [0.01, 1.0, 37.0])
@pytest.mark.parametrize("dim", [2, 3, 50])
def test_circle_curvature_is_inverse_radius(radius, dim):
    rng = np.random.default_rng(dim)
    p = np.zeros((12, dim))
    p[:, :2] = circle(radius)
    p = p @ random_rotation(dim, rng).T + rng.standard_normal(dim)
    k = menger_curvature(p)
    assert np.isnan(k[0]) and np.isnan(k[-1])
    np.testing.assert_allclose(k[1:-1], 1.0 / radius, rtol=1e-9)


def test_straight_line_and_degenerate():
    rng = np.random.default_rng(0)
    d = rng.standard_normal(7)
    p = np.cumsum(rng.uniform(0.1, 2.0, 9))[:, None] * d + 3.0
    assert np.all(menger_curvature(p)[1:-1] < 1e-7)
    q = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [2.0, 0.0]])  # repeated point
    k = menger_curvature(q)
    assert k[1] == 0.0 and k[2] == 0.0
    assert np.all(np.isnan(menger_curvature(np.zeros((2, 3)))))


def test_projection_preserves_distances_in_3d_subspace():
    rng = np.random.default_rng(1)
    pts3 = rng.standard_normal((11, 3)) * [5.0, 2.0, 0.5]
    basis = random_rotation(64, rng)[:, :3]
    emb = (pts3 @ basis.T + rng.standard_normal(64)).reshape(11, 4, 4, 4)
    proj = project_3d(emb)
    dist = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)
    np.testing.assert_allclose(dist(proj), dist(pts3), atol=1e-9)
    np.testing.assert_allclose(proj.mean(axis=0), 0.0, atol=1e-9)


def test_projection_small_and_rank_deficient():
    assert project_3d(np.ones((1, 5))).shape == (1, 3)
    two = project_3d(np.array([[0.0, 0, 0, 0], [3.0, 4.0, 0, 0]]))
    np.testing.assert_allclose(np.abs(two[:, 0]), [2.5, 2.5])
    np.testing.assert_allclose(two[:, 1:], 0.0)
    line = np.outer(np.arange(6.0), np.ones(10))  # rank 1
    pl = project_3d(line)
    np.testing.assert_allclose(pl[:, 1:], 0.0, atol=1e-12)


def test_invariant_to_rotation_and_translation():
    rng = np.random.default_rng(2)
    trajs = rng.standard_normal((3, 9, 2, 4, 4)).cumsum(axis=1)  # K=3 random walks, N=8
    rot = random_rotation(32, rng)
    moved = (trajs.reshape(3, 9, 32) @ rot.T + 10.0 * rng.standard_normal(32)).reshape(trajs.shape)
    a, b = trajectory_curvature(trajs), trajectory_curvature(moved)
    np.testing.assert_allclose(a.per_sample, b.per_sample, rtol=1e-8)
    np.testing.assert_allclose(np.abs(a.projections), np.abs(b.projections), atol=1e-8)


def test_trajectory_curvature_stats():
    rng = np.random.default_rng(3)
    n = 10
    trajs = []
    for radius in (1.0, 2.0, 4.0):
        p = np.zeros((n + 1, 16))
        p[:, :2] = circle(radius, n + 1)
        trajs.append((p @ random_rotation(16, rng).T).reshape(n + 1, 4, 4))
    st = trajectory_curvature(np.stack(trajs))
    assert st.mean.shape == (n + 1,) and st.per_sample.shape == (3, n + 1) and st.projections.shape == (3, n + 1, 3)
    assert np.isnan(st.mean[0]) and np.isnan(st.mean[n])
    np.testing.assert_allclose(st.mean[1:n], np.mean([1.0, 0.5, 0.25]), rtol=1e-8)
    np.testing.assert_allclose(st.std[1:n], np.std([1.0, 0.5, 0.25]), rtol=1e-8)
