"""Convolutions recognised in a lowered sparse matrix, applied patch-wise in float64 (for the bound graphs).

    conv = find_conv(M, in_shape, out_shape)   # ConvStructure, or None when M is no convolution
    fwd, adj = conv.patches("pos")              # maps for X M+^T and X M+ (kinds M, abs, pos, neg)
    Y = fwd.emit(b, X)                          # X [..., n_in] -> [..., n_out] in the graph of Builder b

The bound passes (passes/recurjac.py) hold every linear node as a scipy matrix over flat C-order
features. A convolution there (BatchNorm folded into it, or a residual term over one node) is
recognised from its nonzeros: the stride and offset of each spatial axis from where the rows'
inputs start, then the kernel W[co, ci, *taps] read off the entries. The guess counts only if
conv_sparse(W, ...) rebuilds M exactly (same entries, bit for bit), so every entry of M is one entry
of W and |M|, max(M, 0), min(M, 0) are the same maps with |W|, max(W, 0), min(W, 0).

A PatchMap computes y[cd, q] = sum_{cs, j} X[cs, idx[q, j]] * w[phase(q)][(j, cs), cd]:
  - forward (X M^T): one phase, idx[p, tap] = the input position tap `tap` of output p reads
    (im2col: one Gather into [rows, positions, taps * C_in], one MatMul with the [taps * C_in, C_out] weight);
  - adjoint (X M, ConvTranspose semantics): input positions grouped by their stride phase
    (i - offset) mod stride, each phase reading ceil(k / stride) output positions per axis with its own
    kernel taps (the sub-pixel decomposition), one batched MatMul over the phases, and a Gather that
    puts the positions back in order.
A slot outside the feature map reads an appended zero column. Memory per coefficient row is the
gathered [positions, taps * C_src] block, C_dst times less than a gather of every output's row of M.
A ContractMap does it the other way round, MatMul over the channels first, then one Gather of the
(position, tap) pairs each output sums: cheaper where C_src is the wide side (the first layer's
adjoint, 16 channels back into 3). Each map is built both ways and the smaller one is used.
onnxruntime has no float64 Conv kernel; this also keeps soundness free of float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

KINDS = {"M": lambda v: v, "abs": np.abs, "pos": lambda v: np.maximum(v, 0), "neg": lambda v: np.minimum(v, 0)}


@dataclass
class PatchMap:
    """y[..., cd * S_dst + q] = sum_{j, cs} X[..., cs * S_src + idx[ph, r, j]] * weight[ph, j * C_src + cs, cd]
    for q = the r-th position of phase ph (order: inverse permutation, None when q = r and one phase);
    idx == S_src reads zero."""
    idx: np.ndarray       # int64 [phases, positions per phase, slots]
    weight: np.ndarray    # float64 [phases, slots * c_src, c_dst]
    order: np.ndarray | None  # int64 [S_dst]: where position q sits in the phase-major list
    c_src: int
    s_src: int
    c_dst: int
    s_dst: int

    def gathered(self) -> int:
        """Elements per coefficient row of the largest tensor it forms (the gathered patches)."""
        return int(self.idx.size * self.c_src)

    def nbytes(self) -> int:
        return int(8 * (self.idx.size + self.weight.size + (0 if self.order is None else self.order.size)))

    def arrays(self):
        """(idx, weight, order) as the graph holds them: one phase's weight 2-D, so MatMul is one GEMM."""
        return self.idx, self.weight[0] if len(self.weight) == 1 else self.weight, self.order

    def emit(self, b, X, consts):
        """Emit y for X [..., c_src * s_src] through Builder b; `consts` name the arrays() constants."""
        idx, weight, order = consts
        lead = b.shape(X, 0, -1)
        x3 = b.Transpose(b.Reshape(X, b.ints([-1, self.c_src, self.s_src])), perm=[0, 2, 1])  # [R, S, C]
        x3 = b.Pad(x3, b.ints([0, 0, 0, 0, 1, 0]))  # position S reads zero
        g = b.Gather(x3, idx, axis=1)  # [R, phases, positions, slots, c_src]
        phases, per = self.idx.shape[:2]
        g = b.Reshape(g, b.ints([0, phases, per, -1]))
        y = b.MatMul(g, weight)  # [R, phases, positions, c_dst]
        y = b.Reshape(b.Transpose(y, perm=[0, 3, 1, 2]), b.ints([0, self.c_dst, phases * per]))
        if order is not None:
            y = b.Gather(y, order, axis=2)
        return b.Reshape(y, b.Concat(lead, b.ints([self.c_dst * self.s_dst]), axis=0))


