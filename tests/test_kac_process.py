"""The Kac process and path, checked against the mathematics: moments, atoms, CDF, PDEs, diffusion limit.

Monte-Carlo checks use fixed seeds and tolerances of 5 standard errors; KS checks use the 1% critical
value 1.63 / sqrt(n) (conservative where the law has atoms).
"""

import math

import pytest
import torch

from fewstep.errors import ConfigError
from fewstep.processes import kac
from fewstep.processes.kac import KacPath, KacProcess

F64 = torch.float64
KS_1PCT = 1.63


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _simpson(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Composite Simpson on an odd number of equispaced points."""
    h = x[1] - x[0]
    return h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())


def _bin_mass(p: KacProcess, lo: float, hi: float, t: float) -> float:
    """int_lo^hi p(x, t) dx for a bin strictly inside the cone."""
    x = torch.linspace(lo, hi, 2001, dtype=F64)
    return float(_simpson(p.density(x, t), x))


def _ks_uniform(u: torch.Tensor) -> float:
    """sup |F_n - F| for draws u that should be Uniform(0, 1)."""
    u = u.sort().values
    i = torch.arange(1, u.numel() + 1, dtype=F64)
    return float(torch.maximum(i / u.numel() - u, u - (i - 1) / u.numel()).max())


@pytest.fixture(scope="module")
def draws_t1():
    """400k float64 draws of (K_1, V_1) for a = 9, c = 3, the DistillKac defaults."""
    p = KacProcess(9.0, 3.0)
    k, v = p.sample(1.0, (400_000,), generator=_gen(0), return_velocity=True, dtype=F64)
    return p, k, v


# ----- bad input -----


@pytest.mark.parametrize("kwargs, fix", [
    (dict(a=-1.0), "use a > 0"), (dict(a=0.0), "use a > 0"), (dict(a=math.nan), "use a > 0"),
    (dict(c=0.0), "use c > 0"), (dict(c=-3.0), "use c > 0"),
])
def test_process_rejects_non_positive_parameters(kwargs, fix):
    with pytest.raises(ConfigError, match=fix) as err:
        KacProcess(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, fix", [
    (dict(T=0.0), "use T > 0"), (dict(T=-1.0), "use T > 0"),
    (dict(f="sigmoid"), "choose one of linear, cosine"), (dict(g="cubic"), "choose one of linear, quadratic"),
])
def test_path_rejects_bad_horizon_and_schedule_names(kwargs, fix):
    with pytest.raises(ConfigError, match=fix) as err:
        KacPath(KacProcess(), **kwargs)
    assert "\n" not in str(err.value)


def test_sample_rejects_bad_times():
    p = KacProcess()
    with pytest.raises(ConfigError, match="t >= 0"):
        p.sample(-0.1, (3,))
    with pytest.raises(ConfigError, match="batch = shape"):
        p.sample(torch.ones(4), (3, 2))


def test_prior_refuses_a_path_whose_end_depends_on_the_data():
    class HalfWay(KacPath):
        def f(self, t):
            return 1 - t / (2 * self.T)

    with pytest.raises(ConfigError, match="f\\(T\\)=0.5"):
        HalfWay(KacProcess()).prior((2, 3))
    assert KacPath(KacProcess(), f="cosine").prior((2, 3)).shape == (2, 3)


# ----- sampling: moments, atoms, cone, reproducibility -----


@pytest.mark.parametrize("a, c, t", [(9.0, 3.0, 0.05), (9.0, 3.0, 1.0), (2.0, 1.0, 10.0)])  # a t = 0.45, 9, 20
def test_sample_mean_and_variance_match_the_closed_form(a, c, t):
    p = KacProcess(a, c)
    n = 200_000
    k = p.sample(t, (n,), generator=_gen(1), dtype=F64)
    var = float(p.variance(t))
    assert abs(float(k.mean())) < 5 * math.sqrt(var / n)
    # SE of the sample variance: sqrt((mu4 - sigma^4) / n), mu4 estimated from the draws
    se_var = math.sqrt(float(((k - k.mean()) ** 4).mean() - k.var() ** 2) / n)
    assert abs(float(k.var()) - var) < 5 * se_var


@pytest.mark.parametrize("t", [0.1, 0.5])  # atom mass per side e^{-at}/2 = 0.20, 0.0056
def test_atoms_at_the_cone_have_mass_exp_minus_at_over_two(t):
    p = KacProcess(9.0, 3.0)
    n = 200_000
    k, v = p.sample(t, (n,), generator=_gen(2), return_velocity=True)  # float32, as training draws them
    ct = p.c * t
    assert float(k.abs().max()) <= ct * (1 + 1e-6)  # |K_t| <= c t
    m = float(p.atom_mass(t))
    se = math.sqrt(m * (1 - m) / n)
    # velocity() must recognise a float32 atom as one: there v_K = c sign(K) = V_t (no flip yet)
    at_cone = p.velocity(k, t).abs() == p.c
    for side in (1, -1):
        atoms = at_cone & (torch.sign(k) == side)
        assert abs(float(atoms.double().mean()) - m) < 5 * se
        assert bool((v[atoms] == side * p.c).all())
    # and continuous draws within 1e-5 c t of the cone are as rare as the law says (a float32 rounding of the
    # cone into an atom, or of an atom off the cone, would pile draws up there): a Poisson count of mean lam
    edge = torch.tensor(ct * (1 - 1e-5), dtype=torch.float64)
    lam = n * 2 * float(1 - m - p.cdf(edge, t))  # both sides: the continuous mass in [c t (1 - 1e-5), c t)
    near = (k.abs() > ct * (1 - 1e-5)) & ~at_cone
    assert int(near.sum()) <= lam + 5 * math.sqrt(lam) + 3


def test_cone_holds_for_long_times():
    p = KacProcess(9.0, 3.0)
    t = torch.tensor([0.0, 1e-6, 0.3, 2.2])
    k = p.sample(t, (4, 50_000), generator=_gen(3))
    assert bool((k.abs() <= p.c * t[:, None] * (1 + 1e-6)).all())
    assert bool((k[0] == 0).all())  # t = 0: K = 0


def test_sample_is_reproducible_and_honours_dtype():
    p = KacProcess()
    a = p.sample(0.7, (8, 1, 4, 4), generator=_gen(5))
    b = p.sample(0.7, (8, 1, 4, 4), generator=_gen(5))
    c = p.sample(0.7, (8, 1, 4, 4), generator=_gen(6))
    assert a.dtype == torch.float32 and a.shape == (8, 1, 4, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = p.sample(torch.full((8,), 0.7, dtype=F64), (8, 1, 4, 4), generator=_gen(5), dtype=F64)
    assert d.dtype == F64
    torch.testing.assert_close(d.float(), a)  # the draw is computed in float64 either way


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sample_on_the_gpu_follows_the_time_tensor():
    p = KacProcess()
    g = torch.Generator(device="cuda").manual_seed(0)
    t = torch.rand(256, device="cuda")
    k, v = p.sample(t, (256, 1, 28, 28), generator=g, return_velocity=True)
    assert k.device.type == "cuda" and v.device.type == "cuda"
    assert bool((k.abs() <= p.c * t.view(-1, 1, 1, 1) * (1 + 1e-6)).all())
    vk = p.velocity(k, t)
    assert vk.device.type == "cuda" and bool(vk.isfinite().all())


# ----- the law: CDF against draws, density against mass and histogram -----


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_draws_follow_cdf_kolmogorov_smirnov(t, draws_t1):
    if t == 1.0:
        p, k, _ = draws_t1
    else:
        p = KacProcess(9.0, 3.0)
        k = p.sample(t, (400_000,), generator=_gen(7), dtype=F64)
    n = k.numel()
    # sup over a grid that contains both atoms: a sup over fewer points only lowers the statistic.
    # float64 draws put an atom at exactly c t, the value cdf() compares with.
    ct = p.c * t
    grid = torch.cat([torch.linspace(-ct, ct, 4001, dtype=F64), torch.tensor([ct * (1 - 1e-12)], dtype=F64)])
    empirical = torch.searchsorted(k.sort().values, grid, right=True).double() / n
    assert float((empirical - p.cdf(grid, t)).abs().max()) < KS_1PCT / math.sqrt(n)


def test_draws_with_per_sample_times_follow_cdf(monkeypatch):
    # Randomised probability integral transform: U = F(K) on the continuous part and uniform on the jump
    # of F at an atom; U ~ Uniform(0, 1) exactly when K ~ F. Times differ per row (a t from 0.09 to 18);
    # a small chunk makes the simulation pad many chunks to different widths.
    p = KacProcess(9.0, 3.0)
    batch = 30_000
    t = 0.01 + 1.99 * torch.rand(batch, generator=_gen(8), dtype=F64)
    with monkeypatch.context() as patch:
        patch.setattr(kac, "_CHUNK", 1 << 14)
        k = p.sample(t, (batch, 2), generator=_gen(9), dtype=F64)
    tt = t[:, None].expand_as(k)
    m = p.atom_mass(tt)
    w = torch.rand(k.shape, generator=_gen(10), dtype=F64)
    u = p.cdf(k, t)
    u = torch.where(k == -p.c * tt, w * m, u)
    u = torch.where(k == p.c * tt, 1 - m + w * m, u)
    assert _ks_uniform(u.reshape(-1)) < KS_1PCT / math.sqrt(k.numel())


@pytest.mark.parametrize("a, c, t", [(9.0, 3.0, 0.05), (9.0, 3.0, 1.0), (2.0, 1.0, 10.0), (400.0, 20.0, 1.0)])
def test_density_and_atoms_carry_unit_mass(a, c, t):
    p = KacProcess(a, c)
    ct = c * t
    x = torch.linspace(-ct, ct, 40_001, dtype=F64) * (1 - 1e-13)  # density() is 0 on the cone itself
    total = float(_simpson(p.density(x, t), x)) + 2 * float(p.atom_mass(t))
    assert abs(total - 1) < 1e-6
    torch.testing.assert_close(p.density(x, t), p.density(-x, t), rtol=0, atol=0)  # symmetric
    assert float(p.density(torch.tensor([-ct * 1.01, ct * 1.01], dtype=F64), t).abs().max()) == 0  # none outside
    # the CDF: 0 below the cone, the atom at -ct, 1/2 at 0, 1 - atom just inside ct, 1 from ct on
    m = float(p.atom_mass(t))
    edges = torch.tensor([-ct * 1.01, -ct, 0.0, ct * (1 - 1e-12), ct, 2 * ct], dtype=F64)
    want = torch.tensor([0.0, m, 0.5, 1 - m, 1.0, 1.0], dtype=F64)
    torch.testing.assert_close(p.cdf(edges, t), want, rtol=0, atol=1e-10)
    # increments of the CDF against Simpson on the density (1e-10 at 2001 points)
    lo, hi = -0.3 * ct, 0.1 * ct
    assert abs(float(p.cdf(hi, t) - p.cdf(lo, t)) - _bin_mass(p, lo, hi, t)) < 1e-10


def test_density_matches_a_histogram_of_draws(draws_t1):
    p, k, _ = draws_t1
    n = k.numel()
    for lo, hi in [(-2.0, -1.8), (0.0, 0.2), (1.0, 1.2), (2.6, 2.8)]:
        mass = _bin_mass(p, lo, hi, 1.0)
        frac = float(((k > lo) & (k <= hi)).double().mean())
        assert abs(frac - mass) < 5 * math.sqrt(mass * (1 - mass) / n)


@pytest.mark.parametrize("t", [0.3, 1.0, 2.0])
def test_density_solves_the_telegraph_equation(t):
    # p_tt + 2a p_t = c^2 p_xx on |x| < ct, by central differences on the closed form
    p = KacProcess(9.0, 3.0)
    x = torch.linspace(-0.95, 0.95, 40, dtype=F64) * p.c * t
    h = 1e-4
    pt = (p.density(x, t + h) - p.density(x, t - h)) / (2 * h)
    ptt = (p.density(x, t + h) - 2 * p.density(x, t) + p.density(x, t - h)) / h**2
    pxx = (p.density(x + h, t) - 2 * p.density(x, t) + p.density(x - h, t)) / h**2
    scale = ptt.abs() + 2 * p.a * pt.abs() + p.c**2 * pxx.abs()
    assert float(((ptt + 2 * p.a * pt - p.c**2 * pxx).abs() / scale).max()) < 1e-5


# ----- the conditional velocity -----


def test_velocity_is_bounded_and_finite_everywhere():
    for a, c in [(9.0, 3.0), (1e-3, 1.0), (1e4, 100.0)]:
        p = KacProcess(a, c)
        for t in [0.0, 1e-12, 1e-6, 0.01, 1.0, 100.0]:
            ct = c * t
            x = torch.cat([
                torch.linspace(-1.5, 1.5, 601, dtype=F64) * max(ct, 1e-3),
                torch.tensor([ct, -ct, ct * (1 - 1e-14), ct * (1 + 1e-14), 0.0], dtype=F64),
            ])
            for dtype in (F64, torch.float32):
                v = p.velocity(x.to(dtype), t)
                assert v.dtype == dtype and bool(v.isfinite().all())
                assert float(v.abs().max()) <= c
            v = p.velocity(x, t)
            on_cone = x.abs() >= ct
            torch.testing.assert_close(v[on_cone], c * torch.sign(x[on_cone]), rtol=0, atol=0)
            assert float(v[x == 0].abs().max()) == 0  # odd in x
            if t > 0:  # strictly inside the cone (past velocity()'s 4-ulp layer) |v_K| < c
                assert float(v[x.abs() < ct * (1 - 1e-12)].abs().max()) < c


def test_velocity_is_continuous_through_the_small_z_series():
    # z = a r / c -> 0 at the cone: the series branch (z < 1e-3) and the Bessel branch meet smoothly,
    # and the inner limit is ct / (t + 2/a).
    p, t = KacProcess(9.0, 3.0), 0.8
    ct = p.c * t
    z = torch.tensor([1e-3 * (1 - 1e-9), 1e-3 * (1 + 1e-9)], dtype=F64)
    x = (ct**2 - (p.c * z / p.a) ** 2).sqrt()
    v = p.velocity(x, t)
    assert abs(float(v[0] / v[1]) - 1) < 1e-12
    x = ct * (1 - torch.tensor([1e-14, 1e-12], dtype=F64))
    torch.testing.assert_close(p.velocity(x, t), ct / (t + 2 / p.a) * torch.ones(2, dtype=F64), rtol=1e-10, atol=0)


def test_velocity_is_the_conditional_mean_of_v_monte_carlo():
    # E[V_t - v_K(K_t) | K_t in B] = 0 for every bin B (tower property), so no bin-width bias. At
    # a t = 4.5 the outer bins reject the diffusive guess x / (2t) by about 10 standard errors.
    p, t = KacProcess(9.0, 3.0), 0.5
    k, v = p.sample(t, (400_000,), generator=_gen(11), return_velocity=True, dtype=F64)

    def z_score(residual, inside):
        r = residual[inside]
        return float(r.mean() / (r.std() / math.sqrt(r.numel())))

    bins = [(-1.45, -1.3), (-0.6, -0.4), (0.1, 0.3), (0.9, 1.1), (1.3, 1.45), (1.45, 1.4999)]
    residual = v - p.velocity(k, t)
    for lo, hi in bins:
        assert abs(z_score(residual, (k > lo) & (k < hi))) < 5
    assert abs(z_score(residual * k, torch.ones_like(k, dtype=torch.bool))) < 5  # E[(V - v_K) K] = 0
    wrong = v - k / (2 * t)
    assert max(abs(z_score(wrong, (k > lo) & (k < hi))) for lo, hi in bins) > 5  # the check has power


@pytest.mark.parametrize("t", [0.3, 1.0, 2.0])
def test_velocity_and_density_satisfy_the_telegraph_system(t):
    # Continuity p_t + (p v)_x = 0 (v_K is the probability-flow velocity of K_t's law) and the flux equation
    # w_t + c^2 p_x + 2a w = 0 for w = p v = c (p_+ - p_-), by central differences at interior points.
    p = KacProcess(9.0, 3.0)
    x = torch.linspace(-0.95, 0.95, 40, dtype=F64) * p.c * t
    h = 1e-5

    def flux(x, t):
        return p.density(x, t) * p.velocity(x, t)

    pt = (p.density(x, t + h) - p.density(x, t - h)) / (2 * h)
    px = (p.density(x + h, t) - p.density(x - h, t)) / (2 * h)
    wt = (flux(x, t + h) - flux(x, t - h)) / (2 * h)
    wx = (flux(x + h, t) - flux(x - h, t)) / (2 * h)
    w = flux(x, t)
    assert float(((pt + wx).abs() / (pt.abs() + wx.abs())).max()) < 1e-6
    scale = wt.abs() + p.c**2 * px.abs() + 2 * p.a * w.abs()
    assert float(((wt + p.c**2 * px + 2 * p.a * w).abs() / scale).max()) < 1e-6


def test_diffusion_limit():
    # a -> inf with c^2 / a = 1 fixed: K_t -> W_t ~ N(0, t). With I0/I1(z) = 1 + 1/(2z) + O(z^-2) and
    # (r/c) / (2z) = 1/(2a), v_K = x / (t + r/c + 1/(2a) + O(1/(a^2 t))) -> x / (2t), the probability-flow
    # velocity -(1/2) d/dx log N(x; 0, t) of Brownian motion started at 0.
    t = 1.0
    x = torch.linspace(-6, 6, 2001, dtype=F64)
    gauss = 0.5 * (1 + torch.erf(x / math.sqrt(2 * t)))
    dist = {a: float((KacProcess(a, math.sqrt(a)).cdf(x, t) - gauss).abs().max()) for a in (100.0, 400.0)}
    assert dist[400.0] < 2e-4 and dist[100.0] / dist[400.0] > 3  # sup distance falls like 1/a
    p = KacProcess(400.0, 20.0)
    k = p.sample(t, (20_000,), generator=_gen(12), dtype=F64)
    u = 0.5 * (1 + torch.erf(k / math.sqrt(2 * t)))
    assert _ks_uniform(u) < KS_1PCT / math.sqrt(k.numel()) + dist[400.0]
    xs = torch.linspace(-3, 3, 601, dtype=F64)
    v = p.velocity(xs, t)
    r = (p.c**2 * t**2 - xs**2).sqrt()
    torch.testing.assert_close(v, xs / (t + r / p.c + 1 / (2 * p.a)), rtol=0, atol=1e-5)
    assert float((v - xs / (2 * t)).abs().max()) < 1e-2


# ----- the path -----


@pytest.mark.parametrize("f", ["linear", "cosine"])
@pytest.mark.parametrize("g", ["linear", "quadratic"])
def test_path_schedules_and_their_derivatives(f, g):
    path = KacPath(KacProcess(), T=2.0, f=f, g=g)
    t = torch.linspace(0.01, 1.99, 50, dtype=F64)
    h = 1e-6
    torch.testing.assert_close(path.df(t), (path.f(t + h) - path.f(t - h)) / (2 * h), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(path.dg(t), (path.g(t + h) - path.g(t - h)) / (2 * h), rtol=1e-7, atol=1e-8)
    ends = torch.tensor([0.0, 2.0], dtype=F64)
    torch.testing.assert_close(path.f(ends), torch.tensor([1.0, 0.0], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(path.g(ends), torch.tensor([0.0, 2.0], dtype=F64))


def test_path_forward_stays_in_the_cone_and_target_is_the_conditional_velocity():
    path = KacPath(KacProcess(9.0, 3.0), T=1.0, f="cosine", g="quadratic")
    batch = 64
    x0 = torch.randn(batch, 1, 8, 8, generator=_gen(13))
    t = torch.rand(batch, generator=_gen(14))
    x_t, k = path.forward(x0, t, generator=_gen(15))
    tv = t.view(-1, 1, 1, 1)
    cone = path.process.c * path.g(tv)
    assert bool((k.abs() <= cone * (1 + 1e-6)).all())
    torch.testing.assert_close(x_t, path.f(tv) * x0 + k)
    u = path.target(x0, k, t)
    want = path.df(tv) * x0 + path.dg(tv) * path.process.velocity(k, path.g(t))
    torch.testing.assert_close(u, want)
    assert float((u - path.df(tv) * x0).abs().max()) <= path.process.c * float(path.dg(t).max())  # |v_K| <= c


@pytest.mark.parametrize("x0", [0.0, 0.7])
def test_path_target_is_the_velocity_of_its_marginal(x0):
    # For a point mass x0, x_t has the law q(x, t) = p(x - f(t) x0, g(t)) (continuous part) and the
    # target u(x, t) = f' x0 + g' v_K(x - f x0, g) must satisfy q_t + (q u)_x = 0. The chain rule through
    # g makes T = 2 with quadratic g a real test of g and g'.
    path = KacPath(KacProcess(9.0, 3.0), T=2.0, f="cosine", g="quadratic")
    p, h = path.process, 1e-5
    x0s = torch.tensor([x0], dtype=F64)

    def q(x, t):
        t = torch.tensor([t], dtype=F64)
        return p.density(x - path.f(t) * x0, path.g(t))

    def qu(x, t):
        t1 = torch.tensor([t], dtype=F64)
        k = (x - path.f(t1) * x0)[None]
        return q(x, t) * path.target(x0s[:, None], k, t1)[0]

    for t in (0.4, 1.0, 1.6):
        f_t, g_t = math.cos(math.pi * t / 4), t**2 / 2
        x = f_t * x0 + torch.linspace(-0.95, 0.95, 40, dtype=F64) * p.c * g_t
        qt = (q(x, t + h) - q(x, t - h)) / (2 * h)
        flux_x = (qu(x + h, t) - qu(x - h, t)) / (2 * h)
        assert float(((qt + flux_x).abs() / (qt.abs() + flux_x.abs())).max()) < 1e-6


def test_path_target_on_float32_atoms_at_small_times():
    # At small t most coordinates are atoms (no flip): their target is f' x0 + g' c sign(k) exactly. The
    # float32 atom float32(c t) rounds below c t for about half of the times, which velocity() must absorb.
    path = KacPath(KacProcess(9.0, 3.0))
    batch = 2_000
    x0 = torch.randn(batch, 100, generator=_gen(16))
    t = 0.01 + 0.09 * torch.rand(batch, generator=_gen(17))
    _, k = path.forward(x0, t, generator=_gen(18))
    u = path.target(x0, k, t)
    at_speed = ((u - path.df(t)[:, None] * x0).abs() - path.process.c).abs() < 1e-5
    m = 2 * path.process.atom_mass(t.double())[:, None].expand(k.shape)  # P(atom) per coordinate
    se = math.sqrt(float((m * (1 - m)).sum())) / m.numel()
    assert abs(float(at_speed.double().mean() - m.mean())) < 5 * se


def test_prior_is_the_kac_law_at_g_of_T():
    path = KacPath(KacProcess(9.0, 3.0), T=2.0, g="quadratic")
    x = path.prior((50_000, 2), generator=_gen(18), dtype=F64)
    g_end = 2.0  # g(T) = T^2 / T
    assert x.dtype == F64 and x.shape == (50_000, 2)
    assert float(x.abs().max()) <= path.process.c * g_end
    var = float(path.process.variance(g_end))
    se_var = math.sqrt(float(((x - x.mean()) ** 4).mean() - x.var() ** 2) / x.numel())
    assert abs(float(x.var()) - var) < 5 * se_var
    assert torch.equal(x, path.prior((50_000, 2), generator=_gen(18), dtype=F64))
