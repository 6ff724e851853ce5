"""Meta-Q-Learning (Fakoor, Chaudhari, Soatto, Smola, ICLR 2020): the online meta-RL baseline that the AD
paper compares with (Section 5, "How does AD compare to other Meta-RL approaches?", Figure 1).

MQL is TD3 (Fujimoto et al. 2018) with a context, meta-trained on many tasks at once, plus a test-time
adaptation by off-policy updates (MQL Section 4, Algorithm 1):
  - context: a GRU reads the last H transitions (obs, act, rew) of the current episode (zero-padded at its
    start); its output z is fed beside the observation to the actor and to the twin critics. z is what
    tells the tasks apart: the task itself is hidden. MQL's code gives the actor and the critic each a GRU
    of its own; here one GRU serves both, trained by the critics' loss (the actor reads z detached), so a
    batch needs one GRU pass instead of two (the GRU is most of an update's cost) and z is learnt as a
    value-predictive summary of the episode so far.
  - meta-training (MQL eq. 7): ONE actor and ONE critic, trained by plain TD3 on batches drawn from the
    replay of every training task (no MAML-style inner loop): twin critics, target policy smoothing
    a' = clip(mu'(s') + clip(N(0, sigma), -c, c), -1, 1), a delayed actor update (every d-th critic
    update, with the Polyak update of the targets), exploration a = mu(s) + N(0, sigma_expl).
  - adaptation to a new task (MQL Section 4.2, eq. 18): collect episodes on it (D_new); train a logistic
    classifier to tell D_new's context features from the meta-training replay's (balanced classes);
    then, starting from the meta-trained weights theta_meta and fresh optimisers,
      (i)  TD3 updates on D_new alone,
      (ii) TD3 updates on replay batches, each transition weighted by the propensity score
           beta(x) = p(new | x) / p(replay | x) (the classifier's odds, its logit clipped at --beta-clip,
           weights under 0.1 set to 0 as in the MQL code), plus the proximal term
           lambda * ||theta - theta_meta||^2 with lambda = 1 - ESS, where ESS = (sum beta)^2 / (n sum beta^2)
           is the normalised effective sample size: replay data like the new task (ESS near 1) may move the
           weights freely; data unlike it keeps them near theta_meta.

Evaluation, as evaluate.py's baseline format asks: on each test task x seed, N consecutive episodes (N = the
AD stream length); episode 1 runs theta_meta (its context adapts within the episode); before episode i > 1
the weights are adapted afresh from theta_meta on the i - 1 episodes collected so far. All test tasks x
seeds adapt at once: each stream gets its own copy of the nets, built from the project's task-batched
layers (rl.TaskLinear), so one batched update adapts all of them. Writes `results.json` (evaluate.py
scores it: `python evaluate.py out/point_goal/mql`) and `meta.pt` (the meta-trained weights).

    python mql.py --env point_goal --seed 0 --threads 1          # -> out/point_goal/mql/results.json
    python mql.py --env point_goal --seed 1 --out out/point_goal/mql_s1

Defaults are the MQL paper's / code's: lr 3e-4, batch 256, gamma 0.99, tau 0.005, target noise 0.3 clipped
at 0.5, actor every 2 updates, exploration noise 0.2, 300x300 nets, 30-unit GRU, history 30, 0.5 TD3 updates
per env transition (MQL's code runs 500 updates per 5 collected 200-step episodes once its replay holds 1e5
transitions), and for the adaptation 10 updates on D_new, 100 on the replay with 5x larger batches, fresh
Adams at Adam's default lr 1e-3 (--adapt-lr), logistic regression C = 0.5, beta clip 1. On a CPU, CPU_SCALE
lowers some of them for an env (stated there, with why; printed when in force); a flag given on the command
line always wins. The budget is set in env steps per task (--steps, default: as many as AD's data holds per
task) so that MQL sees as many online transitions as the SAC that made AD's data; the update budget that
follows from it (TD3 updates in all) is printed beside it and written to results.json. MQL itself ran
millions of steps per environment.
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import ad
import envs
import rl
import sac

# Per-env reductions of the defaults, in force on a CPU only, so that a run takes about ten minutes on one core
# (the reference's 0.5 updates per transition would be 2e5 updates for point_goal's 4e5 env steps and
# millions for reacher_goal's, at 5-15 ms an update there: hours to days). What each trades:
#   updates_per_transition  the largest ratio that fits that time: fewer updates, not fewer env steps;
#   hidden 64 / 128         sac.py's width on point_goal, instead of 300;
#   history 5 / 10          the GRU's cost grows linearly in H; a few (position, reward) pairs locate a goal;
#   lr 1e-3                 TD3's own: MQL's 3e-4 suits its millions of updates, not tens of thousands;
#   replay_updates 40, sample_mult 1: the adaptation (every test stream at once, before each of the 9 or 19
#                           later episodes) on 40 batches of 256 instead of 100 of 5 x 256 replay transitions.
CPU_SCALE = {
    "point_goal": dict(hidden=64, history=5, lr=1e-3, updates_per_transition=0.1, replay_updates=40, sample_mult=1),
    "reacher_goal": dict(hidden=128, history=10, lr=1e-3, updates_per_transition=0.015, replay_updates=40,
                         sample_mult=1),
}


# ----------------------------------------------------------------------------- the context encoder

class ContextGRU(nn.Module):
    """n independent GRUs (PyTorch's gate equations) over a window of transitions:
    x [n, B, H, d_in] -> the final hidden state z [n, B, d_hidden]. Task-batched (rl.TaskLinear), so the
    copies adapted on different test tasks run as one."""

    def __init__(self, n, d_in, d_hidden):
        super().__init__()
        self.input_gates = rl.TaskLinear(n, d_in, 3 * d_hidden)
        self.hidden_gates = rl.TaskLinear(n, d_hidden, 3 * d_hidden)
        self.d_hidden = d_hidden

    def forward(self, x):
        n, B, H, _ = x.shape
        gx = self.input_gates(x.reshape(n, B * H, -1)).view(n, B, H, -1)  # all input projections at once
        h = x.new_zeros(n, B, self.d_hidden)
        for t in range(H):
            x_r, x_z, x_n = gx[:, :, t].chunk(3, -1)
            h_r, h_z, h_n = self.hidden_gates(h).chunk(3, -1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            h = torch.lerp(torch.tanh(x_n + r * h_n), h, z)  # (1 - z) * candidate + z * h
        return h


# ----------------------------------------------------------------------------- TD3 with a context

NETS = ("encoder", "actor", "critic")  # each with a Polyak target copy


class TD3:
    """TD3 over n copies of the nets (n = 1 in meta-training: one shared policy for all tasks; n = test
    streams in adaptation): a context GRU z = encoder(window), a deterministic actor mu([s, z]) in [-1, 1]
    and twin critics Q([s, z], a) (sac.TwinQ). The GRU is trained by the critics' loss (the actor reads
    its z detached), so one GRU pass per batch serves both, and one target GRU pass both targets.
    Losses are summed over copies, so each copy gets its own gradient and (Adam being element-wise) its
    own Adam. `weight` [n, B] reweights transitions (MQL's beta); `prox` [n] scales each copy's
    ||theta - theta_meta||^2 (MQL's lambda)."""

    def __init__(self, n, obs_dim, act_dim, args):
        self.args = args
        state_dim = obs_dim + args.context_hidden
        self.encoder = ContextGRU(n, obs_dim + act_dim + 1, args.context_hidden).to(args.device)
        self.actor = nn.Sequential(rl.task_mlp(n, state_dim, args.hidden, act_dim), nn.Tanh()).to(args.device)
        self.critic = sac.TwinQ(n, state_dim, act_dim, args.hidden).to(args.device)
        for name in NETS:
            target = copy.deepcopy(getattr(self, name)).requires_grad_(False)
            setattr(self, name + "_target", target)
        self.reset_optimizers(args.lr)
        self.anchor = None  # theta_meta's (actor, encoder + critic) parameters while adapting
        self.n_updates = 0

    def critic_parameters(self):
        return [*self.encoder.parameters(), *self.critic.parameters()]

    def reset_optimizers(self, lr):
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic_parameters(), lr=lr)

    def act(self, obs, context):
        """mu([s, z]) for obs [n, B, obs_dim] and contexts [n, B, H, d] (no gradient)."""
        with torch.no_grad():
            return self.actor(torch.cat([obs, self.encoder(context)], -1))

    @torch.no_grad()
    def target_action(self, next_state):
        """Target policy smoothing (TD3 eq. 15): clipped Gaussian noise on the target actor's action."""
        action = self.actor_target(next_state)
        noise = (torch.randn_like(action) * self.args.policy_noise).clamp(-self.args.noise_clip, self.args.noise_clip)
        return (action + noise).clamp(-1, 1)

    def update(self, batch, weight=None, prox=None):
        """One critic (and GRU) update; every policy_freq-th call also one actor update and the Polyak
        update of every target (TD3's delayed policy update)."""
        obs, act, rew, next_obs, context, next_context = batch
        weight = torch.ones_like(rew) if weight is None else weight
        with torch.no_grad():  # episodes end by truncation only: always bootstrap
            next_state = torch.cat([next_obs, self.encoder_target(next_context)], -1)
            next_q = self.critic_target(next_state, self.target_action(next_state))
            target = rew + self.args.gamma * next_q.min(dim=1).values
        state = torch.cat([obs, self.encoder(context)], -1)
        critic_loss = (weight[:, None] * (self.critic(state, act) - target[:, None]).square()).mean(-1).sum()
        critic_loss = critic_loss + self.proximal(self.critic_parameters(), 1, prox)
        self.step(self.critic_opt, critic_loss, self.critic_parameters())
        if self.n_updates % self.args.policy_freq == 0:
            state = state.detach()
            actor_loss = -(weight * self.critic(state, self.actor(state))[:, 0]).mean(-1).sum()
            actor_loss = actor_loss + self.proximal(list(self.actor.parameters()), 0, prox)
            self.step(self.actor_opt, actor_loss, list(self.actor.parameters()))
            with torch.no_grad():
                for name in NETS:
                    for p_target, p in zip(getattr(self, name + "_target").parameters(),
                                           getattr(self, name).parameters()):
                        p_target.lerp_(p, self.args.tau)
        self.n_updates += 1

    @staticmethod
    def step(optimizer, loss, params):
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=params)  # the actor's loss leaves the critic's gradient alone
        optimizer.step()

    def proximal(self, params, which, prox):
        """sum over copies of prox_i * ||theta_i - theta_meta||^2 (0 outside adaptation)."""
        if prox is None:
            return 0.0
        # every parameter's leading axis holds the copies (TwinQ: 2 networks per copy, contiguous)
        dist = sum((p - p0).square().reshape(prox.shape[0], -1).sum(-1) for p, p0 in zip(params, self.anchor[which]))
        return (prox * dist).sum()

    def copies(self, n):
        """A TD3 with n copies of this one's (single) nets, fresh optimisers at --adapt-lr (as MQL's
        adaptation starts) and theta_meta kept as their proximal anchor."""
        agent = copy.deepcopy(self)
        for name in NETS:
            for suffix in ("", "_target"):
                for p in getattr(agent, name + suffix).parameters():
                    p.data = p.data.repeat(n, *([1] * (p.dim() - 1)))
        agent.anchor = ([p.detach().clone() for p in agent.actor.parameters()],
                        [p.detach().clone() for p in agent.critic_parameters()])
        agent.reset_optimizers(self.args.adapt_lr)
        agent.n_updates = 0
        return agent


