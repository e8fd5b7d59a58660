"""Schedule (values worked out from BFL's formulas), position ids, the noise convention and the Euler loop."""

import math

import numpy as np
import pytest

from flux2_mlx.sampling import (
    cfg_velocity,
    compute_empirical_mu,
    denoise,
    get_schedule,
    make_noise,
    prc_img,
    prc_txt,
)

# (width, height, steps, mu, first sigmas, last sigmas before 0), worked out from BFL's mu fit and time shift
# (docs/architecture.md, 'Sampling schedule')
TABLE = [
    (1024, 1024, 4, 2.291180, [1.0, 0.967384, 0.908144, 0.767200], []),
    (1024, 1024, 28, 2.151443, [1.0, 0.995710, 0.991132], [0.398072, 0.241515]),
    (1024, 1024, 50, 2.023351, [1.0, 0.997309, 0.994521], [0.239631, 0.133719]),
    (1360, 768, 50, 2.021677, [1.0, 0.997305], [0.239326, 0.133525]),
    (512, 512, 4, 2.030690, [1.0, 0.958085, 0.883982, 0.717497], []),
    (2048, 2048, 7, 3.229986, [], []),
    (2048, 2048, 50, 3.229986, [], []),
]


@pytest.mark.parametrize("width,height,steps,mu,first,last", TABLE)
def test_schedule_table(width, height, steps, mu, first, last):
    L = (width // 16) * (height // 16)
    assert compute_empirical_mu(L, steps) == pytest.approx(mu, abs=1e-6)
    s = get_schedule(steps, L)
    assert len(s) == steps + 1 and s[-1] == 0.0 and s[0] == 1.0
    assert all(a > b for a, b in zip(s, s[1:]))
    assert s[: len(first)] == pytest.approx(first, abs=1e-6)
    if last:
        assert s[-1 - len(last) : -1] == pytest.approx(last, abs=1e-6)


def test_ids():
    txt = prc_txt(512)
    assert txt.shape == (1, 512, 4) and (txt[0, :, :3] == 0).all() and (txt[0, :, 3] == np.arange(512)).all()
    img = prc_img(2, 3, t=10)
    assert img[0].tolist() == [[10, r, c, 0] for r in range(2) for c in range(3)]


def test_noise_convention():
    x = make_noise(5, 3, 4, channels=8)
    ref = np.random.default_rng(5).standard_normal((1, 8, 3, 4), dtype=np.float32)
    assert x.shape == (1, 12, 8) and x.dtype == np.float32
    assert np.array_equal(x[0, 1 * 4 + 2], ref[0, :, 1, 2])  # token (row 1, col 2)
    assert np.array_equal(make_noise(5, 3, 4, 8), x) and not np.array_equal(make_noise(6, 3, 4, 8), x)


def test_euler_constant_velocity_reaches_analytic_end():
    """With v = noise − data constant, Euler from pure noise lands exactly on the data."""
    data, noise = np.full(3, 2.0), np.array([0.5, -1.0, 3.0])
    ts = get_schedule(9, 4096)
    steps = list(denoise(lambda x, t: noise - data, noise.copy(), ts))
    assert len(steps) == 9 and np.allclose(steps[-1], data)


def test_euler_uses_each_time_once_and_never_zero():
    seen = []
    list(denoise(lambda x, t: seen.append(t) or 0 * x, np.zeros(1), [1.0, 0.6, 0.2, 0.0]))
    assert seen == [1.0, 0.6, 0.2]


def test_cfg_combination():
    v = cfg_velocity(lambda x, t: x + 1.0, lambda x, t: x, 4.0)
    assert v(np.array([2.0]), 0.5) == pytest.approx([6.0])  # 2 + 4·(3 − 2)
    assert math.isclose(cfg_velocity(lambda x, t: 3.0, lambda x, t: 1.0, 1.0)(0, 0), 3.0)
