"""Soft Actor-Critic (Haarnoja et al. 2018), written by hand, training many tasks at once.

It generates the learning histories that Algorithm Distillation imitates (paper Section 5.2, Appendix A:
SAC for Reacher-Goal and HalfCheetah-Vel). SAC maximises return + alpha * entropy with
  - a tanh-squashed Gaussian policy  a = tanh(mu(s) + sigma(s) * eps),
  - twin Q-networks and Polyak-averaged target copies (the min of the two curbs over-estimation),
  - the soft target  y = r + gamma * (min_i Q'_i(s', a') - alpha * log pi(a'|s')),  a' ~ pi(.|s'),
  - automatic entropy tuning: alpha is adjusted so that E[-log pi] tracks -act_dim.
Episodes only end by truncation at the fixed horizon, so the target always bootstraps.

All tasks of a run train at once, every network with a leading task axis (rl.py: the machinery the RL
scripts share).

The learning history *is* the replay buffer: every transition is kept in order, [task, env, step],
sampled uniformly for updates and written out at the end as one .npz file per task (rl.HistoryBuffer).

    python sac.py --env reacher_goal --tasks 70          # -> data/reacher_goal/sac/task_*.npz
    python sac.py --env point_goal --tasks 100 --steps 2000
Defaults follow Appendix A (an SB3-style SAC: 5 envs per task, one gradient step per vector step,
lr 1e-4, batch 256, 400 warm-up steps, buffer 1e6, gamma 0.99) with the per-env overrides of envs.ENVS.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import envs
import rl


# ----------------------------------------------------------------------------- the networks

# Bounds of the policy's log-std *before* tanh (SB3's): the floor keeps log pi finite, the cap (std 7.4) keeps
# the samples from piling up at the box's edges. AD's Gaussian head acts in the box itself: ad.HEAD_LOG_STD.
PRE_TANH_LOG_STD = (-20, 2)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy, one per task."""

    def __init__(self, n_tasks, obs_dim, act_dim, hidden):
        super().__init__()
        self.net = rl.task_mlp(n_tasks, obs_dim, hidden, 2 * act_dim)
        self.register_buffer("normal_nodes", rl.normal_quantile_nodes())

    def forward(self, obs):
        mu, log_std = self.net(obs).float().chunk(2, dim=-1)  # fp32 from here on, also under bf16 autocast
        return mu, log_std.clamp(*PRE_TANH_LOG_STD)

    def sample(self, obs, rng):
        """a ~ pi(.|s) with its log-density, by the reparameterisation trick; the noise from each task's
        own stream of `rng` (rl.TaskRandom)."""
        return self.sample_from(*self(obs), rng)

    def sample_from(self, mu, log_std, rng):
        eps = rng.randn(mu.shape)
        u = mu + log_std.exp() * eps
        # log N(u; mu, std) minus log|d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)),
        # the stable form of the change of variables
        log_prob = (-0.5 * eps.square() - log_std - 0.5 * math.log(2 * math.pi)
                    - 2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob

    def squashed_moments(self, mu, log_std):
        """Mean and std of the action tanh(u), u ~ N(mu, std): the policy's own distribution in
        [-1, 1] action space, stored in the histories as a low-noise distillation target."""
        return rl.action_moments(mu, log_std.exp(), torch.tanh, self.normal_nodes)


class TwinQ(nn.Module):
    """Two Q-networks per task, evaluated as one batch of 2 * n_tasks networks. `mlp` builds them
    (n_networks, d_in, hidden, d_out) -> module: DroQ passes one with dropout and layer norm."""

    def __init__(self, n_tasks, obs_dim, act_dim, hidden, mlp=rl.task_mlp):
        super().__init__()
        self.net = mlp(2 * n_tasks, obs_dim + act_dim, hidden, 1)

    def forward(self, obs, act):
        """obs [T, B, obs_dim], act [T, B, act_dim] -> Q [T, 2, B] (fp32, also under bf16 autocast)."""
        T, B, _ = obs.shape
        x = torch.cat([obs, act], -1).unsqueeze(1).expand(T, 2, B, -1).reshape(2 * T, B, -1)
        return self.net(x).float().view(T, 2, B)


# ----------------------------------------------------------------------------- the agent

class SAC(nn.Module):
    """Every task's actor, twin critics, their targets and entropy weight (an nn.Module, so that
    `state_dict` holds all of it). With bf16=True the updates run their matmuls in bfloat16 (autocast:
    the weights, Adam's state and the losses stay fp32), several times faster where the hardware has
    bf16 units (this CPU's AMX, recent GPUs)."""

    def __init__(self, n_tasks, obs_dim, act_dim, hidden=256, lr=1e-4, gamma=0.99, tau=0.005,
                 alpha_init=1.0, bf16=False, device="cpu"):
        super().__init__()
        self.gamma, self.tau, self.bf16 = gamma, tau, bf16
        self.rng = rl.TaskRandom(range(n_tasks), device)  # rl.init_per_task seeds it with the run's task seeds
        self.actor = Actor(n_tasks, obs_dim, act_dim, hidden)
        self.critic = self.make_critic(n_tasks, obs_dim, act_dim, hidden)
        self.critic_target = self.make_critic(n_tasks, obs_dim, act_dim, hidden)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.full((n_tasks, 1), math.log(alpha_init)))
        self.to(device)
        self.target_entropy = -act_dim
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=lr)

    def make_critic(self, n_tasks, obs_dim, act_dim, hidden):  # the one piece DroQ replaces
        return TwinQ(n_tasks, obs_dim, act_dim, hidden)

    @torch.no_grad()
    def act(self, obs):
        """obs [T, E, obs_dim] -> sampled action, and the policy's mean and std in action space."""
        mu, log_std = self.actor(obs)  # one forward pass for the action and the stored moments
        action, _ = self.actor.sample_from(mu, log_std, self.rng)
        return (action, *self.actor.squashed_moments(mu, log_std))

    def update_critic(self, obs, act, rew, next_obs):
        with torch.no_grad():
            next_act, next_log_prob = self.actor.sample(next_obs, self.rng)
            next_q = self.critic_target(next_obs, next_act).min(dim=1).values
            target = rew + self.gamma * (next_q - self.log_alpha.exp() * next_log_prob)
        q = self.critic(obs, act)
        loss = (q - target[:, None]).square().mean(-1).sum()  # per task: MSE of both critics; summed
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        with torch.no_grad():
            for p_target, p in zip(self.critic_target.parameters(), self.critic.parameters()):
                p_target.lerp_(p, self.tau)

    def policy_q(self, q):
        """The value the actor climbs, from the twin critics' [T, 2, B]: SAC takes their minimum."""
        return q.min(dim=1).values

    def update_actor_and_alpha(self, obs):
        action, log_prob = self.actor.sample(obs, self.rng)
        q = self.policy_q(self.critic(obs, action))
        alpha = self.log_alpha.exp().detach()
        actor_loss = (alpha * log_prob - q).mean(-1).sum()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward(inputs=list(self.actor.parameters()))  # no gradient for the critic here
        self.actor_opt.step()
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean(-1).sum()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

    def update(self, obs, act, rew, next_obs):
        """One gradient step on every task's critic, actor and entropy weight."""
        with envs.autocast(self.log_alpha.device, self.bf16):
            self.update_critic(obs, act, rew, next_obs)
            self.update_actor_and_alpha(obs)