# ----------------------------------------------------------------------------- transitions and contexts

def window(buf, task, env, start, end, history):
    """The `history` transitions (obs, act, rew) of steps [end - history, end) of a rl.HistoryBuffer,
    zero where a step lies before `start`, the first step of its episode: [..., history, obs + act + 1].
    The index tensors (task, env, start, end) broadcast."""
    steps = end[..., None] - history + torch.arange(history, device=end.device)
    keep = (steps >= start[..., None])[..., None]
    task, env, steps = task[..., None], env[..., None], steps.clamp(min=0)
    x = torch.cat([buf.obs[task, env, steps], buf.act[task, env, steps], buf.rew[task, env, steps][..., None]], -1)
    return x * keep


def transitions(buf, task, env, t, history):
    """TD3's batch for steps t: obs, act, rew, next_obs, and the contexts of obs (the transitions before t)
    and of next_obs (the same window one step on: it holds transition t, still inside t's episode)."""
    start = t - t % buf.horizon
    return (buf.obs[task, env, t], buf.act[task, env, t], buf.rew[task, env, t], buf.next_obs(task, env, t),
            window(buf, task, env, start, t, history), window(buf, task, env, start, t + 1, history))


def sample(buf, n, batch_size, history):
    """n x batch_size transitions drawn uniformly from every task, env and step of the buffer: [n, B, ...]."""
    T, E = buf.obs.shape[:2]
    device = buf.obs.device
    index = [torch.randint(high, (n, batch_size), device=device) for high in (T, E, buf.n)]
    return transitions(buf, *index, history)


