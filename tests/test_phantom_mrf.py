"""MRF-FISP forward model, dictionary matching and fingerprint LUT (ingest.phantom.mrf)."""

import numpy as np
import pytest

from ingest.phantom import mrf

SITES = {  # schedule kind -> (tr, te, ti) of the site that uses it (sites/*.yaml)
    "sinusoidal_const_tr": (12.0, 2.0, 21.0),
    "sinusoidal_var_tr": (11.0, 2.1, 18.0),
}
TISSUES = {  # T1, T2 (ms), deliberately off the dictionary grid
    "wm": (850.0, 60.0),
    "gm": (1400.0, 85.0),
    "csf": (4200.0, 1800.0),
    "fat": (380.0, 110.0),
    "lesion": (1650.0, 130.0),
    "enhancing": (1100.0, 72.0),
    "necrosis": (2400.0, 300.0),
}
STEP_T1 = np.log(mrf.DEFAULT_T1_GRID[1] / mrf.DEFAULT_T1_GRID[0])
STEP_T2 = np.log(mrf.DEFAULT_T2_GRID[1] / mrf.DEFAULT_T2_GRID[0])


def _tissue_arrays(names):
    return (np.array([TISSUES[n][0] for n in names]), np.array([TISSUES[n][1] for n in names]))


@pytest.fixture(scope="module", params=list(SITES))
def site(request):
    kind = request.param
    sched = mrf.make_schedule(kind, 400, *SITES[kind])
    d, lut = mrf.site_model(kind, 400, *SITES[kind])
    return sched, d, lut


@pytest.fixture(scope="module")
def const_site():
    kind = "sinusoidal_const_tr"
    sched = mrf.make_schedule(kind, 400, *SITES[kind])
    d, lut = mrf.site_model(kind, 400, *SITES[kind])
    return sched, d, lut


def _reference_epg(t1, t2, b1, sched, n_states):
    """Textbook complex EPG (Weigel 2015 operators, Hargreaves' epg_rf/epg_grad) for one atom."""
    fp = np.zeros(n_states, complex)
    fm = np.zeros(n_states, complex)
    z = np.zeros(n_states, complex)
    z[0] = 1 - 2 * np.exp(-sched.ti_ms / t1)
    out = []
    for j in range(sched.n):
        a = np.deg2rad(sched.flip_deg[j]) * b1
        c2, s2, sa, ca = np.cos(a / 2) ** 2, np.sin(a / 2) ** 2, np.sin(a), np.cos(a)
        fp, fm, z = (c2 * fp + s2 * fm - 1j * sa * z,
                     s2 * fp + c2 * fm + 1j * sa * z,
                     -0.5j * sa * fp + 0.5j * sa * fm + ca * z)
        out.append(fp[0] * np.exp(-sched.te_ms / t2))
        e1, e2 = np.exp(-sched.tr_ms[j] / t1), np.exp(-sched.tr_ms[j] / t2)
        fp, fm, z = fp * e2, fm * e2, z * e1
        z[0] += 1 - e1
        fp = np.concatenate([[0], fp[:-1]])
        fm = np.concatenate([fm[1:], [0]])
        fp[0] = np.conj(fm[0])
    return np.array(out)


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("kind", list(SITES))
def test_schedule_shape_range_and_determinism(kind):
    tr, te, ti = SITES[kind]
    s = mrf.make_schedule(kind, 400, tr, te, ti)
    s2 = mrf.make_schedule(kind, 400, tr, te, ti)
    assert s.flip_deg.shape == s.tr_ms.shape == (400,)
    assert s.flip_deg.dtype == s.tr_ms.dtype == np.float64
    assert np.array_equal(s.flip_deg, s2.flip_deg) and np.array_equal(s.tr_ms, s2.tr_ms)
    assert 4.9 < s.flip_deg.min() < 6 and 55 <= s.flip_deg.max() <= 71
    assert (s.te_ms, s.ti_ms) == (te, ti)
    if kind == "sinusoidal_const_tr":
        assert np.all(s.tr_ms == tr)
    else:
        assert s.tr_ms.min() == pytest.approx(tr - 2) and s.tr_ms.max() == pytest.approx(tr + 4)
        assert s.tr_ms.mean() == pytest.approx(tr, abs=1e-9)  # the header TR is the mean
        assert np.abs(np.diff(s.tr_ms)).max() < 0.5  # smooth
    with pytest.raises(ValueError):
        s.flip_deg[0] = 1.0  # shared through site_model's cache: read-only