# ----------------------------------------------------------------------------- collecting and learning

UNIFORM_STD = 1 / math.sqrt(3)  # std of U(-1, 1): the "policy" of the warm-up steps


def collect_and_learn(agent, vec, n_steps, args, desc, buf=None, start=0, on_episode_end=None):
    """Run the agent on every env of `vec` for n_steps vector steps, learning as it goes (the same loop
    serves SAC and DroQ, whose `update` differs). Every random draw comes from agent.rng, each task's
    from its own stream. Returns the filled HistoryBuffer.

    A run that resumes (expert.py) passes `buf` filled up to vector step `start`, an episode's end, with
    the agent and the envs' random states as they were there; on_episode_end(t) is called once each
    episode's last update is done, t vector steps in: where such a run can be saved."""
    device = args.device
    if buf is None:
        buf = rl.HistoryBuffer(vec.n_tasks, vec.n_envs, n_steps, vec.horizon, vec.obs_dim, vec.act_dim, device)
    warmup = math.ceil(args.warmup / vec.n_envs)  # warm-up counted in transitions per task, like SB3
    shape = (vec.n_tasks, vec.n_envs, vec.act_dim)
    bar = tqdm(range(start, n_steps), initial=start, total=n_steps, desc=desc, unit="step", dynamic_ncols=True,
               mininterval=1.0)
    for t in bar:
        # Every episode starts with a reset here, at its first step rather than right after the previous
        # one's last step: a run saved at an episode's end then holds no half-begun episode. The envs draw
        # from their own numpy streams, so the reset moving past the updates changes no number.
        if t % vec.horizon == 0:
            obs = torch.as_tensor(vec.reset(), device=device)
        if t < warmup:  # uniformly random actions fill the buffer before learning starts
            action = agent.rng.rand(shape) * 2 - 1
            mean, std = torch.zeros(shape, device=device), torch.full(shape, UNIFORM_STD, device=device)
        else:
            action, mean, std = agent.act(obs)
        next_obs, rew, episode_over = vec.step(action.cpu().numpy())
        next_obs = torch.as_tensor(next_obs, device=device)
        buf.add(obs, action, torch.as_tensor(rew, device=device), next_obs, mean, std)
        obs = next_obs
        if t >= warmup:
            for _ in range(args.gradient_steps):
                agent.update(*buf.sample(args.batch_size, args.buffer_size, agent.rng))
        if episode_over:  # show the mean return of the episode that just ended
            last_return = buf.rew[:, :, t + 1 - vec.horizon:t + 1].sum(-1).mean().item()
            bar.set_postfix(ret=f"{last_return:.2f}", refresh=False)
            if on_episode_end is not None:
                on_episode_end(t + 1)
    bar.close()
    return buf


