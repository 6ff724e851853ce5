"""Mamba (Gu & Dao 2023), written from scratch: the sequence model that Algorithm Distillation trains.

The paper (Sections 3 and 5, Appendix B) replaces AD's causal transformer with Mamba because Mamba's
cost grows linearly with the context during training and stays constant per step during a rollout.
Its core is the selective state-space layer S6. For every channel d of the input u and every state
index n, with input-dependent step size delta_t and input-dependent B_t, C_t:

    h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[n] * u_t[d]     (discretise)
    y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]                                      (read out)

and the block gates y with silu(z). Everything but the recurrence in h is element-wise or a matmul,
so `selective_scan` computes those parts in parallel over time and runs only the recurrence
h_t = a_t * h_{t-1} + b_t step by step. Three paths, one semantics:
  "ref"    a plain sequential loop, differentiated by autograd: the oracle of the tests;
  "torch"  the CPU path: the linear recurrence as an autograd Function whose backward is the reverse
           recurrence (below), so autograd sees one node instead of L, walking time in cache-sized chunks;
           no log-space / cumulative-product closed forms (they divide by products of decays, which underflow);
  "triton" the fused GPU kernel (Triton, forward and backward, below), picked by backend="auto" for CUDA
           tensors; on a CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1: the tests).
The file reads in that order: the scan and its reference, the block and the model, then the two fast
paths.

Resets (for RL^2 in rl2.py, as in S5-RL, Lu et al. 2023): `reset` r [batch, L] marks the steps where a new
sequence (a new trial) starts, and every path then runs h_t = a_t (1 - r_t) h_{t-1} + delta_t B_t u_t with
a_t = exp(delta_t A), and the causal conv reads zeros before the reset. Many short sequences then pack into
one long one and train in one scan, exactly as if each ran alone. reset=None runs the code without them.

`Mamba` stacks residual blocks (RMSNorm -> MambaBlock) between an input and an output projection.
`forward` reads a whole sequence; `init_state`/`step` read it one token at a time with O(1) time and
memory per token (a conv window and the SSM state h per layer) and reproduce `forward`.

    python -c "import mamba, torch; print(mamba.Mamba(4, 2, 64, 2)(torch.randn(1, 10, 4)).shape)"
    python bench.py scan                                  # the backends side by side
"""
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    jit = triton.jit
except ImportError:  # no Triton wheel (e.g. macOS): the kernels below are defined but never launched
    triton, tl, jit = None, types.SimpleNamespace(constexpr=None), (lambda fn: fn)

BACKENDS = ("auto", "ref", "torch", "triton")


# ----------------------------------------------------------------------------- the selective scan (S6)

