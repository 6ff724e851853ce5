"""The causal transformer baseline of AD (paper Section 5.3, Figure 1, Appendix B): the architecture the
original Algorithm Distillation used and that the paper compares Mamba against.

A pre-norm GPT (nanoGPT's layout): tokens -> Linear(d_in, d_model) + learned absolute position embeddings
-> n_layer blocks of [LayerNorm -> causal multi-head self-attention -> residual, LayerNorm -> MLP(d_ff) ->
residual] -> LayerNorm -> Linear(d_model, d_out). Appendix B: 4 heads, absolute positions, feed-forward
2048; widths per env in envs.ENVS. Attention goes through F.scaled_dot_product_attention, which picks
flash / memory-efficient kernels where the device has them.

The interface is mamba.Mamba's, so ad.py and evaluate.py treat both alike:
  forward(x [B, T, d_in]) -> [B, T, d_out]              training, T <= max_len
  init_state(batch) / step(x_t [B, d_in], state)       rollouts, one token at a time, with a KV cache

The cost of a step is where the two architectures part: Mamba's state has a fixed size, while the KV cache
holds every past token, so a transformer step reads O(t) memory at token t (bench.py rollout measures it).
The position table ends at max_len. A rollout that goes past it slides: when the cache is full, the newest
max_len // 2 tokens are re-encoded at positions 0 .. max_len // 2 - 1 and the rollout goes on from there,
so every output sees between max_len // 2 and max_len - 1 earlier tokens, never a position the model has no
embedding for. That costs one forward pass of half a window every max_len // 2 steps.

    python -c "import transformer, torch; print(transformer.Transformer(4, 2, 64, 2)(torch.randn(1, 10, 4)).shape)"
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not a multiple of n_head {n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def heads(self, x):
        """[B, T, 3 * d_model] -> q, k, v, each [B, n_head, T, head_dim]."""
        B, T, _ = x.shape
        return (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))

    def merge(self, y):
        B, _, T, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x):
        """x [B, T, d_model] -> (output, k, v): k and v are what a KV cache keeps of these tokens."""
        q, k, v = self.heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)), k, v

    def step(self, x, cache_k, cache_v, t):
        """One token x [B, 1, d_model] at cache slot t: store its k, v there and attend to slots 0..t."""
        q, k, v = self.heads(x)
        cache_k[:, :, t], cache_v[:, :, t] = k[:, :, 0], v[:, :, 0]
        # No mask: the only query is the newest token, which may see all of slots 0..t.
        return self.merge(F.scaled_dot_product_attention(q, cache_k[:, :, :t + 1], cache_v[:, :, :t + 1]))


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)): pre-norm, as GPT-2."""

    def __init__(self, d_model, n_head, d_ff):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x):
        y, k, v = self.attn(self.ln_1(x))
        x = x + y
        return x + self.mlp(self.ln_2(x)), k, v

    def step(self, x, cache_k, cache_v, t):
        x = x + self.attn.step(self.ln_1(x), cache_k, cache_v, t)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A causal GPT from d_in-dimensional tokens to d_out-dimensional outputs, positions 0 .. max_len - 1."""

    def __init__(self, d_in, d_out, d_model, n_layer, n_head=4, max_len=1024, d_ff=2048):
        super().__init__()
        self.max_len, self.n_head = max_len, n_head
        self.embed = nn.Linear(d_in, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, d_ff) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, d_out)
        # GPT-2's initialisation: N(0, 0.02), and the projections into the residual stream shrunk by
        # sqrt(2 n_layer) so that its variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def encode(self, x):
        """x [B, T, d_in] at positions 0..T-1 -> (output [B, T, d_out], per-layer (k, v) of the T tokens)."""
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"a sequence of {T} tokens is longer than this transformer's max_len {self.max_len}; "
                             f"train with a larger context or feed it in windows")
        h = self.embed(x) + self.pos(torch.arange(T, device=x.device))
        kv = []
        for block in self.blocks:
            h, k, v = block(h)
            kv.append((k, v))
        return self.head(self.ln_f(h)), kv

    def forward(self, x):
        """x [batch, T, d_in] -> [batch, T, d_out]; output t depends on tokens 0..t only."""
        return self.encode(x)[0]

    def init_state(self, batch, device=None):
        """An empty KV cache with room for max_len tokens, plus the raw tokens, kept for re-encoding."""
        head_dim = self.embed.out_features // self.n_head

        def cache():
            return torch.zeros(batch, self.n_head, self.max_len, head_dim, device=device)
        return {"tokens": torch.zeros(batch, self.max_len, self.embed.in_features, device=device),
                "k": [cache() for _ in self.blocks], "v": [cache() for _ in self.blocks], "length": 0}

    def step(self, x, state):
        """One token x [batch, d_in] -> (y [batch, d_out], state). The state's buffers are updated in place."""
        t = state["length"]
        if t == self.max_len:  # the position table is used up: slide (module docstring)
            t = self.slide(state)
        state["tokens"][:, t] = x
        h = self.embed(x[:, None]) + self.pos.weight[t]
        for block, cache_k, cache_v in zip(self.blocks, state["k"], state["v"]):
            h = block.step(h, cache_k, cache_v, t)
        state["length"] = t + 1
        return self.head(self.ln_f(h))[:, 0], state

    def slide(self, state):
        """Re-encode the newest max_len // 2 tokens at positions 0.. and return the next free slot."""
        keep = self.max_len // 2
        kept = state["tokens"][:, self.max_len - keep:].clone()
        state["tokens"][:, :keep] = kept
        if keep:
            _, kv = self.encode(kept)
            for (k, v), cache_k, cache_v in zip(kv, state["k"], state["v"]):
                cache_k[:, :, :keep], cache_v[:, :, :keep] = k, v
        return keep