@dataclass
class ContractMap:
    """The same kind of map, channels contracted first: Z[(p, tap), cd] = sum_cs X[cs, p] * weight[cs, tap * c_dst + cd]
    (one MatMul), then y[cd, q] = sum_j Z[idx[q, j], cd] (one Gather, one ReduceSum); idx == s_src * taps
    reads zero. Cheaper than a PatchMap where C_src is the wider side (a convolution's adjoint into few
    input channels: the first layer's)."""
    idx: np.ndarray       # int64 [s_dst, slots] into (source position, tap)
    weight: np.ndarray    # float64 [c_src, taps * c_dst]
    c_src: int
    s_src: int
    c_dst: int
    s_dst: int

    def gathered(self) -> int:
        return int(max(self.s_src * self.weight.shape[1], self.idx.size * self.c_dst))

    def nbytes(self) -> int:
        return int(8 * (self.idx.size + self.weight.size))

    def arrays(self):
        return self.idx, self.weight

    def emit(self, b, X, consts):
        idx, weight = consts
        lead = b.shape(X, 0, -1)
        x3 = b.Transpose(b.Reshape(X, b.ints([-1, self.c_src, self.s_src])), perm=[0, 2, 1])  # [R, S, C]
        z = b.Reshape(b.MatMul(x3, weight), b.ints([0, -1, self.c_dst]))  # [R, S * taps, c_dst]
        z = b.Pad(z, b.ints([0, 0, 0, 0, 1, 0]))  # row S * taps reads zero
        y = b.reduce("ReduceSum", b.Gather(z, idx, axis=1), [2], keepdims=0)  # [R, s_dst, c_dst]
        return b.Reshape(b.Transpose(y, perm=[0, 2, 1]), b.Concat(lead, b.ints([self.c_dst * self.s_dst]), axis=0))


def _cheaper(*maps):
    return min(maps, key=lambda m: m.gathered())