def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto",
                   return_last_state=False, reset=None):
    """The S6 scan with the reference implementation's shapes:
    u, delta, z [batch, dim, L]; A [dim, N]; B, C [batch, N, L]; D, delta_bias [dim] -> y [batch, dim, L].
    delta <- softplus(delta + delta_bias) when asked; y = (scan + D * u) * silu(z). Computed in fp32,
    returned in u's dtype. return_last_state=True returns (y, h_{L-1} [batch, dim, N] in fp32) for a
    recurrent hand-off to `step`; only "ref" differentiates through that last state.
    reset [batch, L] bool: r_t = True where a new sequence starts, which drops h_{t-1} (the module docstring)."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, reset)
    if backend == "auto":  # the fused kernel wherever it can run, the CPU loop elsewhere
        backend = "triton" if u.is_cuda and triton is not None else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective_scan backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "triton":  # bias, softplus, D and the gate are fused into the kernel
        y, last_state = _scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset)
        return (y, last_state) if return_last_state else y
    dtype = u.dtype
    with torch.autocast(u.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
        u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
        if delta_bias is not None:
            delta = delta + delta_bias.float()[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        y, last_state = (_scan_ref if backend == "ref" else SelectiveScanFn.apply)(u, delta, A, B, C, reset)
        if D is not None:
            y = y + D.float()[:, None] * u
        if z is not None:
            y = y * F.silu(z.float())
    return (y.to(dtype), last_state) if return_last_state else y.to(dtype)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, reset):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, dim, L], got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    N = A.shape[-1]
    expected = {"delta": (delta, (batch, dim, L)), "A": (A, (dim, N)), "B": (B, (batch, N, L)),
                "C": (C, (batch, N, L)), "D": (D, (dim,)), "z": (z, (batch, dim, L)),
                "delta_bias": (delta_bias, (dim,)), "reset": (reset, (batch, L))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    if reset is not None and reset.dtype != torch.bool:
        raise ValueError(f"selective_scan: reset must be a bool tensor, got {reset.dtype}")


def _scan_ref(u, delta, A, B, C, reset=None):
    """The recurrence exactly as written in the module docstring, one time step at a time."""
    batch, dim, L = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        a = torch.exp(delta[:, :, t, None] * A)
        if reset is not None:
            a = a * (1 - reset[:, t, None, None].float())
        h = a * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1), h


# ----------------------------------------------------------------------------- the Mamba block

class MambaBlock(nn.Module):
    """in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> S6 scan; gate with silu(z); out_proj."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
        super().__init__()
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = dt_rank = math.ceil(d_model / 16)
        self.d_state, self.d_conv = d_state, d_conv
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

        # Step sizes start log-uniform in [dt_min, dt_max]: the bias is softplus^-1(dt) = dt + log(1 - e^-dt).
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(dt_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real initialisation A[d, n] = -(n + 1), kept as log(-A) so that A stays negative (stable decay).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True

    def A(self):
        """The state matrix (diagonal, one row per channel), negative so that exp(delta A) decays."""
        return -torch.exp(self.A_log.float())

    def forward(self, hidden, backend="auto", reset=None):
        """hidden [batch, L, d_model] -> [batch, L, d_model]; reset [batch, L] bool or None (selective_scan)."""
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)              # [batch, d_inner, L] each
        x = F.silu(self.conv(x, reset))
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)                      # bias goes in as delta_bias
        y = selective_scan(x, delta, self.A(), B.transpose(1, 2), C.transpose(1, 2),
                           self.D.float(), z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           backend=backend, reset=reset)
        return self.out_proj(y.transpose(1, 2))

    def conv(self, x, reset=None):
        """The causal depthwise conv of x [batch, d_inner, L]. With resets, the window x_{t-d_conv+1..t} of
        each step holds zeros before the latest reset, as step's window does after init_state."""
        L = x.shape[-1]
        if reset is None:
            return self.conv1d(x)[..., :L]                                        # causal: drop the right pad
        t = torch.arange(L, device=x.device)
        start = torch.where(reset, t, 0).cummax(-1).values                        # [batch, L]: the latest reset
        window_t = t[:, None] + torch.arange(1 - self.d_conv, 1, device=x.device)    # [L, d_conv]: times read
        windows = F.pad(x, (self.d_conv - 1, 0)).unfold(-1, self.d_conv, 1)      # [batch, d_inner, L, d_conv]
        windows = windows * (window_t >= start[..., None])[:, None]               # zero what precedes the reset
        return (windows * self.conv1d.weight[:, 0, None]).sum(-1) + self.conv1d.bias[:, None]

    def init_state(self, batch, device=None):
        """(conv window of the last d_conv inputs, SSM state h), zero as before the first token."""
        return (torch.zeros(batch, self.d_inner, self.d_conv, device=device),
                torch.zeros(batch, self.d_inner, self.d_state, device=device))

    def step(self, hidden, state, reset=None):
        """One token: hidden [batch, d_model] -> ([batch, d_model], new state). Same maths as forward;
        reset [batch] bool starts a new sequence in those rows: their state goes back to init_state's zeros."""
        conv_window, h = state
        if reset is not None:
            keep = 1 - reset.float()[:, None, None]
            conv_window, h = conv_window * keep, h * keep
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        conv_window = torch.cat([conv_window[:, :, 1:], x[..., None]], dim=-1)
        x = F.silu((conv_window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))                                      # [batch, d_inner]
        h = torch.exp(delta[..., None] * self.A()) * h + (delta * x)[..., None] * B[:, None, :]
        y = (h @ C[..., None]).squeeze(-1) + self.D * x
        return self.out_proj(y * F.silu(z)), (conv_window, h)


# ----------------------------------------------------------------------------- the model

class ResidualBlock(nn.Module):
    """x + MambaBlock(RMSNorm(x)): the pre-norm residual of the reference model."""

    def __init__(self, d_model, **block_kwargs):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = MambaBlock(d_model, **block_kwargs)

    def forward(self, x, backend="auto", reset=None):
        return x + self.mixer(self.norm(x), backend=backend, reset=reset)

    def step(self, x, state, reset=None):
        y, state = self.mixer.step(self.norm(x), state, reset)
        return x + y, state


