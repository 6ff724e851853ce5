"""DroQ (Hiraoka et al. 2022): SAC with dropout Q-functions and several critic updates per env step.

It generates the learning histories that Algorithm Distillation imitates on Ant-Dir (paper Section 5.2,
Appendix A). DroQ is sample-efficient because it takes many gradient steps per env step (a high
update-to-data ratio); what keeps that from over-fitting the Q-functions is regularisation: every hidden
layer of each Q-network is Linear -> Dropout -> LayerNorm -> ReLU (a cheap stand-in for REDQ's large
ensemble). Everything else is sac.py; this file is only what changes:
  - the critics (`dropout_mlp`, with a per-task LayerNorm and per-task dropout masks so that tasks
    trained together stay independent: nn.LayerNorm's affine weights would be shared by every task, and
    nn.Dropout's masks would come from one generator for all of them),
  - the update: --gradient-steps critic updates per vector step, the actor and entropy weight
    every --policy-delay-th of them;
  - the actor climbs the mean of the Q-functions (DroQ's Algorithm 2, as REDQ does), not SAC's minimum.

The update-to-data ratio actually run: Appendix A reads like SB3-contrib/sbx settings, 5 envs per task,
3 gradient steps per vector step and a policy update every 3, i.e. 0.6 critic and 0.2 actor updates per
transition (lr 1e-4, batch 256, 400 warm-up steps, buffer 1e6): the default here. The DroQ paper's own
ratio is 20 critic updates and 1 actor update per transition:
    python droq.py --env reacher_goal --n-envs 1 --gradient-steps 20 --policy-delay 20
(33 times the critic updates per transition: far more sample-efficient, and far slower per env step on
a CPU; RESULTS.md compares the two on Reacher). Dropout 0.01 is the DroQ paper's. The per-env
overrides of envs.ENVS apply (on Ant-Dir, lr 1e-3 and an initial entropy weight of 0.1; envs.py says why).

    python droq.py --env ant_dir --tasks 30           # -> data/ant_dir/droq/task_*.npz
"""
import argparse
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import envs
import rl
import sac


class TaskLayerNorm(nn.Module):
    """LayerNorm over the features, with a separate affine transform per network: x [n, B, d]."""

    def __init__(self, n, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, d))
        self.bias = nn.Parameter(torch.zeros(n, 1, d))

    def forward(self, x):
        # The affine in the normalised features' dtype: under bf16 autocast, fp32 weights would make this
        # and its backward slow mixed-dtype kernels. CUDA's autocast would run layer_norm itself in fp32
        # (a CPU's keeps bf16): off for it, the norm stays in x's dtype everywhere (its kernels accumulate
        # in fp32 all the same).
        with torch.autocast(x.device.type, enabled=False):
            y = F.layer_norm(x, x.shape[-1:])
        return torch.addcmul(self.bias.to(y.dtype), y, self.weight.to(y.dtype))


class TaskDropout(nn.Module):
    """Dropout whose masks come from each task's own stream of `rng` (rl.TaskRandom): x [n, B, d], where
    the n networks are len(rng) tasks' equal, consecutive groups (the twin critics: 2 per task)."""

    def __init__(self, p, rng):
        super().__init__()
        self.p, self.rng = p, rng

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = self.rng.rand((len(self.rng), x.numel() // len(self.rng))) >= self.p
        return x * keep.view_as(x) / (1 - self.p)


def dropout_mlp(n, d_in, hidden, d_out, dropout, rng, n_hidden=2):
    """n task-batched Q-networks whose hidden layers are Linear -> Dropout -> LayerNorm -> ReLU."""
    sizes = [d_in] + [hidden] * n_hidden
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [rl.TaskLinear(n, a, b), TaskDropout(dropout, rng), TaskLayerNorm(n, b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, rl.TaskLinear(n, sizes[-1], d_out))


class DroQ(sac.SAC):
    # The networks stay in training mode throughout: dropout is active in the target critics too,
    # as in the DroQ paper's code.
    def __init__(self, *args, dropout=0.01, policy_delay=3, **kwargs):
        self.dropout, self.policy_delay, self.n_updates = dropout, policy_delay, 0
        super().__init__(*args, **kwargs)

    def make_critic(self, n_tasks, obs_dim, act_dim, hidden):
        return sac.TwinQ(n_tasks, obs_dim, act_dim, hidden,
                         mlp=functools.partial(dropout_mlp, dropout=self.dropout, rng=self.rng))

    def policy_q(self, q):
        """The actor climbs the mean of the Q-functions (DroQ's Algorithm 2, as in REDQ), not SAC's
        minimum: the minimum's pessimism is already in the critics' targets."""
        return q.mean(dim=1)

    def update(self, obs, act, rew, next_obs):
        """One critic step on every task; the actor and entropy weight every policy_delay-th call."""
        with envs.autocast(self.log_alpha.device, self.bf16):
            self.update_critic(obs, act, rew, next_obs)
            self.n_updates += 1
            if self.n_updates % self.policy_delay == 0:
                self.update_actor_and_alpha(obs)


def build_parser():
    p = sac.build_parser("droq", __doc__.split("\n")[0])
    p.set_defaults(gradient_steps=3)  # Appendix A
    p.add_argument("--policy-delay", type=envs.positive_int, default=3,
                   help="update the actor and entropy weight once every this many critic updates")
    p.add_argument("--dropout", type=dropout_rate, default=0.01, help="dropout rate in the Q-networks")
    return p


def dropout_rate(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def make_droq(args, n_tasks, obs_dim, act_dim):
    return DroQ(n_tasks, obs_dim, act_dim, hidden=args.hidden, lr=args.lr, gamma=args.gamma, tau=args.tau,
                alpha_init=args.alpha_init, dropout=args.dropout, policy_delay=args.policy_delay,
                bf16=args.bf16, device=args.device)


def main(argv=None):
    rl.main(argv, "droq", build_parser(), make_droq, sac.collect_and_learn)


if __name__ == "__main__":
    main()
