"""Proximal Policy Optimization (Schulman et al. 2017), written by hand, training many tasks at once.

It generates the learning histories that Algorithm Distillation imitates on Pusher-Goal (paper Section
5.2, Appendix A): the paper picked PPO there for its stability (the return rises nearly monotonically,
a smooth curriculum for AD to distil) at the price of sample efficiency. PPO alternates
  - a rollout: every env of every task runs the current Gaussian policy for --rollout-steps steps
    (the executed action is the Gaussian sample clipped to [-1, 1]);
  - generalised advantage estimation (GAE): A_t = sum_k (gamma lambda)^k delta_{t+k}, with the TD errors
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t); episodes end only by truncation at the fixed horizon, so
    the last step bootstraps from V(final obs) and the sum restarts at the next episode;
  - --epochs passes over the rollout in minibatches, minimising the clipped surrogate
    -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi(a|s) / pi_old(a|s), plus vf_coef x the value
    MSE minus ent_coef x the policy entropy, with per-minibatch advantage normalisation and gradient
    clipping.
Observations are standardised with running per-task statistics (as SB3's VecNormalize, which the RL
zoo uses for MuJoCo): the joint velocities are orders of magnitude larger than the angles.

Many tasks at once (rl.py): every weight carries a leading task axis (rl.task_mlp), the loss is
the sum of the per-task losses, one Adam steps them all, and the gradient norm is clipped per task (a
global clip would couple the tasks). The run's history (rl.HistoryBuffer) holds the rollouts; each
update reads the last one.

    python ppo.py --env pusher_goal --tasks 35        # -> data/pusher_goal/ppo/task_*.npz
    python ppo.py --env point_goal --tasks 20         # CPU demo (overrides in envs.ENVS)
Defaults follow Appendix A (SB3-style: 5 envs, 500 steps per env per rollout, 10 epochs, batch 64,
lr 1e-4, gamma 0.99, lambda 0.95, clip 0.2, value coef 0.5, entropy coef 5e-3; SB3's 2 x 64 tanh
units and gradient clip 0.5), with the per-env overrides of envs.ENVS.
"""
import argparse

import torch
import torch.nn as nn
from torch.distributions import Normal
from tqdm import tqdm

import envs
import rl


# ----------------------------------------------------------------------------- the pieces of PPO

def clip_action(u):
    """The env executes the Gaussian sample clipped to the action space (as SB3 does)."""
    return u.clamp(-1, 1)


def gae(rew, value, next_value, episode_end, gamma, lam):
    """Generalised advantage estimates over the last axis (time) of [..., L] tensors. next_value is
    V of the observation that followed each step (the bootstrap: episodes are only ever truncated);
    episode_end marks the steps after which a new episode starts, where the sum restarts."""
    delta = rew + gamma * next_value - value
    adv = torch.zeros_like(rew)
    running = torch.zeros_like(rew[..., 0])
    for t in reversed(range(rew.shape[-1])):
        running = delta[..., t] + gamma * lam * running * (~episode_end[t])
        adv[..., t] = running
    return adv


def clipped_surrogate(log_prob, old_log_prob, adv, clip):
    """PPO's policy loss per task: -E[min(rho A, clip(rho, 1 - clip, 1 + clip) A)] over the last axis."""
    ratio = (log_prob - old_log_prob).exp()
    return -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean(-1)


def clip_grad_norm_per_task(params, max_norm):
    """Scale each task's gradient (slice i of every parameter's leading axis) to norm <= max_norm."""
    # summed parameter by parameter: a sum over a stacked [params, tasks] axis would add in an order that
    # depends on the number of tasks, and a task's history on the tasks it trains beside
    norms = sum(p.grad.flatten(1).square().sum(1) for p in params).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1)
    for p in params:
        p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))


class RunningNorm(nn.Module):
    """Per-task running mean and variance of the observations (Chan et al.'s parallel update)."""

    def __init__(self, n_tasks, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_tasks, 1, dim))
        self.register_buffer("var", torch.ones(n_tasks, 1, dim))
        # one count for all tasks: they all see the same number of steps. SB3's epsilon: the first
        # batch sets the statistics
        self.register_buffer("count", torch.tensor(1e-4))

    def update(self, x):
        """x [n_tasks, N, dim]: fold in N more observations per task."""
        mean, var, n = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True), x.shape[1]
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta.square() * self.count * n / total) / total
        self.mean = self.mean + delta * n / total
        self.count = total

    def forward(self, x):
        return ((x - self.mean) / (self.var + 1e-8).sqrt()).clamp(-10, 10)


# ----------------------------------------------------------------------------- the agent

