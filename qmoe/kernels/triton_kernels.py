"""Triton kernels for the fused routing of MoELoRA and LoRACoE (imported only when the triton backend runs).

One program handles a block of tokens; z's row holds the router logits and the rank activations side by
side, so each program reads a token's row once, does the routing in registers and writes the gated rank
activations (forward) or d loss / d z (backward). All arithmetic is fp32: bf16/fp16 inputs are upcast on
load (the Triton interpreter also miscomputes bf16 arithmetic, fp32 sidesteps that) and rounded on store.
The two matmuls around this step stay with cuBLAS (torch), which already runs them at peak.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# elements of the [tokens, experts, ranks] tile one program holds; bounds registers per program
_TILE_ELEMENTS = 4096


def _block_tokens(width: int) -> int:
    return max(1, min(128, _TILE_ELEMENTS // width))


# ---- MoELoRA ------------------------------------------------------------------------------------------


@triton.jit
def _moelora_route(
    z_ptr, rows, row_ok, stride_z, N: tl.constexpr, N_P2: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr
):
    """Router softmax and renormalised top-k gate of a block of tokens: (probs, gate, slots), each
    [BLOCK_T, N_P2]; column s < K of ``slots`` holds the s-th chosen expert (descending probability)."""
    e = tl.arange(0, N_P2)
    e_ok = e < N
    raw = tl.load(z_ptr + rows[:, None] * stride_z + e[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0)
    logits = tl.where(e_ok[None, :], raw.to(tl.float32), float("-inf"))
    top = tl.max(logits, 1)
    ex = tl.exp(logits - top[:, None])
    probs = ex / tl.sum(ex, 1)[:, None]
    # top-k by repeated argmax (lowest index wins a tie, as torch.topk does in practice); slot s -> column s
    work = probs
    chosen = tl.zeros_like(probs)
    slots = tl.zeros([BLOCK_T, N_P2], dtype=tl.int32)
    for s in tl.static_range(K):
        best = tl.max(work, 1)
        idx = tl.min(tl.where(work == best[:, None], e[None, :], N_P2), 1)
        pick = e[None, :] == idx[:, None]
        chosen = tl.where(pick, 1.0, chosen)
        work = tl.where(pick, -1.0, work)
        slots = tl.where(e[None, :] == s, idx[:, None], slots)
    kept = probs * chosen
    gate = kept / tl.sum(kept, 1)[:, None]
    return probs, gate, slots


@triton.jit
def _moelora_fwd_kernel(
    z_ptr,
    gated_ptr,
    probs_ptr,
    gate_ptr,
    ids_ptr,
    T,
    stride_z,
    N: tl.constexpr,
    R: tl.constexpr,
    K: tl.constexpr,
    N_P2: tl.constexpr,
    R_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    probs, gate, slots = _moelora_route(z_ptr, rows, row_ok, stride_z, N, N_P2, K, BLOCK_T)
    e = tl.arange(0, N_P2)
    ok2 = row_ok[:, None] & (e < N)[None, :]
    tl.store(probs_ptr + rows[:, None] * N + e[None, :], probs, mask=ok2)
    tl.store(gate_ptr + rows[:, None] * N + e[None, :], gate, mask=ok2)
    tl.store(ids_ptr + rows[:, None] * K + e[None, :], slots.to(tl.int64), mask=row_ok[:, None] & (e < K)[None, :])
    # rank activations as a [tokens, experts, ranks] tile: expert e's ranks are columns N + e*R .. N + e*R + R-1
    q = tl.arange(0, R_P2)
    col = e[None, :, None] * R + q[None, None, :]
    ok3 = ok2[:, :, None] & (q < R)[None, None, :]
    h = tl.load(z_ptr + rows[:, None, None] * stride_z + N + col, mask=ok3, other=0.0).to(tl.float32)
    gated = h * gate[:, :, None]
    tl.store(gated_ptr + rows[:, None, None] * (N * R) + col, gated.to(gated_ptr.dtype.element_ty), mask=ok3)


@triton.jit
def _moelora_bwd_kernel(
    z_ptr,
    grad_gated_ptr,
    grad_probs_ptr,
    grad_z_ptr,
    T,
    stride_z,
    N: tl.constexpr,
    R: tl.constexpr,
    K: tl.constexpr,
    N_P2: tl.constexpr,
    R_P2: tl.constexpr,
    HAS_GRAD_PROBS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    probs, gate, slots = _moelora_route(z_ptr, rows, row_ok, stride_z, N, N_P2, K, BLOCK_T)
    e = tl.arange(0, N_P2)
    ok2 = row_ok[:, None] & (e < N)[None, :]
    q = tl.arange(0, R_P2)
    col = e[None, :, None] * R + q[None, None, :]
    ok3 = ok2[:, :, None] & (q < R)[None, None, :]
    h = tl.load(z_ptr + rows[:, None, None] * stride_z + N + col, mask=ok3, other=0.0).to(tl.float32)
    gg = tl.load(grad_gated_ptr + rows[:, None, None] * (N * R) + col, mask=ok3, other=0.0).to(tl.float32)
    out_ty = grad_z_ptr.dtype.element_ty
    tl.store(grad_z_ptr + rows[:, None, None] * stride_z + N + col, (gg * gate[:, :, None]).to(out_ty), mask=ok3)
    # softmax Jacobian over the chosen experts (gate is zero elsewhere), plus the probs output's own gradient
    grad_gate = tl.sum(gg * h, 2)
    grad_logits = gate * (grad_gate - tl.sum(gate * grad_gate, 1)[:, None])
    if HAS_GRAD_PROBS:
        gp = tl.load(grad_probs_ptr + rows[:, None] * N + e[None, :], mask=ok2, other=0.0).to(tl.float32)
        grad_logits += probs * (gp - tl.sum(probs * gp, 1)[:, None])
    tl.store(grad_z_ptr + rows[:, None] * stride_z + e[None, :], grad_logits.to(out_ty), mask=ok2)


def moelora_forward(z: torch.Tensor, n: int, r: int, k: int):
    t = z.shape[0]
    gated = torch.empty(t, n * r, dtype=z.dtype, device=z.device)
    probs = torch.empty(t, n, dtype=torch.float32, device=z.device)
    gate = torch.empty_like(probs)
    ids = torch.empty(t, k, dtype=torch.int64, device=z.device)
    if t:
        n_p2, r_p2 = triton.next_power_of_2(n), triton.next_power_of_2(r)
        block = _block_tokens(n_p2 * r_p2)
        _moelora_fwd_kernel[(triton.cdiv(t, block),)](
            z, gated, probs, gate, ids, t, z.stride(0), N=n, R=r, K=k, N_P2=n_p2, R_P2=r_p2, BLOCK_T=block
        )
    return gated, probs, ids, gate


def moelora_backward(z, grad_gated, grad_probs, n: int, r: int, k: int):
    t = z.shape[0]
    grad_z = torch.empty_like(z)
    if t:
        grad_gated = grad_gated.contiguous()
        has_gp = grad_probs is not None
        grad_probs = grad_probs.contiguous() if has_gp else grad_gated  # placeholder pointer when unused
        n_p2, r_p2 = triton.next_power_of_2(n), triton.next_power_of_2(r)
        block = _block_tokens(n_p2 * r_p2)
        _moelora_bwd_kernel[(triton.cdiv(t, block),)](
            z,
            grad_gated,
            grad_probs,
            grad_z,
            t,
            z.stride(0),
            N=n,
            R=r,
            K=k,
            N_P2=n_p2,
            R_P2=r_p2,
            HAS_GRAD_PROBS=has_gp,
            BLOCK_T=block,
        )
    return grad_z


# ---- LoRACoE ------------------------------------------------------------------------------------------


@triton.jit
def _loracoe_probs(
    z_ptr, rows, row_ok, stride_z, E: tl.constexpr, R: tl.constexpr, E_P2: tl.constexpr, R_P2: tl.constexpr
):
    """Per-expert softmax over the ranks, [BLOCK, E_P2, R_P2]; padded experts hold zeros."""
    i = tl.arange(0, E_P2)
    j = tl.arange(0, R_P2)
    ok = row_ok[:, None, None] & (i < E)[None, :, None] & (j < R)[None, None, :]
    raw = tl.load(
        z_ptr + rows[:, None, None] * stride_z + R + i[None, :, None] * R + j[None, None, :], mask=ok, other=0.0
    )
    logits = tl.where((j < R)[None, None, :], raw.to(tl.float32), float("-inf"))
    ex = tl.exp(logits - tl.max(logits, 2)[:, :, None])
    probs = ex / tl.sum(ex, 2)[:, :, None]
    return tl.where((i < E)[None, :, None], probs, 0.0)


@triton.jit
def _loracoe_rank_weights(
    z_ptr, T, stride_z, E: tl.constexpr, R: tl.constexpr, E_P2: tl.constexpr, R_P2: tl.constexpr, BLOCK_T: tl.constexpr
):
    """Shared by forward and backward: this block's rows and row mask, per-expert softmax over ranks (probs), their mean
    over experts (weights), the rank activations h, and the load/store mask."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    probs = _loracoe_probs(z_ptr, rows, row_ok, stride_z, E, R, E_P2, R_P2)
    weights = tl.sum(probs, 1) / E
    j = tl.arange(0, R_P2)
    ok = row_ok[:, None] & (j < R)[None, :]
    h = tl.load(z_ptr + rows[:, None] * stride_z + j[None, :], mask=ok, other=0.0).to(tl.float32)
    return rows, row_ok, j, ok, probs, weights, h


