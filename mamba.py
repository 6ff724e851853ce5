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
           recurrence (below), so autograd sees one node instead of L; no log-space / cumulative-product
           closed forms (they divide by products of decays, which underflow);
  "triton" the fused GPU kernel (next step of the project), picked by backend="auto" on CUDA.

`Mamba` stacks residual blocks (RMSNorm -> MambaBlock) between an input and an output projection.
`forward` reads a whole sequence; `init_state`/`step` read it one token at a time with O(1) time and
memory per token (a conv window and the SSM state h per layer) and reproduce `forward`.

    python -c "import mamba, torch; print(mamba.Mamba(4, 2, 64, 2)(torch.randn(1, 10, 4)).shape)"
    python bench.py scan                                  # the backends side by side
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("auto", "ref", "torch")


# ----------------------------------------------------------------------------- the selective scan

def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto"):
    """The S6 scan with the reference implementation's shapes:
    u, delta, z [batch, dim, L]; A [dim, N]; B, C [batch, N, L]; D, delta_bias [dim] -> y [batch, dim, L].
    delta <- softplus(delta + delta_bias) when asked; y = (scan + D * u) * silu(z). Computed in fp32."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if backend == "auto":
        backend = "torch"  # the place where CUDA tensors will go to the Triton kernel
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective_scan backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y = (_scan_ref if backend == "ref" else _scan_torch)(u, delta, A, B, C)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, dim, L], got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    N = A.shape[-1]
    expected = {"delta": (delta, (batch, dim, L)), "A": (A, (dim, N)), "B": (B, (batch, N, L)),
                "C": (C, (batch, N, L)), "D": (D, (dim,)), "z": (z, (batch, dim, L)),
                "delta_bias": (delta_bias, (dim,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")


def _scan_ref(u, delta, A, B, C):
    """The recurrence exactly as written in the module docstring, one time step at a time."""
    batch, dim, L = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)


def _scan_torch(u, delta, A, B, C):
    return SelectiveScanFn.apply(u, delta, A, B, C)


class SelectiveScanFn(torch.autograd.Function):
    """The scan for the CPU: a loop over time whose every step touches one [batch, dim, N] slab that
    stays in cache (materialising exp(delta A) for all steps at once streams [L, batch, dim, N] tensors
    through memory several times and ran about 3x slower; README), with a hand-written backward so that autograd
    sees one node instead of a graph of L steps.

    Backward, with g_t = dLoss/dh_t counting every path through later steps and a_t = exp(delta_t A):
        g_t = C_t dy_t + a_{t+1} g_{t+1}                  (the recurrence again, run in reverse)
        dB_t = sum_d g_t delta_t u_t          d(delta_t u_t) = sum_n g_t B_t
        dA = sum_t,batch g_t h_{t-1} a_t delta_t          ddelta_t += sum_n g_t h_{t-1} a_t A
        dC_t = sum_d h_t dy_t.
    The states h_t are kept from the forward (recomputing h_{t-1} from h_t would divide by a_t)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, dim, L = u.shape
        delta_u = (delta * u).permute(2, 0, 1)[..., None]            # [L, batch, dim, 1]
        delta_t = delta.permute(2, 0, 1)[..., None]                   # [L, batch, dim, 1]
        B_t = B.permute(2, 0, 1)[:, :, None, :]                       # [L, batch, 1, N]
        hs = u.new_empty(L, batch, dim, A.shape[1])
        h = u.new_zeros(batch, dim, A.shape[1])
        for t in range(L):  # h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t, written in place into hs[t]
            h = torch.exp(delta_t[t] * A, out=hs[t]).mul_(h).addcmul_(delta_u[t], B_t[t])
        y = torch.matmul(hs, C.permute(2, 0, 1)[..., None]).squeeze(-1)   # [L, batch, dim]
        ctx.save_for_backward(u, delta, A, B, C, hs)
        return y.permute(1, 2, 0)

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, hs = ctx.saved_tensors
        L = u.shape[-1]
        dy_t = dy.permute(2, 0, 1)[..., None]                          # [L, batch, dim, 1]
        delta_t = delta.permute(2, 0, 1)[..., None]                    # [L, batch, dim, 1]
        delta_u_t = (delta * u).permute(2, 0, 1)[..., None]            # [L, batch, dim, 1]
        B_t, C_t = B.permute(2, 0, 1)[:, :, None, :], C.permute(2, 0, 1)[:, :, None, :]  # [L, batch, 1, N]
        g = torch.zeros_like(hs[0])                                    # g_t, carried backwards in time
        d_delta_u = torch.empty_like(dy_t)                             # d(delta_t u_t)
        d_delta_A = torch.zeros_like(dy_t)                             # the part of ddelta that comes via A
        dB = torch.empty_like(C_t)                                     # [L, batch, 1, N]
        dA = torch.zeros_like(g)                                       # per batch row, summed at the end
        for t in range(L - 1, -1, -1):
            g.addcmul_(dy_t[t], C_t[t])
            torch.sum(g * B_t[t], dim=-1, keepdim=True, out=d_delta_u[t])   # (tiny bmm calls are slower)
            torch.sum(g * delta_u_t[t], dim=-2, keepdim=True, out=dB[t])
            if t > 0:                                                  # h_{-1} = 0: nothing flows into a_0
                a = torch.exp(delta_t[t] * A)
                g_dA = g * hs[t - 1] * a                               # dLoss/d(delta_t A), element-wise
                torch.sum(g_dA * A, dim=-1, keepdim=True, out=d_delta_A[t])
                dA.addcmul_(g_dA, delta_t[t])
                g.mul_(a)
        dC = torch.matmul(dy_t.transpose(-1, -2), hs)                  # [L, batch, 1, N]
        d_delta_u, d_delta_A = d_delta_u[..., 0].permute(1, 2, 0), d_delta_A[..., 0].permute(1, 2, 0)
        return (d_delta_u * delta, d_delta_u * u + d_delta_A, dA.sum(0),
                dB[:, :, 0].permute(1, 2, 0), dC[:, :, 0].permute(1, 2, 0))


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

    def forward(self, hidden, backend="auto"):
        """hidden [batch, L, d_model] -> [batch, L, d_model]."""
        L = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)              # [batch, d_inner, L] each
        x = F.silu(self.conv1d(x)[..., :L])                                       # causal: drop the right pad
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)                      # bias goes in as delta_bias
        y = selective_scan(x, delta, self.A(), B.transpose(1, 2), C.transpose(1, 2),
                           self.D.float(), z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           backend=backend)
        return self.out_proj(y.transpose(1, 2))

    def init_state(self, batch, device=None):
        """(conv window of the last d_conv inputs, SSM state h), zero as before the first token."""
        return (torch.zeros(batch, self.d_inner, self.d_conv, device=device),
                torch.zeros(batch, self.d_inner, self.d_state, device=device))

    def step(self, hidden, state):
        """One token: hidden [batch, d_model] -> ([batch, d_model], new state). Same maths as forward."""
        conv_window, h = state
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

    def forward(self, x, backend="auto"):
        return x + self.mixer(self.norm(x), backend=backend)

    def step(self, x, state):
        y, state = self.mixer.step(self.norm(x), state)
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

    def forward(self, x, backend="auto"):
        """x [batch, T, d_in] -> [batch, T, d_out]."""
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, backend=backend)
        return self.head(self.norm_f(h))

    def init_state(self, batch, device=None):
        return [layer.mixer.init_state(batch, device) for layer in self.layers]

    def step(self, x, state):
        """One token x [batch, d_in] -> (y [batch, d_out], state): O(1) time and memory per token."""
        h = self.embed(x)
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            h, layer_state = layer.step(h, layer_state)
            new_state.append(layer_state)
        return self.head(self.norm_f(h)), new_state