def test_bad_schedule_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'spiral_magic'.*sinusoidal_const_tr.*sinusoidal_var_tr"):
        mrf.make_schedule("spiral_magic", 400, 12.0, 2.0, 21.0)


def test_schedule_rejects_te_beyond_tr():
    with pytest.raises(ValueError, match="TE"):
        mrf.make_schedule("sinusoidal_var_tr", 100, 4.0, 2.5, 20.0)  # shortest TR 2 ms < TE


# ----------------------------------------------------------------------------- EPG

@pytest.mark.parametrize("kind", list(SITES))
def test_epg_matches_textbook_complex_epg(kind):
    sched = mrf.make_schedule(kind, 120, *SITES[kind])
    params = [(850.0, 60.0, 1.0), (1400.0, 85.0, 0.85), (4200.0, 1800.0, 1.2), (380.0, 110.0, 1.1)]
    t1, t2, b1 = (np.array(v) for v in zip(*params))
    for n_states in (5, 25, 120):
        sig = mrf.epg_fisp(t1, t2, b1, sched, n_states=n_states)
        assert sig.shape == (4, 120) and sig.dtype == np.complex128
        for i, p in enumerate(params):
            ref = _reference_epg(*p, sched, n_states)
            np.testing.assert_allclose(sig[i], ref, rtol=0, atol=1e-12)
    assert np.all(sig.real == 0)  # phase-0 pulses: FISP signals are purely imaginary