class Mamba(nn.Module):
    """A sequence model from d_in-dimensional tokens to d_out-dimensional outputs:
    Linear(d_in, d_model) -> n_layer residual Mamba blocks -> RMSNorm -> Linear(d_model, d_out)."""

    def __init__(self, d_in, d_out, d_model, n_layer, d_state=16, d_conv=4, expand=2):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.layers = nn.ModuleList(
            ResidualBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand) for _ in range(n_layer))
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, d_out)
        # As in the reference: shrink each residual branch's output so the residual stream's variance
        # does not grow with depth at initialisation (GPT-2's scheme).
        for layer in self.layers:
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(n_layer)

    def forward(self, x, backend="auto", reset=None):
        """x [batch, L, d_in] -> [batch, L, d_out]. reset [batch, L] bool: r_t = True where a new sequence
        starts inside the batch row (its outputs then equal those of the sequence run alone)."""
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, backend=backend, reset=reset)
        return self.head(self.norm_f(h))

    def init_state(self, batch, device=None):
        return [layer.mixer.init_state(batch, device) for layer in self.layers]

    def step(self, x, state, reset=None):
        """One token x [batch, d_in] -> (y [batch, d_out], state): O(1) time and memory per token.
        reset [batch] bool: these rows start a new sequence with this token (forward's r_t)."""
        h = self.embed(x)
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            h, layer_state = layer.step(h, layer_state, reset)
            new_state.append(layer_state)
        return self.head(self.norm_f(h)), new_state


# ----------------------------------------------------------------------------- the fast scans: the CPU loop

CPU_CHUNK_BYTES = 2 ** 20   # SelectiveScanFn's chunk length: each [T, batch, N, dim] buffer holds about this much