def add(buf, obs, action, rew, next_obs):
    buf.add(obs, action, rew, next_obs, action, torch.zeros_like(action))  # TD3's policy is deterministic


# ----------------------------------------------------------------------------- meta-training

def updates_due(transitions, ratio):
    """TD3 updates owed after `transitions` post-burn-in env transitions (0 before any): floor(n x ratio),
    with a hair of slack so that 0.1 x 30 is 3, not float's 2.9999."""
    return max(0, math.floor(transitions * ratio + 1e-9))


def meta_train(args, tasks):
    """Multi-task TD3 (MQL eq. 7) on all training tasks at once: one vector step = one transition per
    task x env. After the burn-in, TD3 updates on batches from every task's replay keep pace with the
    transitions: after n of them, floor(n x updates_per_transition) updates in all (so a ratio under
    1 / (tasks x envs) still updates, every few vector steps). Returns the agent (one copy: theta_meta)
    and the replay buffer."""
    vec = envs.MultiTaskVecEnv(args.env, tasks, args.n_envs, seed=args.seed)
    T, E, H = vec.n_tasks, vec.n_envs, args.history
    n_steps = args.steps // (E * vec.horizon) * vec.horizon
    agent = TD3(1, vec.obs_dim, vec.act_dim, args)
    buf = rl.HistoryBuffer(T, E, n_steps, vec.horizon, vec.obs_dim, vec.act_dim, args.device)
    task = torch.arange(T, device=args.device)[:, None].expand(T, E)
    env = torch.arange(E, device=args.device)[None].expand(T, E)
    burn_in = math.ceil(args.burn_in / (T * E))  # MQL's burn-in counts random steps over all tasks
    obs = torch.as_tensor(vec.reset(), device=args.device)
    bar = tqdm(range(n_steps), desc="meta-training", unit="step", dynamic_ncols=True, mininterval=1.0)
    for t in bar:
        if t < burn_in:
            action = torch.rand(T, E, vec.act_dim, device=args.device) * 2 - 1
        else:
            now = torch.full((T, E), t, device=args.device)
            context = window(buf, task, env, now - t % vec.horizon, now, H)
            action = agent.act(obs.reshape(1, T * E, -1), context.reshape(1, T * E, H, -1)).view(T, E, -1)
            action = (action + args.expl_noise * torch.randn_like(action)).clamp(-1, 1)
        next_obs, rew, episode_over = vec.step(action.cpu().numpy())
        next_obs = torch.as_tensor(next_obs, device=args.device)
        add(buf, obs, action, torch.as_tensor(rew, device=args.device), next_obs)
        obs = torch.as_tensor(vec.reset(), device=args.device) if episode_over else next_obs
        due = updates_due((t + 1 - burn_in) * T * E, args.updates_per_transition)
        while agent.n_updates < due:
            agent.update(sample(buf, 1, args.batch_size, H))
        if episode_over:
            bar.set_postfix(ret=f"{buf.rew[:, :, t + 1 - vec.horizon:t + 1].sum(-1).mean():.2f}", refresh=False)
    bar.close()
    return agent, buf


