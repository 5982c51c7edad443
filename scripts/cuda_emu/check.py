#!/usr/bin/env python3
"""Runs the CUDA kernels of lora-kernels/cuda/*.cu on the CPU through a CUDA execution shim
(cuda_emu.h: one OS thread per CUDA thread, real barriers and warp shuffles, shared memory as
per-block statics) and checks every kernel against a NumPy float64 reference, with the launch
shapes lora-kernels/src/cuda/ and cuda_accel.rs use. Outputs the kernels must write are
NaN-filled first, so an unwritten element fails.

It checks the kernels' code on a machine without a GPU: their index math, tiling, barriers,
shuffles, reductions, masks and dropout hash. It is not a GPU test (no real warp scheduling,
memory model or hardware math: tolerances are those of f32 arithmetic), and it does not run
the Rust launch code (lora-kernels/tests/cuda_parity.rs and cuda_accel.rs do, on a GPU).

    python3 scripts/cuda_emu/check.py        # needs g++ (C++20) and NumPy; about a minute
"""
import ctypes
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CU = os.path.join(ROOT, "lora-kernels", "cuda")
SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu.h")
FILES = ["elementwise.cu", "rows.cu", "adamw.cu", "lora.cu", "attention.cu", "conv.cu", "pool.cu", "boxes.cu"]
SIG = re.compile(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', re.S)


class ConvDims(ctypes.Structure):
    """conv.cu's `ConvDims`, passed by value."""
    _fields_ = [(f, ctypes.c_int) for f in "c h w kh kw sh sw ph pw dh dw groups oh ow".split()]


class PoolDims(ctypes.Structure):
    """pool.cu's `PoolDims`, passed by value."""
    _fields_ = [(f, ctypes.c_int) for f in "h w kh kw sh sw ph pw oh ow".split()]


def ctype(t):
    t = t.replace("const", "").replace("__restrict__", "").strip()
    if "*" in t:
        return ctypes.c_void_p
    if t == "ConvDims":
        return ConvDims
    if t == "PoolDims":
        return PoolDims
    return {"int": ctypes.c_int, "long long": ctypes.c_longlong, "float": ctypes.c_float,
            "u64": ctypes.c_uint64, "unsigned int": ctypes.c_uint}[" ".join(t.split())]


def build(tmp):
    prelude = open(os.path.join(CU, "prelude.cuh")).read()
    kernels = {}
    for f in FILES:
        code = open(os.path.join(CU, f)).read()
        wrappers = []
        for name, params in SIG.findall(code):
            ps = [" ".join(p.split()) for p in params.split(",")]
            names = [re.findall(r"\w+", p)[-1] for p in ps]
            wrappers.append(
                f'extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                f'unsigned by, unsigned bz, {", ".join(ps)}) {{ emu::launch({name}, '
                f'dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, {", ".join(names)}); }}')
            kernels[name] = (f, [ctype(" ".join(p.split()[:-1])) for p in ps])
        src = os.path.join(tmp, f + ".cpp")
        with open(src, "w") as out:
            out.write(f'#include "{SHIM}"\n{prelude}\n#line 1 "{f}"\n{code}\n' + "\n".join(wrappers))
        lib = os.path.join(tmp, f + ".so")
        subprocess.run(["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-w", "-o", lib,
                        src], check=True)
    libs = {f: ctypes.CDLL(os.path.join(tmp, f + ".so")) for f in FILES}
    return libs, kernels


class K:
    def __init__(self, libs, kernels):
        self.libs, self.kernels = libs, kernels

    def __call__(self, name, grid, block, *args):
        f, types = self.kernels[name]
        fn = getattr(self.libs[f], "emu_" + name)
        fn.argtypes = [ctypes.c_uint] * 6 + types
        fn.restype = None
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        conv = []
        for a, t in zip(args, types):
            if t is ctypes.c_void_p:
                conv.append(None if a is None else a.ctypes.data)
            elif isinstance(a, ctypes.Structure):
                conv.append(a)
            else:
                conv.append(t(a))
        assert len(args) == len(types), (name, len(args), len(types))
        fn(*grid, *block, *conv)


failures = []
worst = {}


def check(what, got, want, tol):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if np.isnan(got).any() and not np.isnan(want).any():
        failures.append(f"{what}: {int(np.isnan(got).sum())} elements not written")
        return
    scale = max(np.abs(want).max(initial=0.0), 1e-6)
    err = float(np.nanmax(np.abs(got - want), initial=0.0) / scale)
    worst[what] = err
    if err > tol:
        failures.append(f"{what}: relative error {err:.2e} > {tol:.0e}")


rng = np.random.default_rng(0)


def rnd(*shape, s=1.0):
    return (rng.uniform(-s, s, size=shape)).astype(np.float32)


def nan(*shape):
    return np.full(shape, np.nan, np.float32)


M64 = (1 << 64) - 1


def splitmix(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def mask(p, seed, n, k):
    if p <= 0:
        return np.ones((n, k))
    m = np.empty(n * k)
    for idx in range(n * k):
        h = splitmix(seed ^ splitmix(idx))
        uni = np.float32(h >> 40) * np.float32(1.0 / 16777216.0)
        m[idx] = 0.0 if uni < np.float32(p) else float(np.float32(1.0) / (np.float32(1.0) - np.float32(p)))
    return m.reshape(n, k)


def elementwise(k):
    n = 1000
    g = (2,)  # two blocks: the grid-stride loops take several turns
    x, y, d = rnd(n, s=3), rnd(n, s=2), rnd(n)
    X, Y, D = (v.astype(np.float64) for v in (x, y, d))
    o = nan(n); k("add_forward", g, (256,), o, x, y, n); check("add_forward", o, X + Y, 1e-6)
    a = x.copy(); k("accumulate", g, (256,), a, y, n); check("accumulate", a, X + Y, 1e-6)
    a = x.copy(); k("scale_in_place", g, (256,), a, np.float32(-0.37), n)
    check("scale_in_place", a, X * np.float64(np.float32(-0.37)), 1e-6)
    rows, m = 40, 25
    yb, b = rnd(rows, m), rnd(m)
    a = yb.copy(); k("bias_add", g, (256,), a, b, rows, m)
    check("bias_add", a, yb.astype(np.float64) + b, 1e-6)
    kk, c = 0.7978845608028654, 0.044715
    th = np.tanh(kk * (X + c * X**3))
    o = nan(n); k("gelu_forward", g, (256,), o, x, n); check("gelu_forward", o, 0.5 * X * (1 + th), 1e-6)
    grad = 0.5 * (1 + th) + 0.5 * X * (1 - th**2) * kk * (1 + 3 * c * X**2)
    a = y.copy(); k("gelu_backward", g, (256,), a, d, x, n); check("gelu_backward", a, Y + D * grad, 1e-5)
    sg = 1 / (1 + np.exp(-X))
    erfc = np.vectorize(math.erfc)(-X / math.sqrt(2))
    o = nan(n); k("gelu_erf_forward", g, (256,), o, x, n); check("gelu_erf_forward", o, 0.5 * X * erfc, 1e-6)
    ge = 0.5 * erfc + X * np.exp(-0.5 * X * X) / math.sqrt(2 * math.pi)
    a = y.copy(); k("gelu_erf_backward", g, (256,), a, d, x, n); check("gelu_erf_backward", a, Y + D * ge, 1e-5)
    sq = 1 / (1 + np.exp(-1.702 * X))
    o = nan(n); k("quick_gelu_forward", g, (256,), o, x, n); check("quick_gelu_forward", o, X * sq, 1e-6)
    a = y.copy(); k("quick_gelu_backward", g, (256,), a, d, x, n)
    check("quick_gelu_backward", a, Y + D * (sq + 1.702 * X * sq * (1 - sq)), 1e-5)
    o = nan(n); k("relu_forward", g, (256,), o, x, n); check("relu_forward", o, np.maximum(X, 0), 0.0)
    a = y.copy(); k("relu_backward", g, (256,), a, d, x, n); check("relu_backward", a, Y + D * (X > 0), 1e-7)
    sg_ = 1 / (1 + np.exp(-X))
    o = nan(n); k("sigmoid_forward", g, (256,), o, x, n); check("sigmoid_forward", o, sg_, 1e-6)
    a = y.copy(); k("sigmoid_backward", g, (256,), a, d, x, n)
    check("sigmoid_backward", a, Y + D * sg_ * (1 - sg_), 1e-6)
    o = nan(n); k("silu_forward", g, (256,), o, x, n); check("silu_forward", o, X * sg, 1e-6)
    a = y.copy(); k("silu_backward", g, (256,), a, d, x, n)
    check("silu_backward", a, Y + D * sg * (1 + X * (1 - sg)), 1e-5)
    o = nan(n); k("swiglu_forward", g, (256,), o, x, y, n); check("swiglu_forward", o, X * sg * Y, 1e-6)
    dg, du = rnd(n), rnd(n)
    DG, DU = dg.astype(np.float64), du.astype(np.float64)
    k("swiglu_backward", g, (256,), dg, du, d, x, y, n)
    check("swiglu_backward dgate", dg, DG + D * Y * sg * (1 + X * (1 - sg)), 1e-5)
    check("swiglu_backward dup", du, DU + D * X * sg, 1e-5)
    # GEGLU over rows [hidden | gate] of width 2f (diffusers' GEGLU, exact GELU on the gate).
    for rows, f in [(7, 5), (3, 64), (1, 1)]:
        xg = rnd(rows, 2 * f); XG = xg.astype(np.float64)
        H, G = XG[:, :f], XG[:, f:]
        erfc_g = np.vectorize(math.erfc)(-G / math.sqrt(2))
        ge_g = 0.5 * G * erfc_g
        o = nan(rows, f); k("geglu_forward", (4,), (256,), o, xg, rows * f, f)
        check(f"geglu_forward {rows}x{f}", o, H * ge_g, 1e-6)
        dgo = rnd(rows, f); DGO = dgo.astype(np.float64)
        dx = rnd(rows, 2 * f); want = dx.astype(np.float64)
        want[:, :f] += DGO * ge_g
        want[:, f:] += DGO * H * (0.5 * erfc_g + G * np.exp(-0.5 * G * G) / math.sqrt(2 * math.pi))
        k("geglu_backward", (4,), (256,), dx, dgo, xg, rows * f, f)
        check(f"geglu_backward {rows}x{f}", dx, want, 1e-5)
    # A per-plane bias (the UNet's time embedding over (B, C, H, W)) and its gradient: one warp
    # per plane, planes of fewer and more than 32 values.
    for planes, inner in [(6, 35), (3, 1), (40, 100)]:
        xb, bb = rnd(planes, inner), rnd(planes)
        o = nan(planes, inner)
        k("add_planes_forward", (3,), (256,), o, xb, bb, planes * inner, inner)
        check(f"add_planes_forward {planes}x{inner}", o, xb + bb[:, None], 0.0)  # one f32 add: exact
        db = rnd(planes); want = db.astype(np.float64) + xb.astype(np.float64).sum(1)
        k("add_planes_backward_bias", ((planes * 32 + 255) // 256,), (256,), db, xb, planes, inner)
        check(f"add_planes_backward_bias {planes}x{inner}", db, want, 1e-5)
    bits = (np.arange(65536, dtype=np.uint32)).astype(np.uint16)
    o = nan(65536); k("widen_bf16", (64,), (256,), o, bits, 65536)
    want = (bits.astype(np.uint32) << 16).view(np.float32)
    same = (o.view(np.uint32) == want.view(np.uint32))
    if not same.all():
        failures.append(f"widen_bf16: {int((~same).sum())} patterns differ")
    o = nan(65536); k("widen_f16", (64,), (256,), o, bits, 65536)
    want = bits.view(np.float16).astype(np.float32)
    same = (o.view(np.uint32) == want.view(np.uint32)) | (np.isnan(o) & np.isnan(want))
    if not same.all():
        failures.append(f"widen_f16: {int((~same).sum())} patterns differ")
    rows, cols, start, ln = 13, 40, 7, 19
    xs = rnd(rows, cols)
    o = nan(rows, ln); k("narrow_forward", g, (256,), o, xs, rows, cols, start, ln)
    check("narrow_forward", o, xs[:, start:start + ln], 0)
    dx, dd = rnd(rows, cols), rnd(rows, ln)
    want = dx.astype(np.float64); want[:, start:start + ln] += dd
    k("narrow_backward", g, (256,), dx, dd, rows, cols, start, ln)
    check("narrow_backward", dx, want, 1e-6)
    b, m, n = 3, 37, 70
    xs = rnd(b, m, n)
    o = nan(b, n, m); k("transpose_last2", g, (256,), o, xs, b, m, n, 0)
    check("transpose_last2", o, xs.transpose(0, 2, 1), 0)
    acc = rnd(b, n, m); want = acc.astype(np.float64) + xs.transpose(0, 2, 1)
    k("transpose_last2", g, (256,), acc, xs, b, m, n, 1)
    check("transpose_last2 (acc)", acc, want, 1e-6)


def rows_ops(k):
    n, c = 7, 300  # c > 256: the row loops take two turns
    x, gm, bt, d = rnd(n, c, s=2), rnd(c), rnd(c), rnd(n, c)
    X, G, Bt, D = (v.astype(np.float64) for v in (x, gm, bt, d))
    mu = X.mean(1, keepdims=True)
    rs = 1 / np.sqrt(((X - mu) ** 2).mean(1, keepdims=True) + 1e-5)
    nrm = (X - mu) * rs
    o, mean, rstd = nan(n, c), nan(n), nan(n)
    k("layernorm_forward", (n,), (256,), o, mean, rstd, x, gm, bt, n, c, np.float32(1e-5))
    check("layernorm_forward", o, nrm * G + Bt, 1e-5)
    o2 = nan(n, c); m2, r2 = nan(n), nan(n)
    k("layernorm_forward", (n,), (256,), o2, m2, r2, x, gm, None, n, c, np.float32(1e-5))
    check("layernorm_forward (no beta)", o2, nrm * G, 1e-5)
    check("layernorm mean", mean, mu[:, 0], 1e-6)
    check("layernorm rstd", rstd, rs[:, 0], 1e-5)
    dn = D * G
    want = rs * (dn - dn.mean(1, keepdims=True) - nrm * (dn * nrm).mean(1, keepdims=True))
    dx = rnd(n, c)
    want = dx.astype(np.float64) + want
    k("layernorm_backward", (n,), (256,), dx, d, x, gm, mean, rstd, n, c)
    check("layernorm_backward", dx, want, 1e-5)
    dg, db = rnd(c), rnd(c)
    wg, wb = dg + (D * nrm).sum(0), db + D.sum(0)
    k("layernorm_backward_params", ((c + 255) // 256,), (256,), dg, db, d, x, mean, rstd, n, c)
    check("layernorm_backward_params dgamma", dg, wg, 1e-5)
    check("layernorm_backward_params dbeta", db, wb, 1e-5)
    # GroupNorm: 2 samples, 6 channels in 2 groups, 100 pixels: rows of 300 values, so the
    # block loops take two turns.
    gn, gc, gs, gg = 2, 6, 100, 2
    gx, ggm, gbt, gd = rnd(gn, gc, gs, s=2), rnd(gc), rnd(gc), rnd(gn, gc, gs)
    GX, GG, GB, GD = (v.astype(np.float64) for v in (gx, ggm, gbt, gd))
    xr = GX.reshape(gn, gg, -1)
    gmu = xr.mean(2, keepdims=True)
    grs = 1 / np.sqrt(((xr - gmu) ** 2).mean(2, keepdims=True) + 1e-5)
    gnrm = ((xr - gmu) * grs).reshape(gn, gc, gs)
    o, mean, rstd = nan(gn, gc, gs), nan(gn * gg), nan(gn * gg)
    k("groupnorm_forward", (gn * gg,), (256,), o, mean, rstd, gx, ggm, gbt, gn * gg, gg, gc // gg, gs, np.float32(1e-5))
    check("groupnorm_forward", o, gnrm * GG[None, :, None] + GB[None, :, None], 1e-5)
    check("groupnorm mean", mean, gmu.reshape(-1), 1e-6)
    check("groupnorm rstd", rstd, grs.reshape(-1), 1e-5)
    dn = (GD * GG[None, :, None]).reshape(gn, gg, -1)
    nr = gnrm.reshape(gn, gg, -1)
    gwant = (grs * (dn - dn.mean(2, keepdims=True) - nr * (dn * nr).mean(2, keepdims=True))).reshape(gn, gc, gs)
    dx = rnd(gn, gc, gs)
    gwant = dx.astype(np.float64) + gwant
    k("groupnorm_backward", (gn * gg,), (256,), dx, gd, gx, ggm, mean, rstd, gn * gg, gg, gc // gg, gs)
    check("groupnorm_backward", dx, gwant, 1e-5)
    dg, db = rnd(gc), rnd(gc)
    wg, wb = dg + (GD * gnrm).sum((0, 2)), db + GD.sum((0, 2))
    k("groupnorm_backward_params", (gc,), (256,), dg, db, gd, gx, mean, rstd, gn, gc, gg, gs)
    check("groupnorm_backward_params dgamma", dg, wg, 1e-5)
    check("groupnorm_backward_params dbeta", db, wb, 1e-5)
    rr = 1 / np.sqrt((X**2).mean(1, keepdims=True) + 1e-6)
    o, rstd = nan(n, c), nan(n)
    k("rmsnorm_forward", (n,), (256,), o, rstd, x, gm, n, c, np.float32(1e-6))
    check("rmsnorm_forward", o, X * rr * G, 1e-5)
    dx = rnd(n, c)
    want = dx.astype(np.float64) + rr * (D * G - X * rr**2 * (D * G * X).mean(1, keepdims=True))
    k("rmsnorm_backward", (n,), (256,), dx, d, x, gm, rstd, n, c)
    check("rmsnorm_backward", dx, want, 1e-5)
    dg = rnd(c)
    want = dg + (D * X * rr).sum(0)
    k("rmsnorm_backward_params", ((c + 255) // 256,), (256,), dg, d, x, rstd, n, c)
    check("rmsnorm_backward_params", dg, want, 1e-5)
    v = 11
    table = rnd(v, c)
    ids = np.array([0, 5, 10, 5, 3, 1, 9], np.uint32)
    o = nan(n, c); k("embedding_forward", (n,), (256,), o, table, ids, n, c)
    check("embedding_forward", o, table[ids], 0)
    dt = rnd(v, c)
    want = dt.astype(np.float64)
    for i, t in enumerate(ids):
        want[t] += D[i]
    k("embedding_backward", ((c + 255) // 256,), (256,), dt, d, ids, n, c)
    check("embedding_backward", dt, want, 1e-6)
    h, hd, maxp = 3, 10, 12
    half = hd // 2
    cos, sin = rnd(maxp, half), rnd(maxp, half)
    pos = np.array([0, 3, 11, 2, 2, 7, 1], np.uint32)
    xr = rnd(n, h * hd)
    XR = xr.astype(np.float64).reshape(n, h, hd)
    C, S = cos[pos][:, None, :].astype(np.float64), sin[pos][:, None, :].astype(np.float64)
    x1, x2 = XR[..., :half], XR[..., half:]
    want = np.concatenate([x1 * C - x2 * S, x2 * C + x1 * S], -1).reshape(n, h * hd)
    o = nan(n, h * hd); k("rope_forward", (n,), (256,), o, xr, cos, sin, pos, n, h, hd)
    check("rope_forward", o, want, 1e-6)
    dxr, dr = rnd(n, h * hd), rnd(n, h * hd)
    D1, D2 = dr.astype(np.float64).reshape(n, h, hd)[..., :half], dr.astype(np.float64).reshape(n, h, hd)[..., half:]
    want = dxr.astype(np.float64) + np.concatenate([D1 * C + D2 * S, D2 * C - D1 * S], -1).reshape(n, h * hd)
    k("rope_backward", (n,), (256,), dxr, dr, cos, sin, pos, n, h, hd)
    check("rope_backward", dxr, want, 1e-6)
    v = 700  # > 256 classes per row
    logits = rnd(n, v, s=4)
    L = logits.astype(np.float64)
    targets = np.array([3, -100, 699, 0, 256, 255, 12], np.int32)
    lse_w = np.log(np.exp(L - L.max(1, keepdims=True)).sum(1)) + L.max(1)
    rl_w = np.where(targets >= 0, lse_w - L[np.arange(n), np.maximum(targets, 0)], 0.0)
    lse, rl = nan(n), nan(n)
    k("cross_entropy_forward", (n,), (256,), lse, rl, logits, targets, n, v)
    check("cross_entropy_forward lse", lse, lse_w, 1e-6)
    check("cross_entropy_forward row_loss", rl, rl_w, 1e-5)
    dl = rnd(n, v)
    sc = np.float32(0.5 / 6)
    p = np.exp(L - lse_w[:, None])
    onehot = np.zeros((n, v)); onehot[np.arange(n), np.maximum(targets, 0)] = 1
    want = dl.astype(np.float64) + np.where(targets[:, None] >= 0, float(sc) * (p - onehot), 0.0)
    k("cross_entropy_backward", (n,), (256,), dl, logits, lse, targets, n, v, sc)
    check("cross_entropy_backward", dl, want, 1e-5)
    # Gradient-norm sums: buffers of 0, 1, 255, 256, 257 and 5,000 values, one block each.
    bufs = [rnd(c) for c in (0, 1, 255, 256, 257, 5000)] + [rnd(3) * 0]
    ptrs = np.array([b.ctypes.data for b in bufs], np.uint64)
    lens = np.array([b.size for b in bufs], np.int64)
    out = np.full(len(bufs), np.nan)
    k("sum_squares_many", (len(bufs),), (256,), out, ptrs, lens, len(bufs))
    check("sum_squares_many", out, [float((b.astype(np.float64) ** 2).sum()) for b in bufs], 1e-12)


def adamw(k):
    n = 777
    p, g, m = rnd(n), rnd(n, s=0.5), rnd(n, s=0.05)
    v = np.abs(rnd(n, s=0.01))
    lr, b1, b2, eps, wd, t = 1e-2, 0.9, 0.999, 1e-8, 0.1, 3
    decay, ss, bc2 = 1 - lr * wd, lr / (1 - b1**t), np.sqrt(1 - b2**t)
    P, G, Mo, V = (a.astype(np.float64) for a in (p, g, m, v))
    Mw = b1 * Mo + (1 - b1) * G
    Vw = b2 * V + (1 - b2) * G * G
    Pw = P * decay - ss * Mw / (np.sqrt(Vw) / bc2 + eps)
    f = np.float32
    k("adamw_step", (4,), (256,), p, g, m, v, n, f(decay), f(b1), f(b2), f(eps), f(ss), f(bc2))
    check("adamw_step param", p, Pw, 1e-6)
    check("adamw_step m", m, Mw, 1e-6)
    check("adamw_step v", v, Vw, 1e-6)


def lora_split(sms, base, extent, unit):
    """cuda/lora.rs's lora_split: (splits, chunk) of a reduction over `extent` in whole `unit`s."""
    units = max(-(-extent // unit), 1)
    want = min(max(min(-(-2 * max(sms, 1) // max(base, 1)), 32), 1), units)
    chunk = -(-units // want) * unit
    return max(-(-extent // chunk), 1), chunk


def reduce_into(k, out, part, parts, length, acc=0):
    k("lora_reduce_partials", ((length + 255) // 256,), (256,), out, part, parts, length, acc)


def lora(k):
    TN, TC, TK = 32, 64, 32
    # The values cuda/lora.rs's split_tests pin, so this mirror cannot drift from lora_split.
    for args, want in [((132, 16, 4096, 64), (16, 256)), ((132, 64, 768, 32), (5, 160)),
                       ((132, 300, 768, 32), (1, 768)), ((132, 1, 100_000, 64), (32, 3136)),
                       ((132, 1, 5, 64), (1, 64))]:
        assert lora_split(*args) == want, (args, lora_split(*args), want)
    cases = [(70, 45, 33, 3, 0.25), (33, 130, 70, 64, 0.0), (5, 7, 9, 1, 0.5), (40, 300, 200, 8, 0.1),
             (9, 70, 20, 80, 0.0)]
    # sms = 1: one split (the kernels write u / g directly); 132 (an H200): split reductions.
    for sms in (1, 132):
        for (n, kk, m, r, p) in cases:
            tag = f"n{n} k{kk} m{m} r{r} p{p} sms{sms}"
            x, A, B, bias = rnd(n, kk), rnd(r, kk), rnd(m, r), rnd(m)
            seed, s = 1234567, np.float32(1.7)
            drop = mask(p, seed, n, kk)
            X, Aw, Bw = x.astype(np.float64), A.astype(np.float64), B.astype(np.float64)
            u = nan(n, r)
            splits, kc = lora_split(sms, ((n + TN - 1) // TN) * ((r + 63) // 64), kk, TK)
            part = nan(splits, n, r) if splits > 1 else u
            k("lora_shrink", ((n + TN - 1) // TN, (r + 63) // 64, splits), (256,), part, x, A, n, kk, r,
              kc, np.float32(p), seed)
            if splits > 1:
                reduce_into(k, u, part, splits, n * r)
            Uw = (X * drop) @ Aw.T
            check(f"lora_shrink {tag} ({splits} k splits)", u, Uw, 1e-5)
            y = rnd(n, m)
            want = y.astype(np.float64) + bias + float(s) * u.astype(np.float64) @ Bw.T
            k("lora_expand", ((n + TN - 1) // TN, (m + TC - 1) // TC), (256,), y, u, B, bias, n, m, r, s)
            check(f"lora_expand {tag}", y, want, 1e-5)
            if r > 64:
                continue  # the fused backward takes r <= 64 (cuda/lora.rs refuses larger ranks)
            dy = rnd(n, m)
            DY = dy.astype(np.float64)
            blocks = (n + TN - 1) // TN
            splits, mc = lora_split(sms, blocks, m, TC)
            g, dbp, dbiasp = nan(n, r), nan(blocks, m, r), nan(blocks, m)
            part = nan(splits, n, r) if splits > 1 else g
            k("lora_backward_g_db", (blocks, splits), (256,), part, dbp, dbiasp, dy, B, u, n, m, r, mc, s)
            if splits > 1:
                reduce_into(k, g, part, splits, n * r)
            U = u.astype(np.float64)
            check(f"lora_backward_g_db g {tag} ({splits} m splits)", g, float(s) * DY @ Bw, 1e-5)
            # dB and db not wanted (null partials): g alone, still complete.
            g2 = nan(n, r)
            part2 = nan(splits, n, r) if splits > 1 else g2
            k("lora_backward_g_db", (blocks, splits), (256,), part2, None, None, dy, B, u, n, m, r, mc, s)
            if splits > 1:
                reduce_into(k, g2, part2, splits, n * r)
            check(f"lora_backward_g_db g only {tag}", g2, float(s) * DY @ Bw, 1e-5)
            dB, dbias = nan(m, r), rnd(m)
            reduce_into(k, dB, dbp, blocks, m * r)
            check(f"dB {tag}", dB, float(s) * DY.T @ U, 1e-5)
            want = dbias.astype(np.float64) + DY.sum(0)
            reduce_into(k, dbias, dbiasp, blocks, m, 1)
            check(f"dbias (accumulated) {tag}", dbias, want, 1e-5)
            segs, rps = lora_split(sms, (kk + TC - 1) // TC, n, TN)
            dap = nan(segs, r, kk)
            k("lora_backward_da", ((kk + TC - 1) // TC, segs), (256,), dap, g, x, n, kk, r, rps,
              np.float32(p), seed)
            dA = nan(r, kk)
            reduce_into(k, dA, dap, segs, r * kk)
            Gw = g.astype(np.float64)
            check(f"dA {tag} ({segs} row segments)", dA, Gw.T @ (X * drop), 1e-5)
            dx = rnd(n, kk)
            want = dx.astype(np.float64) + drop * (Gw @ Aw)
            k("lora_backward_dx", ((n + TN - 1) // TN, (kk + TC - 1) // TC), (256,), dx, g, A, n, kk, r,
              np.float32(p), seed)
            check(f"lora_backward_dx {tag}", dx, want, 1e-5)
    # A long sequence: several dA row segments of many row tiles each.
    n, kk, r = 1100, 20, 4
    x, g = rnd(n, kk), rnd(n, r)
    segs, rps = lora_split(132, (kk + TC - 1) // TC, n, TN)
    dap = nan(segs, r, kk)
    k("lora_backward_da", ((kk + TC - 1) // TC, segs), (256,), dap, g, x, n, kk, r, rps, np.float32(0.0), 0)
    dA = nan(r, kk)
    reduce_into(k, dA, dap, segs, r * kk)
    check(f"dA n{n} ({segs} segments)", dA, g.astype(np.float64).T @ x.astype(np.float64), 1e-5)


def attention(k):
    # (B, T, S, Hq, Hkv, D, causal): S keys per sequence (S != T: cross-attention).
    for (B, T, S, Hq, Hkv, D, causal) in [(2, 5, 5, 4, 2, 8, 1), (1, 40, 40, 2, 1, 16, 1),
                                          (1, 70, 70, 3, 3, 128, 1), (2, 33, 33, 6, 2, 5, 1),
                                          (2, 5, 5, 4, 2, 8, 0), (1, 40, 40, 2, 1, 16, 0),
                                          (2, 33, 33, 6, 2, 5, 0), (2, 37, 7, 2, 2, 8, 0),
                                          (1, 6, 45, 4, 2, 16, 0), (2, 9, 1, 2, 1, 4, 0)]:
        tag = f"B{B} T{T} S{S} Hq{Hq} Hkv{Hkv} D{D}" + ("" if causal else " bidirectional")
        scale = np.float32(1 / np.sqrt(D))
        q, kk, v = rnd(B, T, Hq, D), rnd(B, S, Hkv, D), rnd(B, S, Hkv, D)
        dout = rnd(B, T, Hq, D)
        Q, Kk, V, DO = (a.astype(np.float64) for a in (q, kk, v, dout))
        rep = Hq // Hkv
        Kq, Vq = np.repeat(Kk, rep, axis=2), np.repeat(V, rep, axis=2)
        s = np.einsum("bihd,bjhd->bhij", Q, Kq) * float(scale)
        if causal:
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        lse_w = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
        P = np.exp(s - lse_w[..., None])
        O = np.einsum("bhij,bjhd->bihd", P, Vq)
        grid = ((T + 7) // 8, Hq, B)
        out, lse = nan(B, T, Hq, D), nan(B, Hq, T)
        k("attention_forward", grid, (128,), out, lse, q, kk, v, T, S, Hq, Hkv, D, scale, causal)
        check(f"attention_forward out {tag}", out, O, 1e-5)
        check(f"attention_forward lse {tag}", lse, lse_w, 1e-5)
        delta = nan(B, Hq, T)
        k("attention_backward_delta", grid, (128,), delta, dout, q, kk, v, T, S, Hq, Hkv, D, scale, causal)
        delta_w = np.einsum("bihd,bihd->bhi", DO, O)
        check(f"attention_backward_delta {tag}", delta, delta_w, 1e-5)
        dP = np.einsum("bihd,bjhd->bhij", DO, Vq)
        dS = P * (dP - delta_w[..., None])
        dQ = np.einsum("bhij,bjhd->bihd", dS, Kq) * float(scale)
        dKq = np.einsum("bhij,bihd->bjhd", dS, Q) * float(scale)
        dVq = np.einsum("bhij,bihd->bjhd", P, DO)
        dK = dKq.reshape(B, S, Hkv, rep, D).sum(3)
        dV = dVq.reshape(B, S, Hkv, rep, D).sum(3)
        dq = rnd(B, T, Hq, D)
        want = dq.astype(np.float64) + dQ
        k("attention_backward_dq", grid, (128,), dq, dout, lse, delta, q, kk, v, T, S, Hq, Hkv, D, scale, causal)
        check(f"attention_backward_dq {tag}", dq, want, 1e-5)
        dk, dv = rnd(B, S, Hkv, D), rnd(B, S, Hkv, D)
        wk, wv = dk.astype(np.float64) + dK, dv.astype(np.float64) + dV
        k("attention_backward_dkv", ((S + 7) // 8, Hkv, B), (128,), dk, dv, dout, lse, delta, q, kk, v, T, S, Hq, Hkv, D, scale, causal)
        check(f"attention_backward_dkv dk {tag}", dk, wk, 1e-5)
        check(f"attention_backward_dkv dv {tag}", dv, wv, 1e-5)


def conv(k):
    """im2col and col2im of conv.cu against NumPy: grouped, strided, padded, dilated, for each
    image of a batch (the launches of lora-kernels/src/cuda/conv.rs)."""
    for (N, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, g) in [
            (2, 4, 7, 6, 3, 2, 2, 1, 1, 1, 1, 2, 2), (1, 3, 8, 8, 4, 4, 4, 4, 0, 0, 1, 1, 1),
            (1, 2, 3, 5, 1, 1, 1, 1, 2, 0, 1, 1, 2)]:
        tag = f"N{N} C{C} {H}x{W} k{KH}x{KW} s{sh},{sw} p{ph},{pw} d{dh},{dw} g{g}"
        oh = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
        ow = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
        cg = C // g
        K, P = cg * KH * KW, oh * ow
        d = ConvDims(C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, g, oh, ow)
        x = rnd(N, C, H, W)
        xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        for img in range(N):
            want = np.zeros((g, cg, KH, KW, oh, ow))
            for i in range(KH):
                for j in range(KW):
                    ys = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
                    xs = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
                    want[:, :, i, j] = xp[img, :, ys, xs].reshape(g, cg, oh, ow)
            cols = nan(g * K * P)
            k("conv_im2col", ((g * K * P + 255) // 256,), (256,), cols, x, img, d)
            check(f"conv_im2col {tag}", cols, want.ravel(), 0.0)
            dcols = rnd(g, cg, KH, KW, oh, ow)
            dx = rnd(N, C, H, W)
            acc = np.zeros((C, H + 2 * ph, W + 2 * pw))
            for i in range(KH):
                for j in range(KW):
                    ys = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
                    xs = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
                    acc[:, ys, xs] += dcols[:, :, i, j].reshape(C, oh, ow).astype(np.float64)
            wdx = dx.astype(np.float64)
            wdx[img] += acc[:, ph:ph + H, pw:pw + W]
            k("conv_col2im", ((C * H * W + 255) // 256,), (256,), dx, dcols, img, d)
            check(f"conv_col2im {tag}", dx, wdx, 1e-6)


def pools(k):
    """Batch norm (rows.cu) and pooling (pool.cu) against NumPy."""
    n, c, h, w = 2, 3, 7, 5
    p = h * w
    x = rnd(n, c, h, w)
    X = x.astype(np.float64)
    mean, gamma, beta = rnd(c), rnd(c), rnd(c)
    var = np.array([0.5, 1.5, 0.25], np.float32)
    eps = np.float32(1e-5)
    rstd = 1.0 / np.sqrt(var.astype(np.float64) + 1e-5)
    sh = (1, c, 1, 1)
    want = (X - mean.reshape(sh)) * (gamma * rstd).reshape(sh) + beta.reshape(sh)
    y = nan(n, c, h, w)
    total = n * c * p
    k("batchnorm_forward", ((total + 255) // 256,), (256,), y, x, mean, var, gamma, beta, total, c, p, eps)
    check("batchnorm_forward", y, want, 1e-6)
    dy = rnd(n, c, h, w)
    DY = dy.astype(np.float64)
    dx = rnd(n, c, h, w)
    wdx = dx.astype(np.float64) + DY * (gamma * rstd).reshape(sh)
    k("batchnorm_backward_dx", ((total + 255) // 256,), (256,), dx, dy, var, gamma, total, c, p, eps)
    check("batchnorm_backward_dx", dx, wdx, 1e-6)
    dg, db = rnd(c), rnd(c)
    wdg = dg.astype(np.float64) + (DY * (X - mean.reshape(sh)) * rstd.reshape(sh)).sum((0, 2, 3))
    wdb = db.astype(np.float64) + DY.sum((0, 2, 3))
    k("batchnorm_backward_params", (c,), (256,), dg, db, dy, x, mean, var, n, c, p, eps)
    check("batchnorm_backward_params dgamma", dg, wdg, 1e-6)
    check("batchnorm_backward_params dbeta", db, wdb, 1e-6)
    # Nearest upsampling by 2 and 3 (the UNet's and VAE's Upsample2D) and its block-sum backward.
    for f in (2, 3):
        oh_, ow_ = h * f, w * f
        yu = nan(n, c, oh_, ow_)
        k("upsample_nearest_forward", ((n * c * oh_ * ow_ + 255) // 256,), (256,), yu, x, n * c, h, w, f)
        check(f"upsample_nearest_forward x{f}", yu, X.repeat(f, 2).repeat(f, 3), 0.0)
        gu = rnd(n, c, oh_, ow_)
        du = rnd(n, c, h, w)
        want = du.astype(np.float64) + gu.astype(np.float64).reshape(n, c, h, f, w, f).sum((3, 5))
        k("upsample_nearest_backward", ((total + 255) // 256,), (256,), du, gu, n * c, h, w, f)
        check(f"upsample_nearest_backward x{f}", du, want, 1e-6)
    # Max pooling 3x3 s2 p1 (the padding never wins).
    kh = kw = 3; s_ = 2; pd = 1
    oh, ow = (h + 2 * pd - kh) // s_ + 1, (w + 2 * pd - kw) // s_ + 1
    d = PoolDims(h, w, kh, kw, s_, s_, pd, pd, oh, ow)
    xp = np.pad(X, ((0, 0), (0, 0), (pd, pd), (pd, pd)), constant_values=-np.inf)
    want = np.empty((n, c, oh, ow))
    wdx = np.zeros((n, c, h + 2 * pd, w + 2 * pd))
    g = rnd(n, c, oh, ow)
    for oy in range(oh):
        for ox in range(ow):
            win = xp[:, :, oy * s_:oy * s_ + kh, ox * s_:ox * s_ + kw].reshape(n, c, -1)
            want[:, :, oy, ox] = win.max(-1)
            am = win.argmax(-1)
            for a_ in range(n):
                for b_ in range(c):
                    i, j = divmod(int(am[a_, b_]), kw)
                    wdx[a_, b_, oy * s_ + i, ox * s_ + j] += g[a_, b_, oy, ox]
    planes = n * c
    y = nan(n, c, oh, ow)
    k("max_pool2d_forward", ((planes * oh * ow + 255) // 256,), (256,), y, x, planes, d)
    check("max_pool2d_forward", y, want, 0.0)
    dx = rnd(n, c, h, w)
    wdx = dx.astype(np.float64) + wdx[:, :, pd:pd + h, pd:pd + w]
    k("max_pool2d_backward", ((planes * p + 255) // 256,), (256,), dx, g, x, planes, d)
    check("max_pool2d_backward", dx, wdx, 1e-6)
    # Adaptive average pooling to (3, 2): overlapping windows.
    oh, ow = 3, 2
    want = np.empty((n, c, oh, ow))
    g = rnd(n, c, oh, ow)
    wdx = np.zeros((n, c, h, w))
    for oy in range(oh):
        y0, y1 = oy * h // oh, -(-(oy + 1) * h // oh)
        for ox in range(ow):
            x0, x1 = ox * w // ow, -(-(ox + 1) * w // ow)
            want[:, :, oy, ox] = X[:, :, y0:y1, x0:x1].mean((2, 3))
            wdx[:, :, y0:y1, x0:x1] += g[:, :, oy:oy + 1, ox:ox + 1] / ((y1 - y0) * (x1 - x0))
    y = nan(n, c, oh, ow)
    k("adaptive_avg_pool2d_forward", ((planes * oh * ow + 255) // 256,), (256,), y, x, planes, h, w, oh, ow)
    check("adaptive_avg_pool2d_forward", y, want, 1e-6)
    dx = rnd(n, c, h, w)
    wdx = dx.astype(np.float64) + wdx
    k("adaptive_avg_pool2d_backward", ((planes * p + 255) // 256,), (256,), dx, g, planes, h, w, oh, ow)
    check("adaptive_avg_pool2d_backward", dx, wdx, 1e-6)


def giou_ref(a, b):
    c = lambda v: (v[0] - v[2] / 2, v[1] - v[3] / 2, v[0] + v[2] / 2, v[1] + v[3] / 2)
    p, q = c(a), c(b)
    iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0)
    ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    enc = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    return inter / union - (enc - union) / enc


def boxes(k):
    m, nb = 300, 37.0  # m > 256: the reduction's threads take two pairs each
    def rb(n):
        b = np.empty((n, 4), np.float32)
        b[:, :2] = rng.uniform(0.1, 0.9, (n, 2))
        b[:, 2:] = rng.uniform(0.02, 0.7, (n, 2))
        return b
    p, t = rb(m), rb(m)
    P, T = p.astype(np.float64), t.astype(np.float64)
    l1 = np.abs(P - T).sum() / nb
    gl = sum(1 - giou_ref(P[i], T[i]) for i in range(m)) / nb
    out = nan(2)
    k("box_losses_forward", (1,), (256,), out, p, t, m, np.float32(nb))
    check("box_losses_forward", out, [l1, gl], 1e-6)
    # Backward against central differences of the f64 definition (smooth points dominate).
    dout = np.array([0.7, -1.3], np.float32)
    dp = rnd(m, 4)
    want = dp.astype(np.float64).copy()
    h = 1e-6
    for i in range(m):
        for j in range(4):
            a, b = P[i].copy(), P[i].copy()
            a[j] += h
            b[j] -= h
            f = lambda v: dout[0] * np.abs(v - T[i]).sum() + dout[1] * (1 - giou_ref(v, T[i]))
            want[i, j] += (f(a) - f(b)) / (2 * h) / nb
    k("box_losses_backward", ((m + 255) // 256,), (256,), dp, dout, p, t, m, np.float32(nb))
    check("box_losses_backward", dp, want, 1e-5)


def shim_builds(tmp):
    """Whether this g++ can build the shim itself (C++20 <barrier>): if not, the check is skipped
    rather than failed, since that says nothing about the kernels."""
    probe = os.path.join(tmp, "probe.cpp")
    with open(probe, "w") as f:
        f.write(f'#include "{SHIM}"\nint main() {{ return 0; }}\n')
    r = subprocess.run(["g++", "-std=c++20", "-pthread", "-o", probe + ".bin", probe],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stderr[-500:]


def main():
    with tempfile.TemporaryDirectory() as tmp:
        ok, err = shim_builds(tmp)
        if not ok:
            print("SKIPPED: this g++ cannot build the CUDA shim (needs C++20 <barrier>):\n" + err)
            return
        libs, kernels = build(tmp)
        k = K(libs, kernels)
        for part in (elementwise, rows_ops, adamw, lora, attention, conv, pools, boxes):
            part(k)
        print(f"{len(kernels)} kernels compiled for the CPU shim")
        for what, err in worst.items():
            print(f"  {what:<48} max relative error {err:.1e}")
    if failures:
        print("FAILED:")
        for f in failures:
            print("  " + f)
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