class SelectiveScanFn(torch.autograd.Function):
    """The scan for the CPU, with a hand-written backward so that autograd sees one node instead of a graph of
    L steps. It walks time in chunks of T steps (`_chunk_states`): a_t = exp(delta_t A) and b_t = delta_t u_t B_t
    of a whole chunk are one op each, and only h_t = a_t h_{t-1} + b_t runs step by step, one op per step.
    Why chunks: one step's [batch, N, dim] slab is too small to pay for the dozen ops it would need (every op
    costs a fixed dispatch), while a_t for all L steps at once streams [L, batch, N, dim] tensors through
    memory several times; a chunk's buffers stay in cache (T from CPU_CHUNK_BYTES). Everything is time-major
    with the channels last, [L, batch, N, dim]: each step is one contiguous block, and every broadcast runs
    along the long, contiguous dim axis. a_t is computed as 2^(delta_t A log2 e), as in the official CUDA
    kernel: PyTorch's exp2 on a CPU costs about half its exp, which is the largest single cost of a step.

    Backward, with g_t = dLoss/dh_t counting every path through later steps:
        g_t = C_t dy_t + a_{t+1} g_{t+1}                  (the recurrence again, run in reverse, step by step)
    and then, for all steps of a chunk at once (batched matmuls and sums),
        dB_t = sum_d g_t delta_t u_t          d(delta_t u_t) = sum_n g_t B_t          dC_t = sum_d h_t dy_t
        dA = sum_t,batch g_t a_t h_{t-1} delta_t          ddelta_t += sum_n g_t a_t h_{t-1} A.
    The forward keeps only the state before each chunk, and the backward recomputes the chunk's a_t and h_t
    from it with the same ops (as the Triton kernels do): the saved states are 1/T of all of them, and no
    [L, batch, N, dim] tensor is ever written. Recomputing h_{t-1} backwards from h_t instead would divide
    by a_t, and closed forms through log space or cumulative products divide by products of decays: those
    underflow. With resets every a_t above becomes a_t (1 - r_t): nothing flows across a reset either way."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, reset):
        u, delta, B, C = (_time_major(x) for x in (u, delta, B, C))       # [L, batch, dim], [L, batch, N]
        keep = None if reset is None else (1 - reset.float()).T[:, :, None, None]   # [L, batch, 1, 1]: 1 - r_t
        (L, batch, dim), N = u.shape, A.shape[1]
        T = _chunk_len(u, N)
        delta_u, A2 = delta * u, (A * math.log2(math.e)).T.contiguous()   # A2 [N, dim]
        H_buf, a_buf = u.new_empty(T + 1, batch, N, dim), u.new_empty(T, batch, N, dim)
        h_before = u.new_empty(math.ceil(L / T), batch, N, dim)           # the state before each chunk
        h = u.new_zeros(batch, N, dim)                                    # h_{-1} = 0
        y = u.new_empty(L, batch, dim)
        for k, t0 in enumerate(range(0, L, T)):
            s = slice(t0, t0 + T)
            h_before[k] = h
            H, _ = _chunk_states(h, s, delta, delta_u, B, A2, keep, H_buf, a_buf)
            torch.matmul(C[s, :, None, :], H[1:], out=y[s, :, None])      # y_t = sum_n C_t h_t
            h = H[-1]
        ctx.save_for_backward(u, delta, A, B, C, h_before, keep)
        last_state = h.transpose(-1, -2).contiguous()                     # [batch, dim, N]; no gradient
        ctx.mark_non_differentiable(last_state)
        return y.permute(1, 2, 0), last_state

    @staticmethod
    def backward(ctx, dy, _):
        u, delta, A, B, C, h_before, keep = ctx.saved_tensors
        (_, batch, dim), N = u.shape, A.shape[1]
        T = _chunk_len(u, N)
        dy = _time_major(dy)[:, :, None, :]                               # [L, batch, 1, dim]
        delta_u, A_T = delta * u, A.T.contiguous()                        # A_T [N, dim]
        A2 = A_T * math.log2(math.e)
        H_buf, (a_buf, g_buf, tmp) = u.new_empty(T + 1, batch, N, dim), u.new_empty(3, T, batch, N, dim)
        d_delta_u, d_delta_A = torch.empty_like(u), torch.empty_like(u)  # d(delta_t u_t), the part of ddelta via A
        dB, dC, dA = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(A_T)
        ag_after = None                   # a_{t+1} g_{t+1} at the first step t+1 of the chunk after this one
        for k in reversed(range(len(h_before))):
            s = slice(k * T, k * T + T)
            H, a = _chunk_states(h_before[k], s, delta, delta_u, B, A2, keep, H_buf, a_buf)   # h_{t-1}, h_t; a_t
            g = torch.mul(dy[s], C[s, :, :, None], out=g_buf[:len(a)])    # C_t dy_t, then + a_{t+1} g_{t+1}:
            if ag_after is not None:
                g[-1] += ag_after
            g_t, a_t = g.unbind(0), a.unbind(0)
            for t in range(len(a) - 2, -1, -1):
                g_t[t].addcmul_(a_t[t + 1], g_t[t + 1])
            torch.matmul(B[s, :, None, :], g, out=d_delta_u[s, :, None])                  # sum_n g_t B_t
            torch.matmul(delta_u[s, :, None, :], g.transpose(-1, -2), out=dB[s, :, None]) # sum_d g_t delta_t u_t
            torch.matmul(dy[s], H[1:].transpose(-1, -2), out=dC[s, :, None])              # sum_d h_t dy_t
            ag = g.mul_(a)                                                # from here on g's buffer holds a_t g_t
            ag_after = ag[0].clone()
            g_dA = ag.mul_(H[:-1])                                        # g_t a_t h_{t-1} = dLoss/d(delta_t A)
            torch.sum(torch.mul(g_dA, A_T, out=tmp[:len(a)]), -2, out=d_delta_A[s])
            dA += g_dA.mul_(delta[s, :, None, :]).sum((0, 1))
        du = d_delta_u * delta
        d_delta = d_delta_u.mul_(u).add_(d_delta_A)
        return (du.permute(1, 2, 0), d_delta.permute(1, 2, 0), dA.T, dB.permute(1, 2, 0), dC.permute(1, 2, 0),
                None)


def _chunk_states(h, s, delta, delta_u, B, A2, keep, H_buf, a_buf):
    """The recurrence over the time steps s = t0..t1-1 (a slice) from the state h [batch, N, dim] before them,
    written into the chunk's buffers; delta, delta_u [L, batch, dim], B [L, batch, N], A2 = A^T log2(e)
    [N, dim], keep [L, batch, 1, 1] or None. Returns the views H = (h_{t0-1}, h_{t0}, ..., h_{t1-1}) and
    a = (a_{t0}, ..., a_{t1-1}) of the buffers."""
    T = len(delta[s])
    a = torch.mul(delta[s, :, None, :], A2, out=a_buf[:T]).exp2_()      # a_t = exp(delta_t A), the chunk at once
    if keep is not None:
        a.mul_(keep[s])
    H = H_buf[:T + 1]
    H[0] = h
    torch.mul(delta_u[s, :, None, :], B[s, :, :, None], out=H[1:])      # b_t, the chunk at once
    h_t, a_t = H.unbind(0), a.unbind(0)
    for t in range(T):                                                  # h_t = a_t h_{t-1} + b_t, one op a step
        h_t[t + 1].addcmul_(a_t[t], h_t[t])
    return H, a


def _chunk_len(u, N):
    """Time steps per chunk for u [L, batch, dim]: a [T, batch, N, dim] buffer of about CPU_CHUNK_BYTES."""
    L, batch, dim = u.shape
    return max(1, min(L, CPU_CHUNK_BYTES // (batch * N * dim * u.element_size())))


def _time_major(x):
    """[batch, *, L] -> [L, batch, *], contiguous: each time step one block of memory."""
    return x.permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- the Triton kernels (GPU)
#
# One program owns one batch row b and a block of BLOCK_D channels, and walks the sequence in chunks of
# CHUNK time steps. Per chunk it loads [BLOCK_D, CHUNK] tiles of delta, u (and z, dy), contiguous along
# time (the last axis of the [batch, dim, L] layout, so the loads coalesce), then loops over the state
# index n: for one n the recurrence h_t = a_t h_{t-1} + b_t of all BLOCK_D channels is an element-wise
# affine map per step, and affine maps compose associatively,
#     (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2),
# so a chunk is one tl.associative_scan along time, seeded with the state carried in from the previous
# chunk (b at the chunk's first step += a * h_carry). The carried state [BLOCK_D, N] stays in fp32
# registers; between chunks the only sequential dependence is that carry. Why not one step at a time:
# each step would load a strided column of every input and wait for it (L dependent memory latencies),
# and the backward would need h_{t-1} beside g_t step by step; a chunk loads coalesced tiles once and
# holds h and g of all its steps in registers together. Loads and arithmetic are fp32 whatever the input
# dtype (bf16 inputs are upcast on load, outputs cast back on store).
#
# Backward, per channel and state, with g_t = dLoss/dh_t (every path through later steps counted):
#     g_t = C_t dy_t + a_{t+1} g_{t+1}                the same recurrence, backwards: a reverse scan with
#                                                    the same combine (Triton's own tests check reverse=True
#                                                    on exactly this non-commutative linear recurrence)
#     du_t     = delta_t sum_n g_t B_t + D dy_t       ddelta_t = u_t sum_n g_t B_t + sum_n A g_t a_t h_{t-1}
#     dA       = sum_t g_t a_t h_{t-1} delta_t        dB_t = sum_d g_t delta_t u_t,   dC_t = sum_d dy_t h_t
# with a_t h_{t-1} = h_t - b_t (no shifted copy of h needed), dy = dout silu(z) and
# dz = dout y silu'(z), dD = sum dy u, and through softplus ddelta_raw = ddelta sigmoid(delta_raw + bias).
# The backward needs every h_t, but storing them is a [batch, dim, L, N] tensor (N = 16 times the
# input: 3.2 GB at batch 8, dim 1536, L 4096). So the forward saves only the state at the end of each
# chunk ([batch, dim, L / CHUNK, N]), and the backward, walking the chunks in reverse, recomputes the
# chunk's h from the saved state before it: one more scan per chunk, far cheaper than the memory traffic.
# dB and dC sum over channels, which several programs own: each program writes its partial sums to
# [batch, channel blocks, N, L] buffers, summed afterwards in torch (deterministic, no atomics).
# Resets (HAS_RESET) turn every a_t, forward and backward, into a_t (1 - r_t) (`_decay_tile`): a reset at a
# chunk's first step shuts the carried h out, one at the next chunk's first step shuts g_carry out.

# Tiles of [16 channels, 32 steps] over 4 warps: 4 values per thread and tile. Compiled for sm_90 without a
# GPU (triton.compile + cuobjdump), the forward takes 139 registers a thread and the backward 244, with no
# spills; [16, 64] tiles spilled in the backward. Not timed: no GPU was at hand.
BLOCK_D, CHUNK, NUM_WARPS = 16, 32, 4


@jit
def _affine_combine(a1, b1, a2, b2):
    """Compose two steps h -> a h + b: first (a1, b1), then (a2, b2)."""
    return a1 * a2, a2 * b1 + b2


@jit
def _column(H, offs_n, n):
    """H[:, n] of a register tile (registers cannot be indexed by a runtime n: mask and sum instead)."""
    return tl.sum(tl.where(offs_n[None, :] == n, H, 0.0), axis=1)


@jit
def _load_keep(reset_ptr, offs, mask, HAS_RESET: tl.constexpr):
    """1 - r_t along a chunk of one batch row's time steps (1 where masked); without resets, nothing to load."""
    keep = 1.0
    if HAS_RESET:
        keep = 1.0 - tl.load(reset_ptr + offs, mask=mask, other=0).to(tl.float32)
    return keep