# ----------------------------------------------------------------------------- adaptation (MQL Section 4.2)

def fit_logistic(positive, negative, C, max_iter=200):
    """n logistic regressions at once, p(positive | x) = sigmoid(x . w + b), each minimising sklearn's
    LogisticRegression objective (MQL's classifier): C * sum of log-losses + ||w||^2 / 2.
    positive [n, P, D], negative [n, Q, D] -> w [n, D], b [n]."""
    x = torch.cat([positive, negative], 1)
    y = torch.cat([torch.ones(positive.shape[:2]), torch.zeros(negative.shape[:2])], 1).to(x)
    w = torch.zeros(x.shape[0], x.shape[2], device=x.device, requires_grad=True)
    b = torch.zeros(x.shape[0], device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective():  # a sum of independent convex problems: its minimum is each one's minimum
        optimizer.zero_grad()
        logits = torch.baddbmm(b[:, None, None], x, w[:, :, None]).squeeze(-1)
        loss = C * nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") + w.square().sum() / 2
        loss.backward()
        return loss
    optimizer.step(objective)
    return w.detach(), b.detach()


def propensity(features, w, b, beta_clip):
    """beta(x) = p(new | x) / p(replay | x) = exp(logit), the logit clipped at beta_clip and weights under
    0.1 set to 0 (as the MQL code does, for stability). features [n, B, D] -> [n, B]."""
    logit = torch.baddbmm(b[:, None, None], features, w[:, :, None]).squeeze(-1)
    beta = logit.clamp(max=beta_clip).exp()
    return torch.where(beta < 0.1, torch.zeros_like(beta), beta)


def effective_sample_size(beta):
    """Normalised ESS per row, (sum beta)^2 / (n sum beta^2) in [0, 1] (0 when every weight is 0)."""
    return beta.sum(-1).square() / (beta.shape[-1] * beta.square().sum(-1)).clamp_min(1e-12)


def context_features(meta, context):
    """theta_meta's context z for contexts [n, B, H, d]: the classifier's features x."""
    n, B = context.shape[:2]
    with torch.no_grad():
        return meta.encoder(context.reshape(1, n * B, *context.shape[2:])).view(n, B, -1)


def adapt(meta, new_buf, replay, args):
    """MQL's adaptation of theta_meta to each stream's new task from the transitions in new_buf
    (one task per stream, env 0): a classifier (D_new vs replay), `snap_updates` TD3 updates on D_new,
    then `replay_updates` on beta-weighted replay batches with the proximal term. -> the adapted copies."""
    S, n, H = new_buf.obs.shape[0], new_buf.n, args.history
    device = new_buf.obs.device
    steps = torch.arange(n, device=device).expand(S, n)
    new_batch = transitions(new_buf, torch.arange(S, device=device)[:, None], torch.zeros_like(steps), steps, H)
    negative = sample(replay, S, n, H)[4]  # as many replay transitions as D_new holds: balanced classes
    w, b = fit_logistic(context_features(meta, new_batch[4]), context_features(meta, negative), args.logistic_c)
    agent = meta.copies(S)
    for _ in range(args.snap_updates):
        agent.update(new_batch)
    for _ in range(args.replay_updates):
        batch = sample(replay, S, args.sample_mult * args.batch_size, H)
        beta = propensity(context_features(meta, batch[4]), w, b, args.beta_clip)
        agent.update(batch, weight=beta, prox=1 - effective_sample_size(beta))
    return agent


def evaluate(meta, replay, args, tasks):
    """N consecutive episodes on each test task x seed, all streams at once; before episode i > 1 the
    nets are adapted afresh from theta_meta on the i - 1 episodes so far. -> returns [tasks, seeds, N]."""
    vec = envs.MultiTaskVecEnv(args.env, tasks, args.test_seeds, seed=args.test_seed)
    S, H, device = vec.n_tasks * vec.n_envs, args.history, args.device
    new_buf = rl.HistoryBuffer(S, 1, args.episodes * vec.horizon, vec.horizon, vec.obs_dim, vec.act_dim, device)
    stream, env0 = torch.arange(S, device=device)[:, None], torch.zeros(S, 1, dtype=torch.long, device=device)
    agent = meta.copies(S)
    for episode in tqdm(range(args.episodes), desc="test tasks", unit="episode", dynamic_ncols=True):
        if episode:
            agent = adapt(meta, new_buf, replay, args)
        obs = torch.as_tensor(vec.reset(), device=device).reshape(S, 1, -1)
        for t in range(vec.horizon):
            now = torch.full((S, 1), new_buf.n, device=device)
            action = agent.act(obs, window(new_buf, stream, env0, now - t, now, H))
            next_obs, rew, _ = vec.step(action.reshape(vec.n_tasks, vec.n_envs, -1).cpu().numpy())
            next_obs = torch.as_tensor(next_obs, device=device).reshape(S, 1, -1)
            add(new_buf, obs, action, torch.as_tensor(rew, device=device).reshape(S, 1), next_obs)
            obs = next_obs
    return new_buf.rew.reshape(vec.n_tasks, vec.n_envs, args.episodes, vec.horizon).sum(-1).cpu().numpy()


# ----------------------------------------------------------------------------- the run

def run(args):
    settings = envs.env_settings(args.env)
    data_dir = args.data or os.path.join("data", args.env, settings.algo)
    data = ad.load_histories(data_dir, args.env, args.k)  # the AD data MQL is compared with
    curve, final = ad.source_curve(data["returns"], args.k)
    args.episodes = args.episodes or data["obs"].shape[2]  # the AD stream length
    source_steps = data["returns"][0].size * settings.horizon  # per task, in the AD data
    args.steps = args.steps or source_steps
    if args.steps < args.n_envs * settings.horizon:
        raise ValueError(f"--steps {args.steps} is less than one episode per env")
    if args.updates_per_transition <= 0 or args.adapt_lr <= 0:
        raise ValueError(f"--updates-per-transition ({args.updates_per_transition}) and --adapt-lr "
                         f"({args.adapt_lr}) must be positive")
    envs.prepare_out_dir(args.out)
    torch.manual_seed(args.seed)
    train_tasks = envs.sample_tasks(args.env, args.tasks, "train", seed=args.task_seed)
    test_tasks = envs.sample_tasks(args.env, args.test_tasks, "test", seed=args.test_seed)
    t0 = time.perf_counter()
    meta, replay = meta_train(args, train_tasks)
    meta_steps, meta_updates = replay.obs.shape[0] * replay.obs.shape[1] * replay.n, meta.n_updates
    budget = (f"{meta_steps:,} online env steps ({args.tasks} tasks x {meta_steps // args.tasks:,}), "
              f"{meta_updates:,} TD3 updates ({args.updates_per_transition:g} per transition after the burn-in)")
    print(f"meta-training: {budget}, {time.perf_counter() - t0:.0f} s; the AD data it is compared with: "
          f"{data['returns'].shape[0]} tasks x {source_steps:,} {data['algo']} steps")
    ad.save_atomic({**{name: getattr(meta, name).state_dict() for name in NETS}, "args": vars(args)},
                   os.path.join(args.out, "meta.pt"))
    t1 = time.perf_counter()
    returns = evaluate(meta, replay, args, test_tasks)
    per_adapt = args.snap_updates + args.replay_updates
    adaptation = (f"before episode i: the {settings.horizon} x (i - 1) env steps of the earlier episodes on the "
                  f"test task; episode 1 runs theta_meta (GRU context only, 0 updates); each later one "
                  f"theta_meta adapted afresh by {per_adapt} TD3 updates ({args.snap_updates} on those steps, "
                  f"{args.replay_updates} on {args.sample_mult * args.batch_size}-transition propensity-"
                  f"weighted meta-training replay batches with the proximal term)")
    result = dict(env=args.env, method="MQL", train_seed=args.seed, tasks=test_tasks.tolist(),
                  seeds=args.test_seeds, returns=returns.tolist(), source_final=final, source_curve=curve,
                  algo=data["algo"], k=args.k, data=os.path.abspath(data_dir), adaptation=adaptation,
                  budget=budget, meta_train_env_steps=meta_steps, meta_train_updates=meta_updates,
                  selection="final weights", actions="deterministic (mu, no exploration noise)",
                  seconds=time.perf_counter() - t0, args=vars(args))
    envs.write_json_atomic(os.path.join(args.out, "results.json"), result)
    print(f"test tasks ({time.perf_counter() - t1:.0f} s): return per episode "
          f"{' '.join(f'{r:.1f}' for r in returns.mean((0, 1)))}; {data['algo']} final {final:.2f}")
    print(f"wrote {args.out}/results.json; score it with `python evaluate.py {args.out}`")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="point_goal", choices=list(envs.ENVS))
    p.add_argument("--tasks", type=envs.positive_int, default=None, help="training tasks; None: ENVS, as AD's data")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the training tasks (sac.py's --seed of AD's data)")
    p.add_argument("--steps", type=envs.positive_int, default=None,
                   help="online env steps per training task; None: as many as AD's data holds per task")
    p.add_argument("--n-envs", type=envs.positive_int, default=1, help="envs per training task")
    p.add_argument("--updates-per-transition", type=float, default=0.5,
                   help="TD3 updates per online env transition, over all tasks (MQL's code: 0.5)")
    p.add_argument("--burn-in", type=int, default=10_000, help="random-action env steps, over all tasks")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=envs.positive_int, default=256)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--tau", type=float, default=0.005, help="Polyak averaging rate of the targets")
    p.add_argument("--policy-noise", type=float, default=0.3, help="std of the target policy smoothing noise")
    p.add_argument("--noise-clip", type=float, default=0.5, help="its clip")
    p.add_argument("--policy-freq", type=envs.positive_int, default=2, help="critic updates per actor update")
    p.add_argument("--expl-noise", type=float, default=0.2, help="std of the exploration noise")
    p.add_argument("--hidden", type=envs.positive_int, default=300, help="units in each of 2 hidden layers")
    p.add_argument("--context-hidden", type=envs.positive_int, default=30, help="GRU units (the context z)")
    p.add_argument("--history", type=envs.positive_int, default=30, help="transitions in the context window H")
    p.add_argument("--snap-updates", type=int, default=10, help="adaptation: TD3 updates on the new task's data")
    p.add_argument("--replay-updates", type=int, default=100, help="adaptation: weighted updates on the replay")
    p.add_argument("--adapt-lr", type=float, default=1e-3, help="adaptation: lr of its fresh Adams (Adam's default)")
    p.add_argument("--sample-mult", type=envs.positive_int, default=5, help="adaptation replay batch / batch size")
    p.add_argument("--beta-clip", type=float, default=1.0, help="clip of the propensity logit")
    p.add_argument("--logistic-c", type=float, default=0.5, help="inverse L2 strength of the classifier")
    p.add_argument("--test-tasks", type=envs.positive_int, default=10)
    p.add_argument("--test-seeds", type=envs.positive_int, default=3, help="rollouts per test task")
    p.add_argument("--test-seed", type=int, default=0, help="the test tasks of `evaluate.py --seed`")
    p.add_argument("--episodes", type=envs.positive_int, default=None,
                   help="consecutive episodes per test task; None: AD's stream length")
    p.add_argument("--data", default=None, help="AD's learning histories; None: data/ENV/ALGO")
    p.add_argument("--k", type=envs.positive_int, default=None, help="AD's downsampling; None: ENVS")
    p.add_argument("--seed", type=int, default=0, help="seeds the networks, exploration and training envs")
    p.add_argument("--threads", type=envs.positive_int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="run directory; None: out/ENV/mql, _sSEED for seed > 0")
    return p