class PPO(nn.Module):
    """A Gaussian policy with a state-independent std and a value network, one pair per task."""

    def __init__(self, n_tasks, obs_dim, act_dim, hidden=64, lr=1e-4, gamma=0.99, gae_lambda=0.95, clip=0.2,
                 vf_coef=0.5, ent_coef=5e-3, epochs=10, batch_size=64, max_grad_norm=0.5, norm_reward=False,
                 bf16=False, device="cpu"):
        super().__init__()
        self.bf16 = bf16
        self.rng = rl.TaskRandom(range(n_tasks), device)  # rl.init_per_task seeds it with the run's task seeds
        self.gamma, self.gae_lambda, self.clip, self.vf_coef, self.ent_coef = gamma, gae_lambda, clip, vf_coef, ent_coef
        self.epochs, self.batch_size, self.max_grad_norm = epochs, batch_size, max_grad_norm
        self.obs_norm = RunningNorm(n_tasks, obs_dim)
        # SB3 VecNormalize's reward scaling, when asked: rewards divided by the running std of each task's
        # discounted return (the running return itself is carried across rollouts, reset at episode ends)
        self.return_norm = RunningNorm(n_tasks, 1) if norm_reward else None
        self.running_return = None
        self.actor = rl.task_mlp(n_tasks, obs_dim, hidden, act_dim, activation=nn.Tanh)
        with torch.no_grad():  # start near the zero action (CleanRL/SB3 scale the last layer by 0.01)
            self.actor[-1].weight.mul_(0.01)
            self.actor[-1].bias.zero_()
        self.log_std = nn.Parameter(torch.zeros(n_tasks, 1, act_dim))
        self.critic = rl.task_mlp(n_tasks, obs_dim, hidden, 1, activation=nn.Tanh)
        self.register_buffer("normal_nodes", rl.normal_quantile_nodes())
        self.to(device)
        self.opt = torch.optim.Adam(self.parameters(), lr=lr, eps=1e-5)

    def dist(self, obs):
        """obs [T, B, obs_dim] (raw) -> the policy's Normal over the pre-clip action, [T, B, act_dim]."""
        mu = self.actor(self.obs_norm(obs)).float()  # fp32 from here on, also under bf16 autocast
        return Normal(mu, self.log_std.exp().expand_as(mu))

    def value(self, obs):
        return self.critic(self.obs_norm(obs)).float().squeeze(-1)

    @torch.no_grad()
    def act(self, obs):
        """obs [T, E, obs_dim] -> the Gaussian sample u (the env executes clip(u, -1, 1)), its log-density
        under the policy that drew it (the behaviour policy of PPO's ratio), and the mean and std of the
        executed action, clip(u, -1, 1), for the history."""
        pi = self.dist(obs)
        u = pi.mean + pi.stddev * self.rng.randn(pi.mean.shape)  # each task's noise from its own stream
        return u, pi.log_prob(u).sum(-1), *rl.action_moments(pi.mean, pi.stddev, clip_action, self.normal_nodes)

    def update(self, obs, raw_act, old_log_prob, rew, next_obs, episode_end):
        """One PPO update from a rollout: tensors [T, E, L, ...]; episode_end [L] (bool). old_log_prob is
        log pi_old(u|s) as computed when acting: the observation statistics move below, so recomputing it
        now would give another policy than the one that drew the actions."""
        with envs.autocast(self.log_std.device, self.bf16):  # bf16 matmuls when asked
            T, E, L = rew.shape
            obs, raw_act, next_obs = obs.flatten(1, 2), raw_act.flatten(1, 2), next_obs.flatten(1, 2)  # [T, E L, .]
            old_log_prob = old_log_prob.flatten(1, 2)
            self.obs_norm.update(obs)
            if self.return_norm is not None:
                rew = self.scale_rewards(rew, episode_end)
            with torch.no_grad():  # the values before any step on this rollout
                value, next_value = self.value(obs).view(T, E, L), self.value(next_obs).view(T, E, L)
                adv = gae(rew, value, next_value, episode_end, self.gamma, self.gae_lambda)
                ret, adv = (adv + value).flatten(1), adv.flatten(1)
            n, task = adv.shape[1], torch.arange(T, device=adv.device)[:, None]
            for _ in range(self.epochs):
                order = self.rng.rand((T, n)).argsort(1)  # each task shuffles its own rollout, from its own stream
                for start in range(0, n, self.batch_size):
                    i = order[:, start:start + self.batch_size]
                    self.step(obs[task, i], raw_act[task, i], old_log_prob[task, i], adv[task, i], ret[task, i])

    def scale_rewards(self, rew, episode_end):
        """rew [T, E, L] / the running std of the discounted return, clipped to [-10, 10] (SB3's defaults)."""
        returns = torch.empty_like(rew)
        running = torch.zeros_like(rew[..., 0]) if self.running_return is None else self.running_return
        for t in range(rew.shape[-1]):
            running = running * self.gamma + rew[..., t]
            returns[..., t] = running
            running = running * (~episode_end[t])
        self.running_return = running
        self.return_norm.update(returns.flatten(1)[..., None])
        return (rew / (self.return_norm.var + 1e-8).sqrt()).clamp(-10, 10)  # var [T, 1, 1] broadcasts

    def step(self, obs, raw_act, old_log_prob, adv, ret):
        """One gradient step on a minibatch [T, B, ...] of every task."""
        pi = self.dist(obs)
        # (the population std: a last minibatch of one sample gets advantage 0, not NaN)
        adv = (adv - adv.mean(-1, keepdim=True)) / (adv.std(-1, keepdim=True, correction=0) + 1e-8)
        policy_loss = clipped_surrogate(pi.log_prob(raw_act).sum(-1), old_log_prob, adv, self.clip)
        value_loss = (self.value(obs) - ret).square().mean(-1)
        entropy = pi.entropy().sum(-1).mean(-1)
        loss = (policy_loss + self.vf_coef * value_loss - self.ent_coef * entropy).sum()  # summed over tasks
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_per_task(list(self.parameters()), self.max_grad_norm)
        self.opt.step()