@jit
def _decay_tile(delta, A_n, keep, HAS_RESET: tl.constexpr):
    """a_t = exp(delta_t A[:, n]) of a [BLOCK_D, CHUNK] tile, times 1 - r_t with resets."""
    a = tl.exp(delta * A_n[:, None])
    if HAS_RESET:
        a = a * keep[None, :]
    return a


@jit
def _load_delta(delta_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta tile after bias and softplus (zero where masked: a = 1, b = 0, a step that changes nothing),
    and d delta / d delta_raw."""
    x = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += bias[:, None]
    slope = tl.full(x.shape, 1.0, tl.float32)
    if SOFTPLUS:  # softplus(x) = log(1 + e^x), = x above 20 as in F.softplus; its slope is sigmoid(x)
        slope = tl.sigmoid(x)
        x = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))
    return tl.where(mask, x, 0.0), slope


@jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, out_ptr,
                     states_ptr, dim, L, N, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_RESET: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    b, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n, offs_k = tl.arange(0, BLOCK_N), tl.arange(0, CHUNK)
    mask_d = offs_d < dim
    first = offs_k[None, :] == 0
    last = offs_k[None, :] == CHUNK - 1
    rows = (b * dim + offs_d[:, None]) * L                             # u, delta, z, out: [batch, dim, L] (int64)
    BC_row = b * N * L                                                 # B, C: [batch, N, L]
    D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    h_carry = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)                 # h at the end of the previous chunk
    for c in range(n_chunks):
        offs_t = c * CHUNK + offs_k
        mask_t = offs_t < L
        mask = mask_d[:, None] & mask_t[None, :]
        delta, _ = _load_delta(delta_ptr, bias, rows + offs_t[None, :], mask, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + rows + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        keep = _load_keep(reset_ptr, b * L + offs_t, mask_t, HAS_RESET)
        delta_u = delta * u
        y = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        for n in range(N):
            A_n = tl.load(A_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(tl.float32)
            B_n = tl.load(B_ptr + BC_row + n * L + offs_t, mask=mask_t, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + BC_row + n * L + offs_t, mask=mask_t, other=0.0).to(tl.float32)
            a = _decay_tile(delta, A_n, keep, HAS_RESET)
            x = delta_u * B_n[None, :]
            x = tl.where(first, x + a * _column(h_carry, offs_n, n)[:, None], x)   # seed with the carry
            _, h = tl.associative_scan((a, x), 1, _affine_combine)
            y += h * C_n[None, :]
            h_last = tl.sum(tl.where(last, h, 0.0), axis=1)            # masked tail steps keep h as it is
            h_carry = tl.where(offs_n[None, :] == n, h_last[:, None], h_carry)
        state_offs = ((b * dim + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]
        tl.store(states_ptr + state_offs, h_carry, mask=mask_d[:, None] & (offs_n[None, :] < N))
        if HAS_D:
            y += D[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + rows + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + rows + offs_t[None, :], y, mask=mask)


@jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, dout_ptr,
                     states_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                     dim, L, N, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_RESET: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    b, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n, offs_k = tl.arange(0, BLOCK_N), tl.arange(0, CHUNK)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    first = offs_k[None, :] == 0
    last = offs_k[None, :] == CHUNK - 1
    rows = (b * dim + offs_d[:, None]) * L
    BC_row = b * N * L
    partial_row = (b * tl.num_programs(1) + block) * N * L             # dB, dC partials: [batch, blocks, N, L]
    D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    g_carry = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)                 # g at the first step of the next chunk
    dA = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        offs_t = c * CHUNK + offs_k
        mask = mask_d[:, None] & (offs_t < L)[None, :]
        mask_next = mask_d[:, None] & (offs_t + 1 < L)[None, :]
        delta, slope = _load_delta(delta_ptr, bias, rows + offs_t[None, :], mask, HAS_BIAS, SOFTPLUS)
        delta_next, _ = _load_delta(delta_ptr, bias, rows + offs_t[None, :] + 1, mask_next, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + rows + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        keep = _load_keep(reset_ptr, b * L + offs_t, offs_t < L, HAS_RESET)
        keep_next = _load_keep(reset_ptr, b * L + offs_t + 1, offs_t + 1 < L, HAS_RESET)
        dy = tl.load(dout_ptr + rows + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rows + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
            dout, sig_z = dy, tl.sigmoid(z)
            dy = dout * z * sig_z                                      # d(out)/d(y) = silu(z)
        h_carry = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)             # h before the chunk: saved, or h_{-1} = 0
        if c > 0:
            state_offs = ((b * dim + offs_d[:, None]) * n_chunks + c - 1) * N + offs_n[None, :]
            h_carry = tl.load(states_ptr + state_offs, mask=mask_dn, other=0.0)
        delta_u = delta * u
        y = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        d_delta_u = tl.zeros((BLOCK_D, CHUNK), tl.float32)             # sum_n g B
        ddelta_A = tl.zeros((BLOCK_D, CHUNK), tl.float32)              # sum_n A g a h_{t-1}
        for n in range(N):
            A_n = tl.load(A_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(tl.float32)
            B_n = tl.load(B_ptr + BC_row + n * L + offs_t, mask=offs_t < L, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + BC_row + n * L + offs_t, mask=offs_t < L, other=0.0).to(tl.float32)
            # recompute this chunk's states from the saved one, exactly as the forward did
            a = _decay_tile(delta, A_n, keep, HAS_RESET)
            x = delta_u * B_n[None, :]
            seeded = tl.where(first, x + a * _column(h_carry, offs_n, n)[:, None], x)
            _, h = tl.associative_scan((a, seeded), 1, _affine_combine)
            y += h * C_n[None, :]
            # g_t = C_t dy_t + a_{t+1} g_{t+1}; the chunk's last step reaches g_carry through a_{t+1}
            a_next = _decay_tile(delta_next, A_n, keep_next, HAS_RESET)
            Cdy = dy * C_n[None, :]
            Cdy = tl.where(last, Cdy + a_next * _column(g_carry, offs_n, n)[:, None], Cdy)
            _, g = tl.associative_scan((a_next, Cdy), 1, _affine_combine, reverse=True)
            g_first = tl.sum(tl.where(first, g, 0.0), axis=1)
            g_carry = tl.where(offs_n[None, :] == n, g_first[:, None], g_carry)
            gah = g * (h - x)                                          # g_t a_t h_{t-1}
            ddelta_A += gah * A_n[:, None]
            dA = tl.where(offs_n[None, :] == n, dA + tl.sum(gah * delta, axis=1)[:, None], dA)
            d_delta_u += g * B_n[None, :]
            tl.store(dB_ptr + partial_row + n * L + offs_t, tl.sum(g * delta_u, axis=0), mask=offs_t < L)
            tl.store(dC_ptr + partial_row + n * L + offs_t, tl.sum(h * dy, axis=0), mask=offs_t < L)
        du = d_delta_u * delta
        if HAS_D:
            y += D[:, None] * u
            du += D[:, None] * dy
            dD += tl.sum(dy * u, axis=1)
        if HAS_Z:  # silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
            tl.store(dz_ptr + rows + offs_t[None, :], dout * y * sig_z * (1.0 + z * (1.0 - sig_z)), mask=mask)
        ddelta = (d_delta_u * u + ddelta_A) * slope                    # w.r.t. the raw delta
        dbias += tl.sum(tl.where(mask, ddelta, 0.0), axis=1)
        tl.store(du_ptr + rows + offs_t[None, :], du, mask=mask)
        tl.store(ddelta_ptr + rows + offs_t[None, :], ddelta, mask=mask)
    dA_offs = (b * dim + offs_d[:, None]) * N + offs_n[None, :]        # per batch row: [batch, dim, N]
    tl.store(dA_ptr + dA_offs, dA, mask=mask_dn)
    tl.store(dD_ptr + b * dim + offs_d, dD, mask=mask_d)
    tl.store(dbias_ptr + b * dim + offs_d, dbias, mask=mask_d)


def _scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset):
    if triton is None:
        raise RuntimeError("selective_scan backend 'triton' needs the triton package; use backend='torch'")
    if not u.is_cuda and not _INTERPRETED:
        raise ValueError(f"selective_scan backend 'triton' runs on CUDA tensors (got {u.device}); use "
                         "backend='torch' on a CPU, or set TRITON_INTERPRET=1 before importing mamba (slow; tests)")
    return TritonScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset)


class TritonScanFn(torch.autograd.Function):
    """The two kernels as one autograd node. Inputs are made contiguous ([batch, dim, L] with time
    innermost); a missing D / z / delta_bias / reset is passed as a dummy pointer that the kernel never reads."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset):
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D, z, delta_bias, reset = (None if t is None else t.contiguous() for t in (D, z, delta_bias, reset))
        batch, dim, L = u.shape
        N, chunk = A.shape[1], _chunk(L)
        n_chunks = triton.cdiv(L, chunk)
        out = torch.empty_like(u)
        states = u.new_empty(batch, dim, n_chunks, N, dtype=torch.float32)   # h at the end of each chunk
        block_d = min(BLOCK_D, triton.next_power_of_2(dim))
        with _device_of(u):
            _scan_fwd_kernel[(batch, triton.cdiv(dim, block_d))](
                u, delta, A, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), _or(reset, u), out, states,
                dim, L, N, n_chunks, D is not None, z is not None, delta_bias is not None, bool(delta_softplus),
                reset is not None, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(N), CHUNK=chunk,
                num_warps=NUM_WARPS)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, reset, states)
        ctx.delta_softplus = bool(delta_softplus)
        last_state = states[:, :, -1].clone()
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, _):
        u, delta, A, B, C, D, z, delta_bias, reset, states = ctx.saved_tensors
        batch, dim, L = u.shape
        N, chunk, n_chunks = A.shape[1], _chunk(L), states.shape[2]
        block_d = min(BLOCK_D, triton.next_power_of_2(dim))
        n_blocks = triton.cdiv(dim, block_d)
        du, ddelta, dz = torch.empty_like(u), torch.empty_like(delta), torch.empty_like(_or(z, u))
        f32 = dict(device=u.device, dtype=torch.float32)
        dA, dD, dbias = torch.empty(batch, dim, N, **f32), *torch.empty(2, batch, dim, **f32)
        dB, dC = torch.empty(batch, n_blocks, N, L, **f32), torch.empty(batch, n_blocks, N, L, **f32)
        with _device_of(u):
            _scan_bwd_kernel[(batch, n_blocks)](
                u, delta, A, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), _or(reset, u), dout.contiguous(),
                states, du, ddelta, dz, dA, dB, dC, dD, dbias, dim, L, N, n_chunks,
                D is not None, z is not None, delta_bias is not None, ctx.delta_softplus, reset is not None,
                BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(N), CHUNK=chunk, num_warps=NUM_WARPS)
        return (du, ddelta, dA.sum(0).to(A.dtype), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype),
                None if D is None else dD.sum(0).to(D.dtype), None if z is None else dz,
                None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype), None, None)


def _chunk(L):
    """Time steps per chunk: CHUNK, or less for short sequences (the interpreter pays for every padded step)."""
    return min(CHUNK, max(16, triton.next_power_of_2(L)))


def _or(tensor, dummy):
    return dummy if tensor is None else tensor


def _device_of(tensor):
    """Triton launches a kernel on the *current* CUDA device, not on the one its pointers live on: under
    torchrun, or with --device cuda:1, that would be GPU 0. Every launch goes under this guard, which makes
    the tensor's GPU current (-1, for the interpreter's CPU tensors, switches nothing)."""
    return torch.cuda.device(tensor.device if tensor.is_cuda else -1)


_INTERPRETED = type(_scan_fwd_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 when defined