def build_parser(algo, description):
    """The off-policy scripts' command line (sac.py, droq.py): Appendix A's defaults."""
    return add_options(rl.base_parser(algo, description))


def add_options(p):
    """SAC's own options, on any parser (the RL scripts', expert.py's)."""
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--batch-size", type=envs.positive_int, default=256, help="replay minibatch per task")
    p.add_argument("--warmup", type=int, default=400, help="random-action steps per task before learning")
    p.add_argument("--buffer-size", type=envs.positive_int, default=1_000_000, help="replay buffer per task")
    p.add_argument("--tau", type=float, default=0.005, help="Polyak averaging rate of the target critics")
    p.add_argument("--alpha-init", type=float, default=1.0, help="initial entropy weight")
    p.add_argument("--hidden", type=envs.positive_int, default=256, help="units in each of the 2 hidden layers")
    p.add_argument("--gradient-steps", type=envs.positive_int, default=1, help="updates per vector env step")
    return p


def make_sac(args, n_tasks, obs_dim, act_dim):
    return SAC(n_tasks, obs_dim, act_dim, hidden=args.hidden, lr=args.lr, gamma=args.gamma, tau=args.tau,
               alpha_init=args.alpha_init, bf16=args.bf16, device=args.device)


def main(argv=None):
    rl.main(argv, "sac", build_parser("sac", __doc__.split("\n")[0]), make_sac, collect_and_learn)


if __name__ == "__main__":
    main()