# ----------------------------------------------------------------------------- rollouts and updates

def collect_and_learn(agent, vec, n_steps, args, desc):
    """Run the agent on every env of `vec` for n_steps vector steps, updating after each full rollout
    of --rollout-steps steps. Returns the filled rl.HistoryBuffer (the history, in order)."""
    device = args.device
    buf = rl.HistoryBuffer(vec.n_tasks, vec.n_envs, n_steps, vec.horizon, vec.obs_dim, vec.act_dim, device)
    raw_act = torch.zeros(vec.n_tasks, vec.n_envs, args.rollout_steps, vec.act_dim, device=device)
    log_prob = torch.zeros(vec.n_tasks, vec.n_envs, args.rollout_steps, device=device)
    task = torch.arange(vec.n_tasks, device=device)[:, None, None]
    env = torch.arange(vec.n_envs, device=device)[None, :, None]
    obs = torch.as_tensor(vec.reset(), device=device)
    start = 0  # first step of the current rollout
    bar = tqdm(range(n_steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
    for t in bar:
        raw, raw_log_prob, mean, std = agent.act(obs)
        action = clip_action(raw)
        next_obs, rew, episode_over = vec.step(action.cpu().numpy())
        next_obs = torch.as_tensor(next_obs, device=device)
        buf.add(obs, action, torch.as_tensor(rew, device=device), next_obs, mean, std)
        raw_act[:, :, t - start], log_prob[:, :, t - start] = raw, raw_log_prob
        obs = torch.as_tensor(vec.reset(), device=device) if episode_over else next_obs
        if t + 1 - start == args.rollout_steps:
            steps = torch.arange(start, t + 1, device=device)
            agent.update(buf.obs[:, :, start:t + 1], raw_act, log_prob, buf.rew[:, :, start:t + 1],
                         buf.next_obs(task, env, steps[None, None]), (steps + 1) % vec.horizon == 0)
            start = t + 1
        if episode_over:  # show the mean return of the episode that just ended
            last_return = buf.rew[:, :, t + 1 - vec.horizon:t + 1].sum(-1).mean().item()
            bar.set_postfix(ret=f"{last_return:.2f}", refresh=False)
    bar.close()
    return buf


def build_parser():
    p = rl.base_parser("ppo", __doc__.split("\n")[0])
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--rollout-steps", type=envs.positive_int, default=500, help="steps per env per rollout")
    p.add_argument("--epochs", type=envs.positive_int, default=10, help="passes over each rollout")
    p.add_argument("--batch-size", type=envs.positive_int, default=64, help="minibatch size per task")
    p.add_argument("--gae-lambda", type=float, default=0.95, help="lambda of GAE")
    p.add_argument("--clip", type=float, default=0.2, help="epsilon of the clipped surrogate")
    p.add_argument("--vf-coef", type=float, default=0.5, help="weight of the value loss")
    p.add_argument("--ent-coef", type=float, default=5e-3, help="weight of the entropy bonus")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="gradient clipping, per task")
    p.add_argument("--hidden", type=envs.positive_int, default=64, help="units in each of the 2 hidden layers")
    p.add_argument("--norm-reward", action=argparse.BooleanOptionalAction, default=False,
                   help="scale each task's rewards by the running std of its discounted return (SB3 "
                        "VecNormalize); the history keeps the true rewards (on for pusher_goal: envs.ENVS)")
    # PPO's 64-sample minibatches of 64-unit nets are too small for bf16 matmuls to pay for their casts
    p.set_defaults(dtype="fp32")
    return p


def make_ppo(args, n_tasks, obs_dim, act_dim):
    return PPO(n_tasks, obs_dim, act_dim, hidden=args.hidden, lr=args.lr, gamma=args.gamma,
               gae_lambda=args.gae_lambda, clip=args.clip, vf_coef=args.vf_coef, ent_coef=args.ent_coef,
               epochs=args.epochs, batch_size=args.batch_size, max_grad_norm=args.max_grad_norm,
               norm_reward=args.norm_reward, bf16=args.bf16, device=args.device)


def main(argv=None):
    rl.main(argv, "ppo", build_parser(), make_ppo, collect_and_learn)


if __name__ == "__main__":
    main()
