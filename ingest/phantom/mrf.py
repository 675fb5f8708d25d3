"""MR Fingerprinting (FISP) forward model, dictionary and template matching.

The phantom simulator uses this module to turn true tissue T1/T2 into MRF maps
that carry the estimation error of a real MRF pipeline: a FISP fingerprint is
simulated with the extended phase graph (EPG), the dictionary is compressed with
an SVD, and each voxel is matched to the atom with the largest normalised inner
product.

References
----------
- D. Ma et al., "Magnetic resonance fingerprinting", Nature 495:187-192 (2013).
- Y. Jiang et al., "MR fingerprinting using fast imaging with steady state
  precession (FISP) with spiral readout", Magn. Reson. Med. 74:1621-1631 (2015).
- M. Weigel, "Extended phase graphs: dephasing, RF pulses, and echoes - pure
  and simple", J. Magn. Reson. Imaging 41:266-295 (2015).
- D. F. McGivney et al., "SVD compression for magnetic resonance
  fingerprinting in the time domain", IEEE Trans. Med. Imaging
  33:2311-2322 (2014).

Conventions the simulator relies on
-----------------------------------
- Signals are rows: ``(N, T)`` complex128, magnetisation per unit M0.
- ``basis`` is ``(T, K)`` with orthonormal columns; each column is a temporal
  basis vector ``b_k``.  Compression is the orthogonal projection coefficient
  ``x_k = <b_k, s> = sum_t conj(b_k[t]) s[t]``, i.e. ``x = s @ basis.conj()``,
  and ``x @ basis.T`` reconstructs the projection of ``s``.  Inner products of
  compressed vectors equal those of the projected signals, so complex Gaussian
  noise of sd ``sigma`` per time point is still complex Gaussian of sd
  ``sigma`` per compressed channel.
- RF pulses have phase 0 and there is no off-resonance, so every FISP signal is
  purely imaginary (``1j * real``) and the SVD basis comes out real.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "FispSchedule",
    "make_schedule",
    "epg_fisp",
    "MRFDictionary",
    "FingerprintLUT",
    "site_model",
    "SCHEDULE_KINDS",
]

SCHEDULE_KINDS = ("sinusoidal_const_tr", "sinusoidal_var_tr")

# Atoms simulated together. Each TR costs ~15 numpy calls per block, so blocks must
# be large enough to amortise the call overhead, yet small enough that a block's
# state arrays (n_states x block float64 each) stay in cache; 4096 was the fastest
# of 1024..16384 here. Results do not depend on it (operations are per atom).
_EPG_BLOCK = 4096
# Threads for the EPG blocks and the matching; both give bit-identical results for
# any count.
_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))

# float64 entries of the (2 x voxels, atoms) score matrix of one matching block:
# 2**19 (4 MiB, ~19 voxels for the default dictionary) keeps the squaring and
# argmax passes in cache; larger blocks only add memory traffic, since the product
# (inner dimension K) is already near peak for ~20-row blocks.
_MATCH_BLOCK = 1 << 19
# OpenBLAS runs a GEMM on one thread when M*N*K <= 65536 * GEMM_MULTITHREAD_THRESHOLD
# (4 by default). The score products are split into atom tiles below that size,
# and the parallelism comes from our own threads instead: when other processes
# keep the cores busy (the phantom simulator runs one process per core), BLAS
# threads wait for each other at every one of the many small calls: matching 10^5
# voxels took 71 s instead of ~5 s.
_BLAS_SINGLE_MNK = 1 << 18


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True, eq=False)
class FispSchedule:
    """Acquisition schedule of a FISP fingerprint (one entry per TR)."""

    flip_deg: np.ndarray
    tr_ms: np.ndarray
    te_ms: float
    ti_ms: float

    def __post_init__(self) -> None:
        flip = np.array(self.flip_deg, dtype=np.float64, copy=True).reshape(-1)
        tr = np.array(self.tr_ms, dtype=np.float64, copy=True).reshape(-1)
        if flip.shape != tr.shape or flip.size == 0:
            raise ValueError(f"flip_deg and tr_ms must be non-empty and of equal length, got {flip.size} and {tr.size}")
        te, ti = float(self.te_ms), float(self.ti_ms)
        if not (te >= 0 and ti >= 0):
            raise ValueError(f"te_ms and ti_ms must be >= 0, got te={te}, ti={ti}")
        if np.any(tr <= te):
            raise ValueError(f"every TR must exceed TE ({te} ms); shortest TR is {tr.min()} ms")
        # Frozen + read-only arrays: site_model caches schedules, so a caller must not
        # be able to change one another caller is using.
        object.__setattr__(self, "flip_deg", _readonly(flip))
        object.__setattr__(self, "tr_ms", _readonly(tr))
        object.__setattr__(self, "te_ms", te)
        object.__setattr__(self, "ti_ms", ti)

    @property
    def n(self) -> int:
        return self.flip_deg.size


def _lobes(n: int, peaks: tuple[float, ...], floor_deg: float) -> np.ndarray:
    # Half-sine lobes that start and end near the floor: smooth flip changes keep the
    # FISP signal free of transient spikes (Jiang 2015) while the differing peaks give
    # the T1/T2 encoding its variety.
    bounds = np.linspace(0, n, len(peaks) + 1).round().astype(int)
    out = np.empty(n)
    for peak, a, b in zip(peaks, bounds[:-1], bounds[1:]):
        m = b - a
        out[a:b] = floor_deg + (peak - floor_deg) * np.sin(np.pi * (np.arange(m) + 0.5) / m)
    return out


def _smooth_tr(n: int, tr_ms: float) -> np.ndarray:
    # A sum of incommensurate sinusoids is smooth and aperiodic over the train, like the
    # Perlin-noise TRs of Jiang 2015, without an RNG. A power warp then puts the range
    # exactly at [tr-2, tr+4] with mean exactly tr, so the header TR (the mean) matches.
    t = np.arange(n) / max(n - 1, 1)
    w = (np.sin(2 * np.pi * 2.3 * t + 0.4)
         + 0.6 * np.sin(2 * np.pi * 5.7 * t + 1.3)
         + 0.35 * np.sin(2 * np.pi * 11.1 * t + 2.9))
    g = (w - w.min()) / (w.max() - w.min())
    lo, hi = 1e-3, 1e3  # mean(g**p) decreases monotonically in p: bisect for 1/3
    for _ in range(200):
        p = np.sqrt(lo * hi)
        if np.mean(g ** p) > 1.0 / 3.0:
            lo = p
        else:
            hi = p
    return tr_ms - 2.0 + 6.0 * g ** np.sqrt(lo * hi)


def make_schedule(kind: str, n: int, tr_ms: float, te_ms: float, ti_ms: float) -> FispSchedule:
    """Deterministic MRF-FISP schedule of ``n`` TRs.

    ``sinusoidal_const_tr``: four half-sine flip lobes peaking at 60/20/45/10 deg
    (floor 5 deg), constant TR. ``sinusoidal_var_tr``: lobes peaking at
    70/30/55/15 deg, TR varying smoothly in ``[tr_ms-2, tr_ms+4]`` with mean ``tr_ms``.
    """
    n = int(n)
    if n < 8:
        raise ValueError(f"an MRF schedule needs at least 8 time points, got {n}")
    if kind == "sinusoidal_const_tr":
        flip = _lobes(n, (60.0, 20.0, 45.0, 10.0), 5.0)
        tr = np.full(n, float(tr_ms))
    elif kind == "sinusoidal_var_tr":
        flip = _lobes(n, (70.0, 30.0, 55.0, 15.0), 5.0)
        tr = _smooth_tr(n, float(tr_ms))
    else:
        raise ValueError(f"unknown MRF schedule kind {kind!r}; valid kinds: {', '.join(SCHEDULE_KINDS)}")
    return FispSchedule(flip, tr, te_ms, ti_ms)


# --------------------------------------------------------------------------- EPG


def _fisp_block(t1, t2, b1, sched: FispSchedule, S: int) -> np.ndarray:
    """Imaginary part of the FISP signal at TE for one block of atoms: (m, T) float64.

    Real-valued EPG: with phase-0 pulses and no off-resonance every F state is
    purely imaginary and every Z state real, so F = i*f with f real and all
    arithmetic is real (4x fewer flops than complex EPG).

    F+ and F- are merged into one array over k = -(S-1)..S-1 with
    F+_k = i f_k and F-_k = conj(F+_{-k}) = -i f_{-k}.  The FISP gradient shift
    then is f_k -> f_{k+1} for every k, which costs nothing here: f lives in a
    buffer whose row for state k at TR j is ``k - j + base``, so advancing j
    relabels the rows instead of moving data; the state pushed past k = S-1 is
    simply never read again (truncation), and the state entering at -(S-1) is
    a row never written (zero).

    The RF rotation about x by angle a, in terms of U_k = f_k + f_{-k}:
        f_{+-k} += D_k,  D_k = (cos a - 1)/2 * U_k - sin a * z_k
        z_k      = sin a / 2 * U_k + cos a * z_k
    (f_0 gets D_0 once; U_0 = 2 f_0). Relaxation over the TR is folded into the
    coefficients to save passes over the state arrays.
    """
    m = t1.size
    T = sched.n
    base = S + T - 2
    f = np.zeros((2 * S + T - 1, m))
    z = np.zeros((S, m))
    U = np.empty((S, m))
    D = np.empty((S, m))
    tmp = np.empty((S, m))
    out = np.empty((T, m))

    r1, r2 = 1.0 / t1, 1.0 / t2
    # Perfect (adiabatic) inversion, then T1 recovery until the first pulse.
    z[0] = 1.0 - 2.0 * np.exp(-sched.ti_ms * r1)
    e2te = np.exp(-sched.te_ms * r2)
    alpha = np.deg2rad(sched.flip_deg)
    tr = sched.tr_ms
    const_tr = bool(np.all(tr == tr[0]))
    if const_tr:
        E1 = np.exp(-tr[0] * r1)
        E2 = np.exp(-tr[0] * r2)
    uniform_b1 = bool(np.all(b1 == b1[0]))

    for j in range(T):
        if not const_tr:
            E1 = np.exp(-tr[j] * r1)
            E2 = np.exp(-tr[j] * r2)
        a = alpha[j] * (b1[0] if uniform_b1 else b1)
        ca, sa = np.cos(a), np.sin(a)
        cD, sD = E2 * (0.5 * (ca - 1.0)), E2 * sa   # RF then T2 decay of the F states
        cZ, sZ = E1 * ca, E1 * (0.5 * sa)           # RF then T1 decay of the Z states

        ks = min(j + 1, S)   # states |k| > j are still empty at TR j
        p = base - j         # row of k = 0
        # Echo: F0 right after the pulse, decayed over TE.
        np.multiply(ca * f[p] - sa * z[0], e2te, out=out[j])
        fpos = f[p:p + ks]
        fneg = f[p - ks + 1:p + 1][::-1]
        Uk, Dk, tk, zk = U[:ks], D[:ks], tmp[:ks], z[:ks]

        np.add(fpos, fneg, out=Uk)
        np.multiply(Uk, cD, out=Dk)
        np.multiply(zk, sD, out=tk)
        Dk -= tk
        np.multiply(Uk, sZ, out=tk)
        zk *= cZ
        zk += tk
        f[p - ks + 1:p + ks] *= E2
        fpos += Dk
        fneg[1:] += Dk[1:]
        z[0] += 1.0 - E1
    return out.T


def _fisp_imag(t1, t2, b1, sched: FispSchedule, n_states: int) -> np.ndarray:
    t1, t2, b1 = (np.ascontiguousarray(v, dtype=np.float64) for v in
                  np.broadcast_arrays(np.atleast_1d(t1), np.atleast_1d(t2), np.atleast_1d(b1)))
    if t1.ndim != 1:
        raise ValueError("t1, t2 and b1 must broadcast to a 1-D array")
    if not (np.all(t1 > 0) and np.all(t2 > 0) and np.all(np.isfinite(b1))):
        raise ValueError("T1 and T2 must be positive and B1 finite")
    S = int(n_states)
    if S < 1:
        raise ValueError(f"n_states must be >= 1, got {n_states}")
    N = t1.size
    out = np.empty((N, sched.n))
    workers = max(1, min(_WORKERS, -(-N // 256)))
    block = min(_EPG_BLOCK, -(-N // workers))

    def run(a: int) -> None:
        b = min(a + block, N)
        out[a:b] = _fisp_block(t1[a:b], t2[a:b], b1[a:b], sched, S)

    # Blocks are independent and write disjoint rows, so the result is bit-identical
    # whatever the number of workers; numpy releases the GIL inside the ufuncs.
    if workers == 1:
        for a in range(0, N, block):
            run(a)
    else:
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(run, range(0, N, block)))
    return out


def epg_fisp(t1_ms, t2_ms, b1, sched: FispSchedule, n_states: int = 25) -> np.ndarray:
    """FISP fingerprints, (N, T) complex128: F0 at TE of each TR for M0 = 1.

    ``t1_ms``, ``t2_ms`` and ``b1`` broadcast to N values; the pulse of TR j
    nutates by ``b1 * flip_deg[j]``.

    ``n_states`` truncates the EPG at dephasing orders |k| < n_states. A
    configuration of order k only contributes to the echo after >= 2k TRs
    spent transverse (k shifts up as F+, k back down as F-), so it is damped
    by at least exp(-2k TR / T2), and by a factor sin^2(alpha/2) < 0.35 on
    each F+ -> F- conversion. With n_states = 25 and TR ~ 12 ms, the
    truncated signal differs from the exact (n_states = T) one by ~1e-7
    (WM) to ~1e-5 (T2 ~ 100 ms) relative, far below MRF noise, and by ~3 %
    for CSF (T2 ~ 1800 ms), where the bound above is weak. Dictionary, LUT
    and simulator all use the same truncation, so matching stays
    self-consistent.
    """
    return 1j * _fisp_imag(t1_ms, t2_ms, b1, sched, n_states)


# --------------------------------------------------------------------------- dictionary

# ~3.5 % log steps: finer than the ~5-10 % scatter MRF maps show in vivo, coarse
# enough that a dictionary plus LUT builds in a couple of seconds.
DEFAULT_T1_GRID = np.geomspace(100.0, 5000.0, 113)
DEFAULT_T2_GRID = np.geomspace(10.0, 3000.0, 164)
DEFAULT_T1_GRID.flags.writeable = False
DEFAULT_T2_GRID.flags.writeable = False


def _gemm_single(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b as row blocks small enough for OpenBLAS to run each on one thread."""
    rows = max(1, _BLAS_SINGLE_MNK // max(1, a.shape[1] * b.shape[1]))
    return np.concatenate([a[r:r + rows] @ b for r in range(0, a.shape[0], rows)])


def _orthonormalise(y: np.ndarray) -> np.ndarray:
    """Columns of y made orthonormal, in order (Gram-Schmidt applied twice).

    Plain numpy reductions rather than LAPACK's QR, for the reason given at
    _BLAS_SINGLE_MNK: a 400 x 40 QR took 300 ms on a busy machine.
    """
    q = np.empty_like(y)
    for j in range(y.shape[1]):
        v = y[:, j].copy()
        for _ in range(2):  # the second pass removes what rounding left of the first
            v -= (q[:, :j] * (q[:, :j] * v[:, None]).sum(axis=0)).sum(axis=1)
        q[:, j] = v / np.sqrt((v * v).sum())
    return q


def _svd_basis(signals_imag: np.ndarray, rank: int) -> np.ndarray:
    """Real (T, rank) orthonormal temporal basis of purely imaginary signals.

    The SVD of 1j*R has the right singular vectors of R, so the basis is real:
    the leading eigenvectors of the (T, T) Gram matrix R^T R (squaring the
    singular values costs nothing in accuracy for the leading ~10 components,
    sigma_10 / sigma_1 ~ 1e-2). They come from subspace iteration and a small
    Rayleigh-Ritz problem rather than a full ``eigh``: LAPACK's tridiagonal
    reduction makes hundreds of small multithreaded BLAS calls and took 2.6 s
    instead of 0.03 s on a busy machine (see _BLAS_SINGLE_MNK).
    """
    gram = signals_imag.T @ signals_imag
    t = gram.shape[0]
    # p = rank + 10 keeps the Rayleigh-Ritz eigh at n <= 20 for the default rank,
    # a size OpenBLAS never threads. sigma_{rank+11} / sigma_rank ~ 0.05 for these
    # dictionaries, so each iteration shrinks the error ~400x: 8 reach rounding.
    p = min(t, rank + 10)
    q = _orthonormalise(np.random.default_rng(0).standard_normal((t, p)))  # fixed seed: deterministic
    for _ in range(8):
        q = _orthonormalise(_gemm_single(gram, q))
    gq = _gemm_single(gram, q)
    h = q.T @ gq
    _, u = np.linalg.eigh(0.5 * (h + h.T))
    basis = q @ u[:, ::-1][:, :rank]
    # Singular vectors are defined up to sign; fix it (largest entry positive) so the
    # compressed values do not depend on LAPACK's choice.
    idx = np.argmax(np.abs(basis), axis=0)
    basis *= np.sign(basis[idx, np.arange(rank)])
    return basis


def _compress_imag(signals_imag: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """compress(1j * signals_imag) for a basis with zero imaginary part, without the complex matmul."""
    return 1j * (signals_imag @ basis.real)


@dataclass(frozen=True, eq=False)
class MRFDictionary:
    """SVD-compressed FISP dictionary over (T1, T2) at a fixed B1.

    ``atoms[i]`` is the compressed fingerprint of (t1[i], t2[i]) divided by its
    norm ``norms[i]``.  See the module docstring for the compression convention.
    """

    t1: np.ndarray      # (D,)
    t2: np.ndarray      # (D,)
    basis: np.ndarray   # (T, K) complex, orthonormal columns
    atoms: np.ndarray   # (D, K) complex, unit norm rows
    norms: np.ndarray   # (D,)
    b1: float = 1.0
    n_states: int = 25

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @classmethod
    def build(cls, sched: FispSchedule, t1_grid=None, t2_grid=None, rank: int = 10,
              b1: float = 1.0, n_states: int = 25) -> "MRFDictionary":
        """Simulate every (T1, T2) pair with T2 <= T1 on the grids, compress to ``rank``."""
        t1g = DEFAULT_T1_GRID if t1_grid is None else np.asarray(t1_grid, dtype=np.float64).reshape(-1)
        t2g = DEFAULT_T2_GRID if t2_grid is None else np.asarray(t2_grid, dtype=np.float64).reshape(-1)
        T1, T2 = np.meshgrid(t1g, t2g, indexing="ij")
        keep = T2 <= T1  # T2 > T1 is unphysical; such atoms would only attract noise
        t1, t2 = T1[keep], T2[keep]
        rank = int(rank)
        if not 1 <= rank <= min(t1.size, sched.n):
            raise ValueError(f"rank must be in [1, {min(t1.size, sched.n)}], got {rank}")
        sig = _fisp_imag(t1, t2, float(b1), sched, n_states)
        basis = _svd_basis(sig, rank)
        comp = _compress_imag(sig, basis)
        norms = np.linalg.norm(comp, axis=1)
        atoms = comp / norms[:, None]
        return cls(_readonly(t1), _readonly(t2), _readonly(basis.astype(np.complex128)),
                   _readonly(atoms), _readonly(norms), float(b1), int(n_states))

    def compress(self, signals: np.ndarray) -> np.ndarray:
        """(N, T) time-domain signals -> (N, K) coefficients: ``signals @ basis.conj()``."""
        return np.asarray(signals) @ self.basis.conj()

    def match(self, x: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Template matching of compressed fingerprints ``x`` (N, K).

        Returns T1, T2 (ms) of the atom maximising |<x, atom>| and
        PD = |<x, atom>| / norm (the M0 scale of the matched atom), float64.
        All-zero fingerprints (background) give 0, 0, 0. Voxels are processed
        ``chunk`` at a time, each chunk in blocks small enough that the
        voxels x atoms scores stay in cache, so memory is bounded for any N.
        Cost is dominated by the score products: ~2.5 s per 10^5 voxels for
        the default dictionary (13,681 atoms) on 2 idle cores, ~6 s when other
        processes share them.
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.rank:
            raise ValueError(f"x must be (N, {self.rank}), got {x.shape}")
        n = x.shape[0]
        t1 = np.zeros(n)
        t2 = np.zeros(n)
        pd = np.zeros(n)
        live = np.flatnonzero(np.any(x != 0, axis=1))
        if live.size == 0:
            return t1, t2, pd

        # Real arithmetic: with atoms a = ar + i*ai and x = xr + i*xi,
        #   Re<x,a> = [xr, xi] . [ar, ai],  Im<x,a> = [xi, -xr] . [ar, ai].
        # Parts of the atoms that are identically zero (ar, with the real SVD basis)
        # are dropped, which halves the work of the complex product.
        ar, ai = self.atoms.real, self.atoms.imag
        has_r, has_i = bool(np.any(ar != 0)), bool(np.any(ai != 0))
        w = np.ascontiguousarray(np.concatenate(
            ([ar.T] if has_r else []) + ([ai.T] if has_i else []), axis=0))  # (k', D)
        D = w.shape[1]
        block = max(1, _MATCH_BLOCK // (2 * D))
        tile = max(1, _BLAS_SINGLE_MNK // (2 * block * w.shape[0]))
        tiles = [(c, min(c + tile, D)) for c in range(0, D, tile)]
        w_tiles = [w[:, a:b] for a, b in tiles]

        def run(lo: int, hi: int) -> None:
            idx = live[lo:hi]
            xb = x[idx].astype(np.complex128, copy=False)
            xr, xi = xb.real, xb.imag
            re = np.concatenate(([xr] if has_r else []) + ([xi] if has_i else []), axis=1)
            im = np.concatenate(([xi] if has_r else []) + ([-xr] if has_i else []), axis=1)
            best = np.empty(idx.size, dtype=np.intp)
            buf = np.empty((2 * block, D))  # reused: a fresh multi-MiB array per block is page-faulted each time
            full = [buf[:, a:b] for a, b in tiles]
            for c in range(0, idx.size, block):
                e = min(c + block, idx.size)
                m = e - c
                pq = buf[:2 * m]
                z = np.concatenate((re[c:e], im[c:e]))
                for wt, out in zip(w_tiles, full if m == block else [pq[:, a:b] for a, b in tiles]):
                    np.matmul(z, wt, out=out)
                np.square(pq, out=pq)
                s2 = pq[:m]
                s2 += pq[m:]
                best[c:e] = np.argmax(s2, axis=1)
            t1[idx] = self.t1[best]
            t2[idx] = self.t2[best]
            # Recomputed per voxel rather than taken from the block scores: BLAS rounds
            # differently for different block heights, and PD should not depend on how
            # the voxels happened to be chunked.
            pd[idx] = np.abs(np.sum(xb * self.atoms[best].conj(), axis=1)) / self.norms[best]

        chunk = max(1, int(chunk))
        for lo in range(0, live.size, chunk):
            hi = min(lo + chunk, live.size)
            nw = max(1, min(_WORKERS, (hi - lo) // (8 * block)))
            if nw == 1:
                run(lo, hi)
            else:
                # Threads own disjoint voxel ranges split on block boundaries, so the
                # blocks (and their rounding) are the same whatever the thread count.
                nblk = -(-(hi - lo) // block)
                edges = np.minimum(lo + block * (np.arange(nw + 1) * nblk // nw), hi)
                with ThreadPoolExecutor(nw) as ex:
                    list(ex.map(run, edges[:-1], edges[1:]))
        return t1, t2, pd


# --------------------------------------------------------------------------- lookup table


class FingerprintLUT:
    """Compressed fingerprints on a regular (log T1, log T2, B1) grid.

    The simulator needs a fingerprint per voxel at arbitrary (T1, T2, B1);
    simulating millions of EPGs is too slow, so it interpolates (multilinear)
    in this table instead. Values use the same compression as
    ``MRFDictionary.compress`` with the ``basis`` given here.
    """

    def __init__(self, sched: FispSchedule, basis: np.ndarray, t1_range=(100.0, 5000.0),
                 t2_range=(5.0, 3000.0), b1_range=(0.6, 1.4), shape=(48, 48, 9), n_states: int = 25):
        n1, n2, nb = (int(v) for v in shape)
        if min(n1, n2, nb) < 2:
            raise ValueError(f"each LUT axis needs >= 2 points, got shape {shape}")
        basis = np.asarray(basis, dtype=np.complex128)
        if basis.ndim != 2 or basis.shape[0] != sched.n:
            raise ValueError(f"basis must be ({sched.n}, K), got {basis.shape}")
        self.basis = _readonly(basis.copy())
        self.t1_grid = _readonly(np.geomspace(*t1_range, n1))
        self.t2_grid = _readonly(np.geomspace(*t2_range, n2))
        self.b1_grid = _readonly(np.linspace(*b1_range, nb))
        self._lo = np.array([np.log(self.t1_grid[0]), np.log(self.t2_grid[0]), self.b1_grid[0]])
        self._step = np.array([np.log(self.t1_grid[-1] / self.t1_grid[0]) / (n1 - 1),
                               np.log(self.t2_grid[-1] / self.t2_grid[0]) / (n2 - 1),
                               (self.b1_grid[-1] - self.b1_grid[0]) / (nb - 1)])
        self._hi = np.array([n1 - 1, n2 - 1, nb - 1], dtype=np.float64)

        T1, T2, B1 = np.meshgrid(self.t1_grid, self.t2_grid, self.b1_grid, indexing="ij")
        # Cells with T2 > T1 exist so interpolation near the T2 = T1 edge has
        # neighbours; they hold the T2 = T1 fingerprint (the physical limit), and
        # simulating each distinct clamped triplet once saves ~20 % of the EPG work.
        trip = np.stack([T1.ravel(), np.minimum(T2, T1).ravel(), B1.ravel()], axis=1)
        uniq, inv = np.unique(trip, axis=0, return_inverse=True)
        if np.all(basis.imag == 0):
            comp = _compress_imag(_fisp_imag(uniq[:, 0], uniq[:, 1], uniq[:, 2], sched, n_states), basis)
        else:
            comp = (1j * _fisp_imag(uniq[:, 0], uniq[:, 1], uniq[:, 2], sched, n_states)) @ basis.conj()
        values = comp[inv.reshape(-1)].reshape(n1, n2, nb, -1)
        self.values = _readonly(np.ascontiguousarray(np.moveaxis(values, -1, 0)))  # (K, n1, n2, nb)
        # Interpolate real and imaginary parts separately; skip parts that are
        # identically zero (all of the real parts with a real basis).
        self._parts = [(k, part, np.ascontiguousarray(getattr(self.values[k], part)))
                       for k in range(self.values.shape[0]) for part in ("real", "imag")
                       if np.any(getattr(self.values[k], part) != 0)]

    @property
    def rank(self) -> int:
        return self.values.shape[0]

    def coordinates(self, t1, t2, b1) -> np.ndarray:
        """Fractional grid indices (3, N), clamped to the grid."""
        t1, t2, b1 = np.broadcast_arrays(np.atleast_1d(np.asarray(t1, dtype=np.float64)),
                                         np.atleast_1d(np.asarray(t2, dtype=np.float64)),
                                         np.atleast_1d(np.asarray(b1, dtype=np.float64)))
        if t1.ndim != 1:
            raise ValueError("t1, t2 and b1 must broadcast to a 1-D array")
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.stack([np.log(t1), np.log(t2), b1])
        c = (c - self._lo[:, None]) / self._step[:, None]
        # log of a negative value is NaN: send it, like log(0) = -inf, to the lowest cell.
        return np.clip(np.nan_to_num(c, nan=0.0, posinf=np.inf, neginf=-np.inf), 0.0, self._hi[:, None])

    def lookup(self, t1, t2, b1) -> np.ndarray:
        """Compressed fingerprints (N, K) complex128 for M0 = 1 at the given T1, T2 (ms), B1."""
        c = self.coordinates(t1, t2, b1)
        out = np.zeros((c.shape[1], self.rank), dtype=np.complex128)
        for k, part, arr in self._parts:
            getattr(out, part)[:, k] = ndimage.map_coordinates(arr, c, order=1, mode="nearest")
        return out


# --------------------------------------------------------------------------- per-site cache


@functools.lru_cache(maxsize=8)
def site_model(kind: str, n: int, tr_ms: float, te_ms: float, ti_ms: float,
               rank: int = 10) -> tuple[MRFDictionary, FingerprintLUT]:
    """Dictionary (B1 = 1) and LUT sharing its basis, built once per process per site.

    The returned objects are shared between callers: their arrays are read-only.
    """
    sched = make_schedule(kind, n, tr_ms, te_ms, ti_ms)
    d = MRFDictionary.build(sched, rank=rank)
    return d, FingerprintLUT(sched, d.basis)