def test_epg_truncation_error_small_for_brain_tissue():
    sched = mrf.make_schedule("sinusoidal_const_tr", 400, *SITES["sinusoidal_const_tr"])
    t1, t2 = _tissue_arrays(["wm", "gm", "fat", "csf"])
    trunc = mrf.epg_fisp(t1, t2, 1.0, sched)
    exact = mrf.epg_fisp(t1, t2, 1.0, sched, n_states=400)
    rel = np.linalg.norm(trunc - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert np.all(rel[:3] < 1e-4)
    assert rel[3] < 0.05  # CSF: documented ~3 %, identical in dictionary and simulation


def test_epg_broadcasts_and_validates():
    sched = mrf.make_schedule("sinusoidal_const_tr", 50, 12.0, 2.0, 21.0)
    sig = mrf.epg_fisp(1000.0, np.array([50.0, 80.0, 120.0]), 1.0, sched)
    assert sig.shape == (3, 50)
    np.testing.assert_array_equal(sig[1], mrf.epg_fisp(1000.0, 80.0, 1.0, sched)[0])
    with pytest.raises(ValueError):
        mrf.epg_fisp(-1.0, 50.0, 1.0, sched)


# ----------------------------------------------------------------------------- dictionary

def test_basis_orthonormal_and_compression_convention(const_site):
    sched, d, _ = const_site
    assert d.basis.shape == (400, 10) and d.basis.dtype == np.complex128
    np.testing.assert_allclose(d.basis.conj().T @ d.basis, np.eye(10), atol=1e-12)
    assert d.atoms.shape == (d.t1.size, 10) and d.norms.shape == (d.t1.size,)
    np.testing.assert_allclose(np.linalg.norm(d.atoms, axis=1), 1.0, rtol=1e-12)
    assert np.all(d.t2 <= d.t1)
    sig = mrf.epg_fisp(*_tissue_arrays(["wm", "gm"]), 1.0, sched)
    x = d.compress(sig)
    np.testing.assert_array_equal(x, sig @ d.basis.conj())
    # rank 10 keeps the fingerprint: the projection x @ basis.T reconstructs it
    rec = x @ d.basis.T
    assert np.all(np.linalg.norm(rec - sig, axis=1) < 0.01 * np.linalg.norm(sig, axis=1))


def test_noiseless_fingerprints_recover_t1_t2_pd(site):
    sched, d, _ = site
    names = list(TISSUES)
    t1, t2 = _tissue_arrays(names)
    pd = np.linspace(0.6, 1.0, len(names))
    m1, m2, mpd = d.match(d.compress(pd[:, None] * mrf.epg_fisp(t1, t2, 1.0, sched)))
    # the neighbouring grid points are within one step; allow a hair of slack
    assert np.all(np.abs(np.log(m1 / t1)) <= STEP_T1 * 1.01), dict(zip(names, m1 / t1))
    assert np.all(np.abs(np.log(m2 / t2)) <= STEP_T2 * 1.01), dict(zip(names, m2 / t2))
    np.testing.assert_allclose(mpd, pd, rtol=0.01)


def test_pd_weighted_mixture_lands_between_components(const_site):
    sched, d, _ = const_site
    t1, t2 = _tissue_arrays(["wm", "csf"])
    fp = d.compress(mrf.epg_fisp(t1, t2, 1.0, sched))
    pd_wm, pd_csf = 0.69, 1.0
    x = np.array([0.7 * pd_wm * fp[0] + 0.3 * pd_csf * fp[1], 0.3 * pd_wm * fp[0] + 0.7 * pd_csf * fp[1]])
    m1, m2, mpd = d.match(x)
    assert np.all((m1 > t1[0]) & (m1 < t1[1])), m1
    assert m1[0] < m1[1]  # more CSF, longer T1
    assert np.all(mpd > 0) and np.all(np.isfinite(mpd))


def test_noise_gives_small_median_error_and_nonzero_spread(const_site):
    sched, d, _ = const_site
    rng = np.random.default_rng(20150607)
    for name in ("wm", "gm"):
        t1, t2 = TISSUES[name]
        x0 = d.compress(mrf.epg_fisp(t1, t2, 1.0, sched))[0]
        sd = 0.01 * np.linalg.norm(x0)  # per complex channel
        noise = sd / np.sqrt(2) * (rng.standard_normal((500, 10)) + 1j * rng.standard_normal((500, 10)))
        m1, m2, mpd = d.match(x0 + noise)
        for est, true in ((m1, t1), (m2, t2), (mpd, 1.0)):
            assert np.median(np.abs(est / true - 1)) < 0.05
            assert np.std(est) > 0


def test_b1_error_biases_t2_not_t1(site):
    """Known FISP behaviour the simulator relies on: B1 < 1 inflates matched T2."""
    sched, d, _ = site
    names = ["wm", "gm", "fat", "lesion", "enhancing"]
    t1, t2 = _tissue_arrays(names)
    m1, m2, _ = d.match(d.compress(mrf.epg_fisp(t1, t2, 0.85, sched)))
    t2_bias = m2 / t2 - 1
    assert np.all(t2_bias > 0.03), dict(zip(names, t2_bias))   # measured: +18..+23 %
    assert np.all(np.abs(m1 / t1 - 1) < 0.05), dict(zip(names, m1 / t1))
    # and the opposite sign above nominal B1
    m1, m2, _ = d.match(d.compress(mrf.epg_fisp(t1, t2, 1.15, sched)))
    assert np.all(m2 / t2 - 1 < -0.03)


def test_match_background_chunking_and_validation(const_site):
    sched, d, _ = const_site
    x = d.compress(mrf.epg_fisp(*_tissue_arrays(list(TISSUES)), 1.0, sched))
    x = np.concatenate([np.zeros((2, 10), complex), x, np.zeros((1, 10), complex)])
    full = d.match(x)
    for out in full:
        assert out.dtype == np.float64 and out.shape == (x.shape[0],)
        assert out[0] == out[1] == out[-1] == 0
        assert np.all(out[2:-1] > 0)
    for a, b in zip(full, d.match(x, chunk=3)):
        np.testing.assert_array_equal(a, b)
    # the real-arithmetic search agrees with the plain complex inner product
    ip = np.abs(x[2:-1] @ d.atoms.conj().T)
    best = np.argmax(ip, axis=1)
    np.testing.assert_array_equal(full[0][2:-1], d.t1[best])
    np.testing.assert_allclose(full[2][2:-1], ip[np.arange(best.size), best] / d.norms[best], rtol=1e-12)
    with pytest.raises(ValueError):
        d.match(x[:, :5])


# ----------------------------------------------------------------------------- LUT

def test_lut_grid_aligned_equals_direct(site):
    sched, d, lut = site
    i1 = np.array([3, 10, 20, 30, 40, 47, 25])
    i2 = np.array([0, 5, 15, 20, 30, 40, 47])  # the last is T2 > T1: stored as T2 = T1
    ib = np.array([0, 2, 4, 4, 6, 8, 4])
    t1, t2, b1 = lut.t1_grid[i1], lut.t2_grid[i2], lut.b1_grid[ib]
    direct = d.compress(mrf.epg_fisp(t1, np.minimum(t2, t1), b1, sched))
    np.testing.assert_allclose(lut.lookup(t1, t2, b1), direct, rtol=0, atol=1e-10)


def test_lut_off_grid_close_to_direct(site):
    sched, d, lut = site
    rng = np.random.default_rng(7)
    n = 200
    t1 = rng.uniform(300, 4000, n)
    t2 = np.minimum(rng.uniform(30, 250, n), t1)
    b1 = rng.uniform(0.7, 1.3, n)
    direct = d.compress(mrf.epg_fisp(t1, t2, b1, sched))
    rel = np.linalg.norm(lut.lookup(t1, t2, b1) - direct, axis=1) / np.linalg.norm(direct, axis=1)
    assert np.median(rel) < 0.005 and rel.max() < 0.02
    t1, t2 = _tissue_arrays(list(TISSUES))
    direct = d.compress(mrf.epg_fisp(t1, t2, 0.93, sched))
    rel = np.linalg.norm(lut.lookup(t1, t2, 0.93) - direct, axis=1) / np.linalg.norm(direct, axis=1)
    assert rel.max() < 0.05  # CSF is worst: the T2 grid is coarse (~14 %) at 1800 ms
    # LUT fingerprints match to the same atoms as exact ones
    for a, b in zip(d.match(lut.lookup(t1, t2, 1.0)), d.match(d.compress(mrf.epg_fisp(t1, t2, 1.0, sched)))):
        np.testing.assert_allclose(a, b, rtol=0.01)


def test_lut_clamps_outside_grid(const_site):
    _, _, lut = const_site
    inside = lut.lookup([100.0, 5000.0], [5.0, 3000.0], [0.6, 1.4])
    outside = lut.lookup([20.0, 9000.0], [1.0, 9000.0], [0.2, 2.0])
    np.testing.assert_allclose(inside, outside, rtol=0, atol=1e-12)
    assert lut.lookup(np.full(5, 900.0), np.full(5, 70.0), np.full(5, 1.0)).shape == (5, 10)


# ----------------------------------------------------------------------------- determinism, caching

def test_builds_are_bit_identical():
    kind = "sinusoidal_var_tr"
    sched = mrf.make_schedule(kind, 400, *SITES[kind])
    d1, l1 = mrf.site_model(kind, 400, *SITES[kind])
    d2 = mrf.MRFDictionary.build(sched)
    l2 = mrf.FingerprintLUT(sched, d2.basis)
    for name in ("t1", "t2", "basis", "atoms", "norms"):
        assert np.array_equal(getattr(d1, name), getattr(d2, name)), name
    assert np.array_equal(l1.values, l2.values)
    rng = np.random.default_rng(3)
    x = l1.lookup(rng.uniform(300, 3000, 300), rng.uniform(40, 200, 300), rng.uniform(0.8, 1.2, 300))
    x = x + 0.02 * (rng.standard_normal(x.shape) + 1j * rng.standard_normal(x.shape))
    for a, b in zip(d1.match(x), d2.match(x)):
        assert np.array_equal(a, b)


def test_site_model_is_cached_and_read_only():
    kind = "sinusoidal_const_tr"
    a = mrf.site_model(kind, 400, *SITES[kind])
    b = mrf.site_model(kind, 400, *SITES[kind])
    assert a[0] is b[0] and a[1] is b[1]
    assert a[0].basis is a[1].basis or np.array_equal(a[0].basis, a[1].basis)
    for arr in (a[0].atoms, a[0].basis, a[0].t1, a[1].values):
        with pytest.raises(ValueError):
            arr.flat[0] = 0


def test_results_do_not_depend_on_thread_count(const_site, monkeypatch):
    sched, d, lut = const_site
    rng = np.random.default_rng(11)
    n = 3000
    t1, t2, b1 = rng.uniform(300, 3000, n), rng.uniform(40, 200, n), rng.uniform(0.8, 1.2, n)
    x = lut.lookup(t1, t2, b1)
    x = x + 0.02 * (rng.standard_normal(x.shape) + 1j * rng.standard_normal(x.shape))
    results = {}
    for workers in (1, 2, 3):
        monkeypatch.setattr(mrf, "_WORKERS", workers)
        results[workers] = d.match(x) + (mrf.epg_fisp(t1[:600], t2[:600], b1[:600], sched),)
    for workers in (2, 3):
        for a, b in zip(results[1], results[workers]):
            assert np.array_equal(a, b)