@triton.jit
def _loracoe_fwd_kernel(
    z_ptr,
    gated_ptr,
    weights_ptr,
    T,
    stride_z,
    factor,
    E: tl.constexpr,
    R: tl.constexpr,
    E_P2: tl.constexpr,
    R_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, row_ok, j, ok, probs, weights, h = _loracoe_rank_weights(z_ptr, T, stride_z, E, R, E_P2, R_P2, BLOCK_T)
    tl.store(weights_ptr + rows[:, None] * R + j[None, :], weights, mask=ok)
    gated = h * weights * factor
    tl.store(gated_ptr + rows[:, None] * R + j[None, :], gated.to(gated_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _loracoe_bwd_kernel(
    z_ptr,
    grad_gated_ptr,
    grad_z_ptr,
    T,
    stride_z,
    factor,
    E: tl.constexpr,
    R: tl.constexpr,
    E_P2: tl.constexpr,
    R_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, row_ok, j, ok, probs, weights, h = _loracoe_rank_weights(z_ptr, T, stride_z, E, R, E_P2, R_P2, BLOCK_T)
    gg = tl.load(grad_gated_ptr + rows[:, None] * R + j[None, :], mask=ok, other=0.0).to(tl.float32) * factor
    out_ty = grad_z_ptr.dtype.element_ty
    tl.store(grad_z_ptr + rows[:, None] * stride_z + j[None, :], (gg * weights).to(out_ty), mask=ok)
    grad_w = (gg * h)[:, None, :]
    grad_logits = probs * (grad_w - tl.sum(probs * grad_w, 2)[:, :, None]) / E
    i = tl.arange(0, E_P2)
    ok3 = row_ok[:, None, None] & (i < E)[None, :, None] & (j < R)[None, None, :]
    tl.store(
        grad_z_ptr + rows[:, None, None] * stride_z + R + i[None, :, None] * R + j[None, None, :],
        grad_logits.to(out_ty),
        mask=ok3,
    )


def loracoe_forward(z: torch.Tensor, e: int, r: int, factor: float):
    t = z.shape[0]
    gated = torch.empty(t, r, dtype=z.dtype, device=z.device)
    weights = torch.empty(t, r, dtype=torch.float32, device=z.device)
    if t:
        e_p2, r_p2 = triton.next_power_of_2(e), triton.next_power_of_2(r)
        block = _block_tokens(e_p2 * r_p2)
        _loracoe_fwd_kernel[(triton.cdiv(t, block),)](
            z, gated, weights, t, z.stride(0), factor, E=e, R=r, E_P2=e_p2, R_P2=r_p2, BLOCK_T=block
        )
    return gated, weights


def loracoe_backward(z, grad_gated, e: int, r: int, factor: float):
    t = z.shape[0]
    grad_z = torch.empty_like(z)
    if t:
        e_p2, r_p2 = triton.next_power_of_2(e), triton.next_power_of_2(r)
        block = _block_tokens(e_p2 * r_p2)
        _loracoe_bwd_kernel[(triton.cdiv(t, block),)](
            z,
            grad_gated.contiguous(),
            grad_z,
            t,
            z.stride(0),
            factor,
            E=e,
            R=r,
            E_P2=e_p2,
            R_P2=r_p2,
            BLOCK_T=block,
        )
    return grad_z
