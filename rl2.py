"""RL^2 (Duan et al. 2016) by PPO with a recurrent policy: online in-context RL, beside AD's offline road.

AD (ad.py) distils in-context RL from the learning histories of another algorithm. RL^2 learns it directly:
a recurrent policy plays *trials*, K consecutive episodes of one task whose parameter it cannot see, and
PPO maximises the return of the whole trial. The hidden state is kept across the trial's episodes and
reset between trials, so what the policy gains from exploring early in a trial pays off in its later
episodes, and the state must learn to carry what the rewards revealed about the task. At test time nothing
is updated: the state alone adapts, as AD's context does (evaluate.py's in-context episodes = one trial).

  - inputs: one token per step, x_t = [obs_t, a_{t-1}, r_{t-1}, first_t] as in ad.py (first_t = 1 on an
    episode's first step; a_{t-1}, r_{t-1} carry over episode boundaries, are 0 at the trial's start);
  - the model: Mamba (mamba.py) by default, or the RNN that S5-RL (Lu et al. 2023) compares with, a
    torch.nn.GRU matched in parameters (--arch gru); its output is the action mean and the value, with a
    learnt state-independent log std;
  - packing (S5-RL's layout): --pack P trials follow each other in one training row of P x K x H steps,
    with reset = 1 at every trial's first step, and Mamba reads the row in one scan (selective_scan's
    reset input: the state and the conv window start from zero at each reset). S5-RL's speed-up from it
    rests on a parallel scan over the long row; our scans walk time step by step, so on them a packed row
    trades batch width for length (`python bench.py rl2` times both layouts). The GRU has no reset input:
    its rows are cut at the trials (all trials have the same length, so the cut is a reshape);
  - PPO (ppo.py's pieces): rewards scaled by the running std of the discounted return (ppo.py's
    --norm-reward), advantages by GAE over the trial (ppo.gae: the sum runs across the trial's episode
    boundaries and stops at the trial's end, where nothing follows: the next trial is another task), the
    clipped surrogate, a value loss and an entropy bonus, --epochs passes over minibatches of whole packed
    rows (a recurrent policy needs each trial from its first step), gradient clipping.
Every trial draws its task from --tasks training tasks (envs.sample_tasks, split "train").

At the end the policy plays one trial on each of --test-tasks test tasks x --test-seeds seeds (evaluate.py's
split), sampling its actions, then the same trials reward-blind (evaluate.py's control: the reward slot of
every token is 0; RL^2's tokens carry the raw reward, so 0 where AD's carry the dataset mean), and the run
writes `rl2.pt` (weights, config, training log) and `results.json` in evaluate.py's baseline format (as
mql.py and macaw.py, with `blind_returns` beside `returns`), scored against AD's data like theirs:

    python rl2.py --env point_goal --threads 1                 # -> out/point_goal/rl2/{rl2.pt,results.json}
    python rl2.py --env point_goal --arch gru --out out/point_goal/rl2_gru
    python evaluate.py out/point_goal/rl2
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Normal

import ad
import envs
import mamba
import ppo


# ----------------------------------------------------------------------------- the two sequence models

class GRU(nn.Module):
    """The RNN baseline: Linear(d_in, d_model) -> torch.nn.GRU -> Linear(d_model, d_out), with Mamba's
    interface (forward over sequences, init_state / step)."""

    def __init__(self, d_in, d_out, d_model, n_layer=1):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.gru = nn.GRU(d_model, d_model, n_layer, batch_first=True)
        self.head = nn.Linear(d_model, d_out)

    def forward(self, x):
        """x [batch, L, d_in] -> [batch, L, d_out], from a zero state."""
        return self.head(self.gru(self.embed(x))[0])

    def init_state(self, batch, device=None):
        return torch.zeros(self.gru.num_layers, batch, self.gru.hidden_size, device=device)

    def step(self, x, state):
        y, state = self.gru(self.embed(x)[:, None], state)
        return self.head(y[:, 0]), state


def build_model(arch, d_in, d_out, d_model, n_layer):
    """Mamba of d_model x n_layer, or the one-layer GRU whose width gives the closest parameter count."""
    if arch == "mamba":
        return mamba.Mamba(d_in, d_out, d_model, n_layer)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
        target = count_params(mamba.Mamba(d_in, d_out, d_model, n_layer))
        width = min(range(1, 4 * d_model), key=lambda w: abs(count_params(GRU(d_in, d_out, w)) - target))
    return GRU(d_in, d_out, width)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def run_packed(model, x, trial_len):
    """Outputs for packed rows x [rows, P x trial_len, d_in], each trial read from a fresh state."""
    rows, L, _ = x.shape
    if isinstance(model, mamba.Mamba):  # one scan per row, reset at every trial's first step
        reset = (torch.arange(L, device=x.device) % trial_len == 0).expand(rows, L)
        return model(x, reset=reset)
    return model(x.reshape(-1, trial_len, x.shape[-1])).reshape(rows, L, -1)


# ----------------------------------------------------------------------------- the agent

class Agent(nn.Module):
    """A recurrent Gaussian policy and value: the model maps tokens to (action mean, value)."""

    def __init__(self, model, act_dim, log_std=-0.5):
        super().__init__()
        self.model = model
        self.log_std = nn.Parameter(torch.full((act_dim,), log_std))
        self.return_norm = ppo.RunningNorm(1, 1)  # the value predicts returns in its units (scale_rewards)
        with torch.no_grad():  # start near the zero action and value (ppo.py scales its actor's last layer too)
            model.head.weight.mul_(0.01)
            model.head.bias.zero_()

    def heads(self, out):
        """Model output [..., act_dim + 1] -> (the Normal over the pre-clip action, the value)."""
        mean, value = out[..., :-1], out[..., -1]
        return Normal(mean, self.log_std.exp().expand_as(mean)), value


def token(obs, prev_act, prev_rew, first):
    """x_t = [obs_t, a_{t-1}, r_{t-1}, first_t] (ad.py's layout, without its dataset standardisation)."""
    return torch.cat([obs, prev_act, prev_rew[:, None], first[:, None]], dim=-1)


@torch.no_grad()
def play_trials(agent, vec, n_episodes, device, generator=None, blind=False):
    """One trial of n_episodes on every env of vec (rows = tasks x envs), from a fresh state, sampling the
    actions. Returns a dict of [rows, n_episodes x H, ...] tensors: the tokens x, the Gaussian samples u
    (the env executes clip(u, -1, 1)), their log-probabilities, the values and rewards. `blind`: the
    reward-blind control (evaluate.py's): the reward slot of every token stays 0, so what the policy still
    gains over the trial it did not learn from rewards (the returned rewards are the env's, as ever)."""
    rows, H = vec.n_tasks * vec.n_envs, vec.horizon
    state = agent.model.init_state(rows, device)
    prev_act, prev_rew = torch.zeros(rows, vec.act_dim, device=device), torch.zeros(rows, device=device)
    record = {key: [] for key in ("x", "u", "log_prob", "value", "rew")}
    for _ in range(n_episodes):
        obs = torch.as_tensor(vec.reset(), device=device).reshape(rows, -1)
        for t in range(H):
            x = token(obs, prev_act, prev_rew, torch.full((rows,), float(t == 0), device=device))
            out, state = agent.model.step(x, state)
            pi, value = agent.heads(out)
            u = pi.mean + pi.stddev * torch.randn(pi.mean.shape, generator=generator, device=device)
            prev_act = ppo.clip_action(u)
            obs, rew, _ = vec.step(prev_act.reshape(vec.n_tasks, vec.n_envs, -1).cpu().numpy())
            obs = torch.as_tensor(obs, device=device).reshape(rows, -1)
            rew = torch.as_tensor(rew, device=device).reshape(rows)
            if not blind:
                prev_rew = rew
            for key, recorded in zip(record, (x, u, pi.log_prob(u).sum(-1), value, rew)):
                record[key].append(recorded)
    return {key: torch.stack(values, dim=1) for key, values in record.items()}


def trial_gae(rew, value, trial_end, gamma, lam):
    """GAE over packed trials, rew and value [rows, L], trial_end [L] bool (True at each trial's last step):
    the sum runs on across the trial's episode boundaries (exploring in one episode pays in the next)
    and stops at the trial's end, where the future is worth 0 (the next trial is another task, from a
    reset state)."""
    next_value = torch.cat([value[:, 1:], torch.zeros_like(value[:, :1])], dim=1) * ~trial_end
    return ppo.gae(rew, value, next_value, trial_end, gamma, lam)


def scale_rewards(rew, trial_start, gamma, norm):
    """rew [rows, L] / the running std of the discounted return within each trial (SB3 VecNormalize's reward
    scaling, as ppo.py's --norm-reward): one value and policy loss scale whatever the env's reward scale.
    norm is a ppo.RunningNorm(1, 1), updated here."""
    returns, running = torch.empty_like(rew), torch.zeros_like(rew[:, 0])
    for t in range(rew.shape[1]):
        running = running * gamma * ~trial_start[t] + rew[:, t]
        returns[:, t] = running
    norm.update(returns.reshape(1, -1, 1))
    return rew / (norm.var[0, 0] + 1e-8).sqrt()


def pack(tensor, P):
    """[P x rows, T, ...] trials -> [rows, P x T, ...]: row i holds trials i P .. i P + P - 1, in order."""
    return tensor.reshape(-1, P * tensor.shape[1], *tensor.shape[2:])


def ppo_update(agent, opt, batch, trial_len, args, generator=None):
    """--epochs passes of minibatches of whole packed rows over one batch of trials; returns the updates."""
    rows, L = batch["rew"].shape
    t = torch.arange(L, device=batch["rew"].device) % trial_len
    rew = scale_rewards(batch["rew"], t == 0, args.gamma, agent.return_norm)
    adv = trial_gae(rew, batch["value"], t == trial_len - 1, args.gamma, args.gae_lambda)
    ret = adv + batch["value"]  # the lambda-return: the value target
    n_updates = 0
    for _ in range(args.epochs):
        for i in torch.randperm(rows, generator=generator).split(args.minibatch_rows):
            pi, value = agent.heads(run_packed(agent.model, batch["x"][i], trial_len))
            a = adv[i].flatten()
            a = (a - a.mean()) / (a.std(correction=0) + 1e-8)
            policy_loss = ppo.clipped_surrogate(pi.log_prob(batch["u"][i]).sum(-1).flatten(),
                                                batch["log_prob"][i].flatten(), a, args.clip)
            value_loss = (value - ret[i]).square().mean()
            entropy = pi.entropy().sum(-1).mean()
            loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            opt.step()
            n_updates += 1
    return n_updates


# ----------------------------------------------------------------------------- the run

def episode_returns(rew, horizon):
    """rew [rows, K x H] -> the return of each of the trial's K episodes, [rows, K]."""
    return rew.reshape(rew.shape[0], -1, horizon).sum(-1)


def returns_on_test_tasks(agent, args, test_tasks, blind=False):
    """One trial on each test task x --test-seeds, [tasks, seeds, K] episode returns; the same envs and
    action noise whether `blind` or not, so the control differs from the real trials in the rewards alone."""
    vec = envs.MultiTaskVecEnv(args.env, test_tasks, args.test_seeds, seed=args.test_seed)
    trials = play_trials(agent, vec, args.episodes, args.device,
                         torch.Generator(args.device).manual_seed(args.test_seed), blind)
    return episode_returns(trials["rew"], vec.horizon).reshape(len(test_tasks), args.test_seeds, -1)


def train(args, agent, train_tasks, source):
    """PPO over trials until --steps env steps; the log: one line per iteration."""
    horizon = envs.env_settings(args.env).horizon
    trial_len, n_trials = args.episodes * horizon, args.rows * args.pack
    opt = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)
    rng, generator = np.random.default_rng(args.seed), torch.Generator(args.device).manual_seed(args.seed)
    log, steps, updates, start = [], 0, 0, time.perf_counter()
    for iteration in range(max(1, args.steps // (n_trials * trial_len))):
        task_ids = rng.integers(len(train_tasks), size=n_trials)  # each trial's task, drawn afresh
        vec = envs.MultiTaskVecEnv(args.env, train_tasks[task_ids], 1, seed=args.seed * 100_003 + iteration)
        trials = play_trials(agent, vec, args.episodes, args.device, generator)
        updates += ppo_update(agent, opt, {key: pack(v, args.pack) for key, v in trials.items()}, trial_len, args,
                              generator)
        steps += n_trials * trial_len
        per_episode = episode_returns(trials["rew"], horizon).mean(0).tolist()
        log.append(dict(iteration=iteration, env_steps=steps, updates=updates, seconds=time.perf_counter() - start,
                        returns=per_episode))
        if iteration % args.log_every == 0:
            print(f"iter {iteration:4d}  {steps:>9,} steps  {log[-1]['seconds']:6.0f} s  return per episode "
                  f"{' '.join(f'{r:.1f}' for r in per_episode)}  ({source['algo']} final {source['final']:.1f})",
                  flush=True)
    return log


def run(args):
    settings = envs.env_settings(args.env)
    data_dir = args.data or os.path.join("data", args.env, settings.algo)
    data = ad.load_histories(data_dir, args.env, args.k)  # the AD data RL^2 is compared (and scored) with
    curve, final = ad.source_curve(data["returns"], args.k)
    args.episodes = args.episodes or data["obs"].shape[2]  # a trial = AD's in-context stream
    envs.prepare_out_dir(args.out)
    torch.manual_seed(args.seed)
    train_tasks = envs.sample_tasks(args.env, args.tasks, "train", seed=args.task_seed)
    test_tasks = envs.sample_tasks(args.env, args.test_tasks, "test", seed=args.test_seed)
    sizes = envs.MultiTaskVecEnv(args.env, test_tasks[:1], 1)  # one env for the sizes; the test trials make their own
    obs_dim, act_dim = sizes.obs_dim, sizes.act_dim
    d_in = obs_dim + act_dim + 2
    agent = Agent(build_model(args.arch, d_in, act_dim + 1, args.d_model, args.n_layer), act_dim)
    agent.to(args.device)
    print(f"RL^2-{args.arch}: {count_params(agent):,} parameters; trials of {args.episodes} episodes, "
          f"{args.rows} rows x {args.pack} packed trials per iteration")
    log = train(args, agent, train_tasks, dict(algo=data["algo"], final=final))
    model_config = dict(arch=args.arch, d_in=d_in, d_out=act_dim + 1, d_model=args.d_model, n_layer=args.n_layer)
    ad.save_atomic(dict(agent=agent.state_dict(), model_config=model_config, args=vars(args), log=log),
                   os.path.join(args.out, "rl2.pt"))
    returns, blind = (returns_on_test_tasks(agent, args, test_tasks, blind) for blind in (False, True))
    budget = f"{log[-1]['env_steps']:,} online env steps, {log[-1]['updates']:,} PPO updates"
    result = dict(env=args.env, method=f"RL2-{args.arch}", train_seed=args.seed, tasks=test_tasks.tolist(),
                  seeds=args.test_seeds, returns=returns.tolist(), blind_returns=blind.tolist(), source_final=final,
                  source_curve=curve, algo=data["algo"], k=args.k, data=os.path.abspath(data_dir), budget=budget,
                  adaptation="none: the recurrent state carries the trial (no gradient step at test time)",
                  selection="final weights", actions="sampled", params=count_params(agent),
                  seconds=log[-1]["seconds"], args=vars(args))
    envs.write_json_atomic(os.path.join(args.out, "results.json"), result)
    for name, r in (("test tasks", returns), ("reward-blind", blind)):
        print(f"{name}: return per episode {' '.join(f'{x:.1f}' for x in r.mean((0, 1)).tolist())}")
    print(f"{data['algo']} final {final:.2f}; {budget}, {log[-1]['seconds']:.0f} s")
    print(f"wrote {args.out}/results.json; score it with `python evaluate.py {args.out}`")


# Per-env learning rates where 1e-3 is not the better one. point_goal: at 1e-3, in the few hundred thousand
# steps a CPU run takes, the policy has barely begun to use the trial's rewards; at 3e-3 it has learnt to.
LR = {"point_goal": 3e-3}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="point_goal", choices=list(envs.ENVS))
    p.add_argument("--arch", default="mamba", choices=("mamba", "gru"), help="gru: matched in parameters")
    p.add_argument("--d-model", type=envs.positive_int, default=32, help="Mamba's width (the GRU's follows)")
    p.add_argument("--n-layer", type=envs.positive_int, default=2, help="Mamba's layers")
    p.add_argument("--steps", type=envs.positive_int, default=2_000_000, help="online env steps in all")
    p.add_argument("--episodes", type=envs.positive_int, default=None,
                   help="episodes per trial K; None: AD's stream length (evaluate.py's in-context episodes)")
    p.add_argument("--rows", type=envs.positive_int, default=8, help="training rows per iteration")
    p.add_argument("--pack", type=envs.positive_int, default=4, help="trials packed into each row")
    p.add_argument("--minibatch-rows", type=envs.positive_int, default=2, help="rows per PPO minibatch")
    p.add_argument("--epochs", type=envs.positive_int, default=4, help="passes over each iteration's trials")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate; None: LR[env], else 1e-3")
    p.add_argument("--gamma", type=float, default=0.99, help="discount, per step, across the trial's episodes")
    p.add_argument("--gae-lambda", type=float, default=0.95, help="lambda of GAE")
    p.add_argument("--clip", type=float, default=0.2, help="epsilon of the clipped surrogate")
    p.add_argument("--vf-coef", type=float, default=0.5, help="weight of the value loss")
    p.add_argument("--ent-coef", type=float, default=0.0, help="weight of the entropy bonus")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="gradient clipping")
    p.add_argument("--tasks", type=envs.positive_int, default=None, help="training tasks; None: ENVS, as AD's data")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the training tasks (sac.py's --seed of AD's data)")
    p.add_argument("--test-tasks", type=envs.positive_int, default=10)
    p.add_argument("--test-seeds", type=envs.positive_int, default=3, help="trials per test task")
    p.add_argument("--test-seed", type=int, default=0, help="the test tasks of `evaluate.py --seed`")
    p.add_argument("--data", default=None, help="AD's learning histories; None: data/ENV/ALGO")
    p.add_argument("--k", type=envs.positive_int, default=None, help="AD's downsampling; None: ENVS")
    p.add_argument("--seed", type=int, default=0, help="seeds the networks, actions and training envs")
    p.add_argument("--log-every", type=envs.positive_int, default=10, help="iterations between printed lines")
    p.add_argument("--threads", type=envs.positive_int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="run directory; None: out/ENV/rl2[_gru][_sSEED]")
    return p


def parse_args(argv=None):
    def defaults(env):
        return dict(tasks=envs.ENVS[env].train_tasks, k=envs.ENVS[env].k, lr=LR.get(env, 1e-3))
    args = envs.parse_with_env_defaults(build_parser(), argv, defaults)
    name = "rl2" + ("_gru" if args.arch == "gru" else "") + (f"_s{args.seed}" if args.seed else "")
    args.out = args.out or os.path.join("out", args.env, name)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        args.device = envs.resolve_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        run(args)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
