"""Decision Mamba-Hybrid (DM-H; Huang et al. 2024, papers/decision-mamba-hybrid.txt, Section 4) as a third
sequence model for AD: Mamba recalls the long cross-episodic context, a small transformer acts on the short one.

The stream of AD tokens x_0, x_1, ... (ad.py's layout) is cut into segments of c steps; segment j holds
x_{jc} .. x_{jc+c-1}.
  Mamba (mamba.Mamba)   reads the stream shortened c-fold, one token per segment (DM-H eq. 5): the c tokens
                        of a segment concatenated, so its input layer is a learned summary of the segment
                        (eq. 5 keeps the state, the summed reward and the completion flag; AD leans on the
                        actions of its context too, so we keep everything). Its output at segment j is the
                        sub-goal z_j, computed from segments 0 .. j-1 only (a zero token stands before
                        segment 0), so z_j is known when segment j starts.
  transformer           (transformer.Transformer) reads [z_j, x_{jc}, .., x_{jc+i}] and predicts the action
                        a_{jc+i} (DM-H eq. 6). Its context is at most c + 1 tokens, whatever the stream's
                        length: with Mamba's fixed-size state, a rollout step costs O(1) time and memory.
Both kinds of token go through the transformer's one input layer as [x, 0] and [0, z]: a linear layer on a
zero-padded concatenation is one linear layer per modality, as DM-H Section 4.4 embeds them.

Valuable sub-goals (DM-H Section 4.3, eq. 7): in training, a second pass of the transformer replaces z_j by
W s*_j, where s*_j is the future state of the segment's episode with the highest distance-weighted
accumulated reward (`valuable_subgoal_steps`; the paper's rule, on rewards shifted within each episode to be
non-negative, as the rule presumes) and W a frozen random linear layer into z's space. Both
passes predict the same actions and their losses are averaged (ad.py), so the transformer learns to follow
a sub-goal and Mamba is pushed to emit sub-goals the transformer can use. The paper samples z from a
Gaussian; here z is deterministic, like every other output of the project's models.

Interface as mamba.Mamba's and transformer.Transformer's:
  forward(x [B, L, d_in], subgoals=None) -> [B, L, d_out]       training (L need not be a multiple of c)
  init_state(batch) / step(x_t [B, d_in], state)                 rollouts: Mamba's state, z, a local KV cache

    python -c "import hybrid, torch; print(hybrid.Hybrid(6, 4, 32, 2, 2, segment=5)(torch.randn(1, 12, 6)).shape)"
    python ad.py --env point_goal --arch hybrid               # AD with DM-H; --no-valuable-subgoals: ablation
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import mamba
import transformer


def valuable_subgoal_steps(rew):
    """DM-H Section 4.3: for every step t of an episode, the future step t' > t maximising the accumulated
    reward from t to t' divided by the distance, (r_t + .. + r_t') / (t' - t). The rule presumes rewards
    >= 0 (the paper's tasks): then the division favours near states that lead to reward, its intent. On
    negative rewards (this project's -distance) it inverts: a sum of negatives shrinks in size per step
    with the distance, so the farthest state wins, and on point_goal most picks would be the episode's last
    state. So the rewards are first shifted by their episode's minimum to be >= 0 (the episode is the stretch
    the search runs over): the worst step is worth 0, better ones more, as the paper's rewards are, and
    adding a constant to an episode's rewards no longer changes its picks. The last step has no future: it
    keeps itself. Ties go to the nearest. rew [..., H] (one episode per row) -> int64 indices [..., H]."""
    H = rew.shape[-1]
    rew = rew - rew.min(-1, keepdim=True).values                     # >= 0, 0 at the episode's worst step
    before = F.pad(torch.cumsum(rew, -1), (1, 0))                    # before[i] = r_0 + .. + r_{i-1}
    steps = torch.arange(H, device=rew.device)
    accumulated = before[..., None, 1:] - before[..., :-1, None]      # [.., t, t'] = r_t + .. + r_t'
    distance = (steps[None, :] - steps[:, None]).to(rew.dtype)       # t' - t
    value = torch.where(distance > 0, accumulated / distance.clamp_min(1), -math.inf)
    best = value.argmax(-1)
    best[..., -1] = H - 1
    return best


class Hybrid(nn.Module):
    """Mamba over segments -> sub-goal z_j -> a causal transformer over [z_j, the segment's tokens so far].
    d_model is shared by both parts (DM-H uses 128 for both); d_goal is the width of a valuable sub-goal
    (the observation), mapped into z's space by the frozen layer."""

    def __init__(self, d_in, d_out, d_model, n_layer, attn_layers, segment, d_goal=None, d_state=16, n_head=4,
                 d_ff=None):
        super().__init__()
        self.segment, self.d_in, self.d_model = segment, d_in, d_model
        self.mamba = mamba.Mamba(segment * d_in, d_model, d_model, n_layer, d_state=d_state)
        self.transformer = transformer.Transformer(d_in + d_model, d_out, d_model, attn_layers, n_head=n_head,
                                                   max_len=segment + 1, d_ff=d_ff or 4 * d_model)
        # The frozen sub-goal layer: buffers, so no optimiser or parameter count sees them; nn.Linear's init.
        goal = nn.Linear(d_goal or d_in, d_model)
        self.register_buffer("goal_weight", goal.weight.detach())
        self.register_buffer("goal_bias", goal.bias.detach())

    def subgoals(self, x):
        """z_j for every segment j of x [B, L, d_in] -> [B, ceil(L / c), d_model], from segments < j."""
        B, L, _ = x.shape
        n_seg = math.ceil(L / self.segment)
        whole = x[:, :(n_seg - 1) * self.segment].reshape(B, n_seg - 1, self.segment * self.d_in)
        return self.mamba(torch.cat([whole.new_zeros(B, 1, whole.shape[-1]), whole], dim=1))

    def forward(self, x, subgoals=None):
        """x [B, L, d_in] -> [B, L, d_out]; output t depends on tokens 0..t only. With subgoals [B, L, d_goal]
        (the valuable sub-goal of each step), segment j is conditioned on W subgoals[:, jc] instead of z_j."""
        B, L, _ = x.shape
        c = self.segment
        if subgoals is None:
            z = self.subgoals(x)
        else:
            z = F.linear(subgoals[:, ::c], self.goal_weight, self.goal_bias)
        n_seg = z.shape[1]
        # the segments side by side in the batch, the last one padded (its padding follows every real token)
        local = F.pad(x, (0, 0, 0, n_seg * c - L)).reshape(B * n_seg, c, self.d_in)
        z = z.reshape(B * n_seg, 1, self.d_model)
        tokens = torch.cat([F.pad(z, (self.d_in, 0)), F.pad(local, (0, self.d_model))], dim=1)
        y = self.transformer(tokens)[:, 1:]                               # the outputs at the x tokens
        return y.reshape(B, n_seg * c, -1)[:, :L]

    def init_state(self, batch, device=None):
        """Mamba's state, the tokens of the segment under way (Mamba reads them when it ends), the local KV
        cache (z and up to c tokens) and the position in the segment."""
        return {"mamba": self.mamba.init_state(batch, device),
                "segment": torch.zeros(batch, self.segment, self.d_in, device=device),
                "local": self.transformer.init_state(batch, device), "position": 0}

    def step(self, x, state):
        """One token x [batch, d_in] -> (y [batch, d_out], state); reproduces forward. Buffers update in place."""
        i = state["position"]
        if i == 0:  # a new segment: Mamba reads the last one (zeros before the first), emits z, the cache restarts
            z, state["mamba"] = self.mamba.step(state["segment"].flatten(1), state["mamba"])
            state["local"]["length"] = 0
            self.transformer.step(F.pad(z, (self.d_in, 0)), state["local"])
        state["segment"][:, i] = x
        y, state["local"] = self.transformer.step(F.pad(x, (0, self.d_model)), state["local"])
        state["position"] = (i + 1) % self.segment
        return y, state