@dataclass
class ConvStructure:
    """M == conv_sparse(W, in_shape, out_shape, strides, pads = -offsets): input i = o * stride + offset + tap."""
    W: np.ndarray        # float64 [C_out, C_in, *kernel]
    strides: tuple
    offsets: tuple
    in_shape: tuple      # (C_in, *spatial)
    out_shape: tuple     # (C_out, *spatial)

    def patches(self, kind="M"):
        """(forward, adjoint) maps of kind(M): X kind(M)^T and X kind(M), each the cheaper of a PatchMap
        (gather, then contract the channels) and a ContractMap (the other way round)."""
        return tuple(_cheaper(*maps) for maps in self.candidates(kind))

    def candidates(self, kind="M"):
        """((PatchMap, ContractMap) forward, (PatchMap, ContractMap) adjoint) of kind(M)."""
        W = KINDS[kind](self.W)
        return self._forward(W), self._adjoint(W)

    def _forward(self, W):
        co, ci, ks = W.shape[0], W.shape[1], W.shape[2:]
        isp, osp = self.in_shape[1:], self.out_shape[1:]
        n_in, n_out, kk = int(np.prod(isp)), int(np.prod(osp)), int(np.prod(ks))
        o = np.indices(osp).reshape(len(osp), -1)  # [d, P]
        t = np.indices(ks).reshape(len(ks), -1)    # [d, taps]
        pos = o[:, :, None] * np.reshape(self.strides, (-1, 1, 1)) + np.reshape(self.offsets, (-1, 1, 1)) + t[:, None, :]
        src = _flat_or_dummy(pos, isp)  # [P, taps]
        weight = W.reshape(co, ci, -1).transpose(2, 1, 0).reshape(1, -1, co)  # [(tap, ci), co]
        gather_first = PatchMap(src[None], weight, None, ci, n_in, co, n_out)
        pair = np.where(src < n_in, src * kk + np.arange(kk), n_in * kk)
        contract_first = ContractMap(pair, W.reshape(co, ci, kk).transpose(1, 2, 0).reshape(ci, -1), ci, n_in, co, n_out)
        return gather_first, contract_first

    def _adjoint(self, W):
        co, ci, ks = W.shape[0], W.shape[1], np.array(W.shape[2:])
        isp, osp = self.in_shape[1:], self.out_shape[1:]
        s, c0 = np.array(self.strides), np.array(self.offsets)
        nd = len(isp)
        J = -(-ks // s)  # taps per phase and axis
        i = np.indices(isp).reshape(nd, -1)  # [d, Q]
        phase = np.mod(i - c0[:, None], s[:, None])  # [d, Q]
        j = np.indices(J).reshape(nd, -1)  # [d, slots]
        tap = phase[:, :, None] + s[:, None, None] * j[:, None, :]  # [d, Q, slots]
        o = (i[:, :, None] - c0[:, None, None] - tap) // s[:, None, None]
        src = _flat_or_dummy(o, osp, valid=np.all(tap < ks[:, None, None], axis=0))
        ph = np.ravel_multi_index(tuple(phase), tuple(s))  # [Q]
        n_ph = int(np.prod(s))
        order = np.argsort(ph, kind="stable")
        counts = np.bincount(ph, minlength=n_ph)
        per = int(counts.max())
        rank = np.arange(len(ph)) - np.repeat(np.cumsum(counts) - counts, counts)
        idx = np.full((n_ph, per, src.shape[1]), int(np.prod(osp)), np.int64)
        idx[ph[order], rank] = src[order]
        where = np.empty(len(ph), np.int64)
        where[order] = ph[order] * per + rank
        # weight[ph, (slot, co), ci] = W[co, ci, tap(ph, slot)], zero where the tap is past the kernel
        weight = np.zeros((n_ph, src.shape[1], co, ci))
        for p in range(n_ph):
            pv = np.array(np.unravel_index(p, tuple(s)))
            taps = pv[:, None] + s[:, None] * j  # [d, slots]
            ok = np.all(taps < ks[:, None], axis=0)
            if ok.any():
                weight[p, ok] = np.moveaxis(W[(slice(None), slice(None)) + tuple(taps[:, ok])], -1, 0)
        weight = weight.reshape(n_ph, -1, ci)
        identity = n_ph == 1 and np.array_equal(where, np.arange(len(ph)))
        n_out, kk = int(np.prod(osp)), int(np.prod(ks))
        gather_first = PatchMap(idx, weight, None if identity else where, co, n_out, ci, int(np.prod(isp)))
        inside = src < n_out
        tap_flat = np.ravel_multi_index(tuple(np.where(inside, tap, 0)), tuple(ks))
        pair = np.where(inside, src * kk + tap_flat, n_out * kk)  # [Q, slots]
        contract_first = ContractMap(pair, W.reshape(co, ci, kk).transpose(0, 2, 1).reshape(co, -1), co, n_out, ci,
                                     int(np.prod(isp)))
        return gather_first, contract_first


def _flat_or_dummy(pos, shape, valid=None):
    """Flat index of multi-index pos [d, ...] in `shape`; prod(shape) (the zero slot) outside it."""
    inside = np.all((pos >= 0) & (pos < np.reshape(shape, (-1,) + (1,) * (pos.ndim - 1))), axis=0)
    if valid is not None:
        inside &= valid
    flat = np.ravel_multi_index(tuple(np.where(inside, pos, 0)), tuple(shape))
    return np.where(inside, flat, int(np.prod(shape))).astype(np.int64)


def find_conv(M, in_shape, out_shape) -> ConvStructure | None:
    """The convolution (group 1, dilation 1, a grouped/dilated one with zero taps) that M is, or None."""
    from .layers import conv_sparse

    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    M = sp.csr_matrix(M)
    if len(in_shape) != len(out_shape) or len(in_shape) < 2 or M.nnz == 0 or \
            M.shape != (int(np.prod(out_shape)), int(np.prod(in_shape))):
        return None
    rows = np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))
    oc, ic = np.unravel_index(rows, out_shape), np.unravel_index(M.indices, in_shape)
    strides, offsets, taps = [], [], []
    for d in range(1, len(in_shape)):
        o, i = oc[d].astype(np.int64), ic[d].astype(np.int64)
        s = _stride(o, i, in_shape[d], out_shape[d])
        c0 = int((i - o * s).min())
        strides.append(s)
        offsets.append(c0)
        taps.append(i - o * s - c0)
    kernel = tuple(int(t.max()) + 1 for t in taps)
    if np.prod(kernel) * in_shape[0] * out_shape[0] > 16 * M.nnz + (1 << 16):
        return None  # far from a shared kernel: not worth building
    W = np.zeros((out_shape[0], in_shape[0]) + kernel)
    W[(oc[0], ic[0]) + tuple(taps)] = M.data
    attrs = {"strides": strides, "dilations": [1] * len(strides), "group": 1,
             "pads": [-c for c in offsets] + [0] * len(offsets)}
    rebuilt = conv_sparse(W, in_shape, out_shape, attrs)
    if (rebuilt != M).nnz:
        return None
    return ConvStructure(W, tuple(strides), tuple(offsets), in_shape, out_shape)


def _stride(o, i, n_in, n_out) -> int:
    """The stride along one axis: how far the first (or last) input of a row moves per output step, read
    where the window is not cut by the border; a guess only (find_conv checks it)."""
    if n_out == 1:
        return 1
    lo, hi = np.full(n_out, n_in), np.full(n_out, -1)
    np.minimum.at(lo, o, i)
    np.maximum.at(hi, o, i)
    # the last rows' first inputs and the first rows' last inputs are the ones furthest from a border
    for ends, inside, pick in ((lo, lo > 0, slice(-2, None)), (hi, (hi < n_in - 1) & (hi >= 0), slice(0, 2))):
        k = np.nonzero(inside)[0][pick]
        if len(k) == 2:
            return max(1, int((ends[k[1]] - ends[k[0]]) // (k[1] - k[0])))
    return max(1, int(round(n_in / n_out)))