def parse_args(argv=None):
    """The command line, with defaults from --env's ENVS row and CPU_SCALE (envs.parse_with_env_defaults)."""
    def defaults(env):
        return dict(tasks=envs.ENVS[env].train_tasks, k=envs.ENVS[env].k, **CPU_SCALE.get(env, {}))
    args = envs.parse_with_env_defaults(build_parser(), argv, defaults)
    args.out = args.out or os.path.join("out", args.env, "mql" + (f"_s{args.seed}" if args.seed else ""))
    return args


def given_flags(argv):
    """The destinations of the options given on the command line (argv; None: sys.argv), not defaulted."""
    parser = build_parser()
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([]))))  # every default None, which no flag parses to
    return {key for key, value in vars(parser.parse_known_args(argv)[0]).items() if value is not None}


def scale_for_device(args, argv=None):
    """CPU_SCALE's reductions where the run is on a CPU; elsewhere the defaults of build_parser (the
    reference's). A flag given on the command line stays as given. Returns the reductions in force."""
    reductions = {key: value for key, value in CPU_SCALE.get(args.env, {}).items() if key not in given_flags(argv)}
    on_cpu = torch.device(args.device).type == "cpu"
    for key, value in reductions.items():
        setattr(args, key, value if on_cpu else build_parser().get_default(key))
    return reductions if on_cpu else {}


def main(argv=None):
    args = parse_args(argv)
    try:
        args.device = envs.resolve_device(args.device)
        reductions = scale_for_device(args, argv)
        if reductions:
            print(f"CPU scale for {args.env} (mql.CPU_SCALE; a flag overrides it): "
                  + ", ".join(f"{key} {value:g}" for key, value in reductions.items()))
        if args.threads:
            torch.set_num_threads(args.threads)
        run(args)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
