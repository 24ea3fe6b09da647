"""Triton kernels for a PoolFormer block's pooling half; imported only when the Triton path runs.

The block's ``x + m * ls * (pool(gn(x)) - gn(x))`` is ``x + m * k * rstd * (pool(x) - x)`` with
``k = ls * gn.weight``: with the padding not counted a per-channel constant pools to itself, so the
norm's mean and bias cancel and ``rstd`` factors out (``fast.py`` uses the same identity). Forward is
two passes over the map (statistics, then pool-and-mix), backward two (a reduction for the
statistics' and ``k``'s gradients, then ``dx``). Every kernel computes in fp32 and addresses the map
through its strides, so one kernel serves NCHW and channels-last; partial sums are written per
program and added afterwards (deterministic, no atomics). Launchers take (B, C, H, W) tensors that are
contiguous in one of the two layouts and return fresh tensors in the same layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 8  # output rows a pooling program walks: fewer partials, enough programs per sample
TILE_ELEMENTS = 1024  # elements of one (w, c) tile
STATS_BLOCK = 1024
STATS_CHUNK = 8192  # elements per statistics program (per sample: ceil(numel / chunk) programs, <= 64)


@triton.jit
def _combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's parallel update of (count, mean, sum of squared deviations)."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def _tile_moments(v, mask):
    """(count, mean, M2) of the masked elements of a tile (two passes over registers: stable)."""
    cnt = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
    mean = tl.sum(tl.sum(tl.where(mask, v, 0.0), axis=1), axis=0) / tl.maximum(cnt, 1.0)
    dev = tl.where(mask, v - mean, 0.0)
    return cnt, mean, tl.sum(tl.sum(dev * dev, axis=1), axis=0)


@triton.jit
def _stats_partial_kernel(x_ptr, part_ptr, numel, chunk, BLOCK: tl.constexpr):
    """Moments of one chunk of one sample (a sample is contiguous in both layouts)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    base = x_ptr + b.to(tl.int64) * numel
    start = j * chunk
    stop = tl.minimum(start + chunk, numel)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for off in range(start, stop, BLOCK):
        idx = off + tl.arange(0, BLOCK)[None, :]
        mask = idx < stop
        v = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        tn, tmean, tm2 = _tile_moments(v, mask)
        n, mean, m2 = _combine(n, mean, m2, tn, tmean, tm2)
    out = part_ptr + (b * tl.num_programs(1) + j) * 3
    tl.store(out, n)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _stats_finalize_kernel(part_ptr, mean_ptr, rstd_ptr, num_parts, eps, BLOCK: tl.constexpr):
    """Per sample: combine its partial moments into the mean and 1 / sqrt(var + eps)."""
    b = tl.program_id(0)
    base = part_ptr + b * num_parts * 3
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for off in range(0, num_parts, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < num_parts
        pn = tl.load(base + idx * 3, mask=mask, other=0.0)
        pmean = tl.load(base + idx * 3 + 1, mask=mask, other=0.0)
        pm2 = tl.load(base + idx * 3 + 2, mask=mask, other=0.0)
        bn = tl.sum(pn, axis=0)
        bmean = tl.sum(pn * pmean, axis=0) / tl.maximum(bn, 1.0)
        dev = pmean - bmean
        bm2 = tl.sum(pm2 + pn * dev * dev, axis=0)
        n, mean, m2 = _combine(n, mean, m2, bn, bmean, bm2)
    tl.store(mean_ptr + b, mean)
    tl.store(rstd_ptr + b, 1.0 / tl.sqrt(m2 / n + eps))


@triton.jit
def _window_count(i, size, R: tl.constexpr):
    """In-image positions of the window centred on ``i`` along one axis (count_include_pad=False);
    1 outside the image, so masked lanes never divide by zero."""
    return tl.maximum(tl.minimum(i + R, size - 1) - tl.maximum(i - R, 0) + 1, 1).to(tl.float32)


@triton.jit
def _window_sum(base, h, H, w, W, wc_off, cmask, sh, sw, R: tl.constexpr, WEIGHTED: tl.constexpr):
    """Sum over the (2R+1)^2 window of row ``h`` of a (w, c) tile, in fp32; WEIGHTED divides each
    term by its own window's count (the pool's transpose, for the backward pass)."""
    acc = tl.zeros(wc_off.shape, dtype=tl.float32)
    for dx in tl.static_range(2 * R + 1):
        ww = w + (dx - R)
        col_ok = (ww >= 0) & (ww < W) & cmask
        col_ptr = base + wc_off + (dx - R) * sw
        col = tl.zeros(wc_off.shape, dtype=tl.float32)
        for dy in tl.static_range(2 * R + 1):
            hh = h + (dy - R)
            v = tl.load(col_ptr + hh * sh, mask=col_ok & (hh >= 0) & (hh < H), other=0.0).to(tl.float32)
            if WEIGHTED:
                v = v * (1.0 / _window_count(hh, H, R))
            col += v
        if WEIGHTED:
            col = col * (1.0 / _window_count(ww, W, R))
        acc += col
    return acc


@triton.jit
def _tile(n_wblk, n_cblk, C, W, sc, sw, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's sample, row block and (w, c) tile: every kernel walks the map the same way."""
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    per_b = n_wblk * n_cblk
    b = pid // per_b
    rem = pid % per_b
    wb = rem // n_cblk
    cb = rem % n_cblk
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)[:, None]
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    cmask = c < C
    tile_mask = (w < W) & cmask
    return b, hb, per_b, rem, wb, w, c, cmask, tile_mask, w * sw + c * sc


@triton.jit
def _pool_mix_fwd_kernel(
    x_ptr, k_ptr, mult_ptr, rstd_ptr, out_ptr, part_ptr,
    C, H, W, sb, sc, sh, sw, n_wblk, n_cblk, rows,
    R: tl.constexpr, HAS_MULT: tl.constexpr, OUT_STATS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out = x + m * k * rstd * (avgpool(x) - x) for ``rows`` rows of one (w, c) tile of one sample;
    with OUT_STATS also the moments of the (rounded) output tile, for the next norm."""
    b, hb, per_b, rem, wb, w, c, cmask, tile_mask, wc_off = _tile(
        n_wblk, n_cblk, C, W, sc, sw, BLOCK_W, BLOCK_C
    )
    scale = tl.load(rstd_ptr + b)
    if HAS_MULT:
        scale = scale * tl.load(mult_ptr + b).to(tl.float32)
    ks = tl.load(k_ptr + c, mask=cmask, other=0.0).to(tl.float32) * scale
    inv_count_w = 1.0 / _window_count(w, W, R)
    x_base = x_ptr + b.to(tl.int64) * sb
    o_base = out_ptr + b.to(tl.int64) * sb
    n = 0.0
    mean = 0.0
    m2 = 0.0
    h0 = hb * rows
    for h in range(h0, tl.minimum(h0 + rows, H)):
        acc = _window_sum(x_base, h, H, w, W, wc_off, cmask, sh, sw, R, False)
        offs = h * sh + wc_off
        xc = tl.load(x_base + offs, mask=tile_mask, other=0.0).to(tl.float32)
        y = (xc + ks * (acc * (inv_count_w / _window_count(h, H, R)) - xc)).to(out_ptr.dtype.element_ty)
        tl.store(o_base + offs, y, mask=tile_mask)
        if OUT_STATS:
            tn, tmean, tm2 = _tile_moments(y.to(tl.float32), tile_mask)
            n, mean, m2 = _combine(n, mean, m2, tn, tmean, tm2)
    if OUT_STATS:
        out = part_ptr + ((b * per_b + rem) * tl.num_programs(1) + hb) * 3
        tl.store(out, n)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)


@triton.jit
def _pool_mix_bwd_reduce_kernel(
    x_ptr, g_ptr, k_ptr, mult_ptr, rstd_ptr, a_part_ptr, dk_part_ptr,
    C, H, W, sb, sc, sh, sw, n_wblk, n_cblk, rows,
    R: tl.constexpr, HAS_MULT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per tile: sum of g * (pool(x) - x) per channel (-> dk, times m * rstd) and its k-weighted total
    (-> the gradient through rstd)."""
    b, hb, per_b, rem, wb, w, c, cmask, tile_mask, wc_off = _tile(
        n_wblk, n_cblk, C, W, sc, sw, BLOCK_W, BLOCK_C
    )
    c1 = tl.reshape(c, [BLOCK_C])
    inv_count_w = 1.0 / _window_count(w, W, R)
    x_base = x_ptr + b.to(tl.int64) * sb
    g_base = g_ptr + b.to(tl.int64) * sb
    gd_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    h0 = hb * rows
    for h in range(h0, tl.minimum(h0 + rows, H)):
        acc = _window_sum(x_base, h, H, w, W, wc_off, cmask, sh, sw, R, False)
        offs = h * sh + wc_off
        xc = tl.load(x_base + offs, mask=tile_mask, other=0.0).to(tl.float32)
        g = tl.load(g_base + offs, mask=tile_mask, other=0.0).to(tl.float32)
        d = acc * (inv_count_w / _window_count(h, H, R)) - xc
        gd_c += tl.sum(tl.where(tile_mask, g * d, 0.0), axis=0)
    k = tl.load(k_ptr + c1, mask=c1 < C, other=0.0).to(tl.float32)
    scale = tl.load(rstd_ptr + b)
    if HAS_MULT:
        scale = scale * tl.load(mult_ptr + b).to(tl.float32)
    tl.store(a_part_ptr + (b * per_b + rem) * tl.num_programs(1) + hb, tl.sum(gd_c * k, axis=0))
    row = (b * n_wblk + wb) * tl.num_programs(1) + hb
    tl.store(dk_part_ptr + row.to(tl.int64) * C + c1, gd_c * scale, mask=c1 < C)


@triton.jit
def _pool_mix_bwd_dx_kernel(
    x_ptr, g_ptr, k_ptr, mult_ptr, mean_ptr, rstd_ptr, a_ptr, dx_ptr,
    C, H, W, sb, sc, sh, sw, n_wblk, n_cblk, rows, inv_numel,
    R: tl.constexpr, HAS_MULT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dx = g + m k rstd (P^T g - g) - m A rstd^3 (x - mean) / N, where P^T sums g / count over the
    window (the window relation is symmetric) and A = sum(g k (pool(x) - x)) over the sample."""
    b, hb, per_b, rem, wb, w, c, cmask, tile_mask, wc_off = _tile(
        n_wblk, n_cblk, C, W, sc, sw, BLOCK_W, BLOCK_C
    )
    rstd = tl.load(rstd_ptr + b)
    mean = tl.load(mean_ptr + b)
    mult = 1.0
    if HAS_MULT:
        mult = tl.load(mult_ptr + b).to(tl.float32)
    ks = tl.load(k_ptr + c, mask=cmask, other=0.0).to(tl.float32) * (mult * rstd)
    coef = mult * tl.load(a_ptr + b) * rstd * rstd * rstd * inv_numel
    x_base = x_ptr + b.to(tl.int64) * sb
    g_base = g_ptr + b.to(tl.int64) * sb
    d_base = dx_ptr + b.to(tl.int64) * sb
    h0 = hb * rows
    for h in range(h0, tl.minimum(h0 + rows, H)):
        acc = _window_sum(g_base, h, H, w, W, wc_off, cmask, sh, sw, R, True)
        offs = h * sh + wc_off
        xc = tl.load(x_base + offs, mask=tile_mask, other=0.0).to(tl.float32)
        g = tl.load(g_base + offs, mask=tile_mask, other=0.0).to(tl.float32)
        dx_val = g + ks * (acc - g) - coef * (xc - mean)
        tl.store(d_base + offs, dx_val.to(dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _normalize_kernel(y_ptr, mean_ptr, rstd_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """(y - mean) * rstd per sample, over its contiguous elements."""
    b = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    offs = b.to(tl.int64) * numel + idx
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = (y - tl.load(mean_ptr + b)) * tl.load(rstd_ptr + b)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers
def _tiles(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """BLOCK_W, BLOCK_C (the contiguous axis gets the long side), their counts and the row blocks."""
    _, c, h, w = x.shape
    if x.stride(1) == 1 and c > 1:  # channels-last
        block_c = min(triton.next_power_of_2(c), 64)
        block_w = min(triton.next_power_of_2(w), max(1, TILE_ELEMENTS // block_c))
    else:
        block_w = min(triton.next_power_of_2(w), 64)
        block_c = min(triton.next_power_of_2(c), max(1, TILE_ELEMENTS // block_w))
    n_hblk = triton.cdiv(h, ROWS_PER_PROGRAM)
    return block_w, block_c, triton.cdiv(w, block_w), triton.cdiv(c, block_c), n_hblk


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _finalize(parts: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, num_parts, _ = parts.shape
    mean = parts.new_empty(b)
    rstd = parts.new_empty(b)
    block = min(triton.next_power_of_2(num_parts), 1024)
    _stats_finalize_kernel[(b,)](parts, mean, rstd, num_parts, eps, BLOCK=block)
    return mean, rstd


def sample_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and 1 / sqrt(var + eps) in fp32, each (B,)."""
    b = x.shape[0]
    numel = x[0].numel()
    chunks = max(1, min(64, triton.cdiv(numel, STATS_CHUNK)))
    chunk = triton.cdiv(numel, chunks)
    parts = torch.empty((b, chunks, 3), device=x.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(chunk), STATS_BLOCK)
    _stats_partial_kernel[(b, chunks)](x, parts, numel, chunk, BLOCK=block)
    return _finalize(parts, eps)


def pool_mix_forward(
    x: torch.Tensor,
    k: torch.Tensor,
    multiplier: torch.Tensor | None,
    rstd: torch.Tensor,
    radius: int,
    out_dtype: torch.dtype,
    out_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x + m * k * rstd * (pool(x) - x)``; with ``out_stats`` also the output's partial moments."""
    b, c, h, w = x.shape
    block_w, block_c, n_wblk, n_cblk, n_hblk = _tiles(x)
    out = torch.empty_like(x, dtype=out_dtype)
    parts = None
    if out_stats:
        parts = torch.empty((b, n_wblk * n_cblk * n_hblk, 3), device=x.device, dtype=torch.float32)
    _pool_mix_fwd_kernel[(b * n_wblk * n_cblk, n_hblk)](
        x, k, multiplier if multiplier is not None else rstd, rstd, out, rstd if parts is None else parts,
        c, h, w, *_strides(x), n_wblk, n_cblk, ROWS_PER_PROGRAM,
        R=radius, HAS_MULT=multiplier is not None, OUT_STATS=out_stats, BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    return out, parts


def normalize(y: torch.Tensor, parts: torch.Tensor, eps: float) -> torch.Tensor:
    """``y`` normalised per sample (no affine) from the partial moments ``pool_mix_forward`` wrote."""
    mean, rstd = _finalize(parts, eps)
    out = torch.empty_like(y)
    numel = y[0].numel()
    block = min(triton.next_power_of_2(numel), 2048)
    _normalize_kernel[(y.shape[0], triton.cdiv(numel, block))](y, mean, rstd, out, numel, BLOCK=block)
    return out


def pool_mix_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    k: torch.Tensor,
    multiplier: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    radius: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``pool_mix_forward``'s output with respect to ``x`` and ``k`` (fp32)."""
    b, c, h, w = x.shape
    grad = grad.contiguous(memory_format=_format_of(x))
    block_w, block_c, n_wblk, n_cblk, n_hblk = _tiles(x)
    grid = (b * n_wblk * n_cblk, n_hblk)
    a_part = torch.empty((b, n_wblk * n_cblk * n_hblk), device=x.device, dtype=torch.float32)
    dk_part = torch.empty((b * n_wblk * n_hblk, c), device=x.device, dtype=torch.float32)
    mult = multiplier if multiplier is not None else rstd
    common = dict(R=radius, HAS_MULT=multiplier is not None, BLOCK_W=block_w, BLOCK_C=block_c)
    shape = (c, h, w, *_strides(x), n_wblk, n_cblk, ROWS_PER_PROGRAM)
    _pool_mix_bwd_reduce_kernel[grid](x, grad, k, mult, rstd, a_part, dk_part, *shape, **common)
    a = a_part.sum(1)
    dx = torch.empty_like(x)
    _pool_mix_bwd_dx_kernel[grid](x, grad, k, mult, mean, rstd, a, dx, *shape, 1.0 / (c * h * w), **common)
    return dx, dk_part.sum(0)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last
