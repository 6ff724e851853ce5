"""MACAW: Meta-Actor-Critic with Advantage Weighting (Mitchell et al., "Offline Meta-Reinforcement Learning
with Advantage Weighting", ICML 2021): the offline meta-RL baseline of the AD paper (Section 5, "How does AD
compare to other Meta-RL approaches?", Figure 1), trained on the same learning histories that AD reads.

MACAW is MAML (Finn et al. 2017) applied to AWR (Peng et al. 2019): a value function V_phi and a policy
pi_theta, both learned from offline data only (MACAW Algorithm 1). For each task of a meta-batch:
  inner loop, on the task's support batch D_tr (gradient steps with learned per-tensor step sizes eta):
    value    phi'   = phi   - eta_V  grad_phi   L_V(phi, D_tr),       L_V = E[(V(s) - R)^2]       (eq. 1)
    policy   theta' = theta - eta_pi grad_theta [L_AWR(theta, phi', D_tr) + lambda L_ADV(theta, phi', D_tr)]
             L_AWR = E[-log pi(a|s) exp(A / T)],   A = R - V_phi'(s)                            (eq. 3)
             L_ADV = E[(A_theta(s, a) - A)^2]: an advantage-regression head on the policy's features. AWR's
             gradient only says how much to copy each action; the head makes the inner step see the
             advantage itself, which MACAW (Section 4.2, eq. 4) shows makes one step expressive enough
  outer loop, on a query batch D_ts of the same task: minimise L_V(phi', D_ts) over phi and
    L_AWR(theta', phi', D_ts) over theta, differentiating through the inner step (second order); the step
    sizes eta and the head's weight lambda are meta-learned too (as in the reference code).
R is the Monte-Carlo return to the end of the episode (episodes are complete and end by truncation).
Weight transform (MACAW Section 4.3): every layer's weight and bias come from a learned latent vector z,
theta = [W | b] = reshape(z W_wt + b_wt). With delta = dL/dtheta (a plain layer's gradient), a step on b_wt
moves theta by -eta delta, as plain MAML would, and a step on z by -eta delta W_wt^T W_wt: the gradient
preconditioned by a meta-learned matrix, which lets one inner step go where plain gradient steps would
need many (the paper's ablation loses much without it). The inner loop adapts z and b_wt. (The reference
code adapts W_wt as well; its gradient is z (x) delta, so that step only adds -eta (z'.z) delta, a rescaled
b_wt step, while copying W_wt per task would triple the cost of a meta-step.)

Test time: on each unseen test task, one inner step (value, then policy) from a batch of that task's own
offline data (the source algorithm's learning history on it: `python sac.py --split test`), then the adapted
policy's mean action is rolled out for as many episodes as an AD stream holds. There is no further
adaptation during the episodes, so the curve is flat by construction: MACAW adapts from given data, AD
from the episodes it plays. --test-seed picks the test tasks and seeds the rollouts' envs, as `evaluate.py
--seed` does for AD and `mql.py --test-seed` for MQL. Results go to results.json in evaluate.py's baseline
format.

    python sac.py --env point_goal --split test --tasks 10    # -> data/point_goal/sac_test, the test-task data
    python macaw.py --env point_goal                          # -> out/point_goal/macaw
    python evaluate.py out/point_goal/macaw                   # its strict 1: SAC's final on those test tasks

Defaults follow the reference code's offline configuration (config/alg/standard.json: 5 tasks per
meta-batch, one inner step, inner step sizes 1e-3 learned with lr 1e-3, advantage-head weight 0.01, fixed
action std 0.2, advantages normalised per batch with temperature 1 and weights clipped at 20, gamma 0.99,
256 offline transitions to adapt at test time), except where a CPU needs minutes instead of a GPU's
hours (the reference code runs up to 1e6 meta-steps):
  --iters 1000 (about half a minute on one core at the sizes below); --hidden 64, --latent 32 and
  --inner-batch/--batch-size 128 (reference: 3 x 100-unit layers, a 100-d latent, batches of 256: about 4x
  the cost of a meta-step); outer lrs 1e-3 (reference: value 1e-5, policy 1e-4; Adam moves a weight by about
  lr per step, so at 1e-5 a weight could move 0.01 in 1,000 steps).
Observations and returns are standardised with dataset statistics (the reference code uses raw ones) so
that these rates suit every env's reward scale.
"""
import argparse
import glob
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

import ad
import envs


# ----------------------------------------------------------------------------- weight-transform networks

class WeightTransformLinear(nn.Module):
    """A linear layer whose weight and bias are generated from a latent vector: [W | b] = reshape(z W_wt + b_wt)
    (MACAW Section 4.3). Its parameters may carry leading axes (one set per task, as the inner loop makes
    them): z [..., latent], W_wt [..., latent, (d_in + 1) d_out], x [..., B, d_in] -> [..., B, d_out]."""

    def __init__(self, d_in, d_out, latent):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        bound = 1 / math.sqrt(latent)  # W_wt and b_wt as nn.Linear(latent, .) initialises them; z as the paper's code
        self.W_wt = nn.Parameter(torch.empty(latent, (d_in + 1) * d_out).uniform_(-bound, bound))
        self.b_wt = nn.Parameter(torch.empty((d_in + 1) * d_out).uniform_(-bound, bound))
        self.z = nn.Parameter(torch.randn(latent) / d_out)

    def weight_and_bias(self):
        theta = (self.z.unsqueeze(-2) @ self.W_wt).squeeze(-2) + self.b_wt
        weight = theta[..., :self.d_in * self.d_out].unflatten(-1, (self.d_in, self.d_out))
        return weight, theta[..., self.d_in * self.d_out:].unsqueeze(-2)

    def forward(self, x):
        weight, bias = self.weight_and_bias()
        return x @ weight + bias


def mlp(sizes, latent):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [WeightTransformLinear(a, b, latent)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class ValueFunction(nn.Module):
    def __init__(self, obs_dim, hidden, depth, latent):
        super().__init__()
        self.net = mlp([obs_dim] + [hidden] * depth + [1], latent)

    def forward(self, obs):
        return self.net(obs).squeeze(-1)


class Policy(nn.Module):
    """Deterministic tanh mean with a fixed std (the Gaussian of the AWR loss), and the advantage-regression
    head A_theta(s, a) on the last hidden features (one more 32-unit layer, as in the reference code)."""

    def __init__(self, obs_dim, act_dim, hidden, depth, latent, head_hidden=32):
        super().__init__()
        self.body = nn.Sequential(*mlp([obs_dim] + [hidden] * depth, latent), nn.ReLU())
        self.mean = WeightTransformLinear(hidden, act_dim, latent)
        self.advantage = mlp([hidden + act_dim, head_hidden, 1], latent)

    def forward(self, obs, act=None):
        """obs -> mean action; with act also the predicted advantage of (obs, act)."""
        features = self.body(obs)
        mean = torch.tanh(self.mean(features))
        if act is None:
            return mean
        return mean, self.advantage(torch.cat([features, act], -1)).squeeze(-1)


# ----------------------------------------------------------------------------- MACAW's losses and inner step

def adapted_parameters(net):
    """The parameters the inner loop adapts: every layer's latent z and b_wt (not W_wt; see above)."""
    return {name: p for name, p in net.named_parameters() if not name.endswith("W_wt")}


def per_task(params, n):
    """Meta-parameters -> n copies with a leading task axis. The copies are views: gradients of a sum of
    per-task losses w.r.t. them are exactly the per-task gradients, and flow back to the shared originals."""
    return {name: p.expand(n, *p.shape) for name, p in params.items()}


def inner_step(params, loss, step_sizes, create_graph=True):
    """One gradient step with learned per-tensor step sizes softplus(eta). With create_graph the result stays
    differentiable in params and eta (second-order MAML); without it, it is first-order MAML."""
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {name: p - F.softplus(eta) * g for (name, p), eta, g in zip(params.items(), step_sizes, grads)}


def value_loss(value, params, batch):
    """Per-task mean of (V(s) - R)^2, summed over tasks: [task, B] batch -> scalar."""
    return (functional_call(value, params, (batch["obs"],)) - batch["ret"]).square().mean(-1).sum()


def awr_weights(advantage, temperature, max_weight):
    """exp(A / T) with A normalised within each task's batch and the weights clipped (reference code)."""
    normalised = (advantage - advantage.mean(-1, keepdim=True)) / (advantage.std(-1, keepdim=True) + 1e-6)
    return (normalised / temperature).clamp(max=math.log(max_weight)).exp()


def policy_loss(policy, params, batch, advantage, args, head_weight=None):
    """AWR's weighted negative log-likelihood of the data's actions under N(mean(s), action_std); with
    head_weight (the inner loop), plus head_weight * the advantage head's squared error. Per-task means,
    summed over tasks."""
    weights = awr_weights(advantage, args.temperature, args.max_weight)
    if head_weight is None:
        mean = functional_call(policy, params, (batch["obs"],))
    else:
        mean, predicted = functional_call(policy, params, (batch["obs"], batch["act"]))
    log_prob = torch.distributions.Normal(mean, args.action_std).log_prob(batch["act"]).sum(-1)
    loss = -(weights * log_prob)
    if head_weight is not None:
        loss = loss + head_weight * (predicted - advantage).square()
    return loss.mean(-1).sum()


def adapt(model, batch, args, create_graph=True):
    """MACAW's inner loop on a support batch [task, B, ...]: --inner-steps on the value function, then on the
    policy (AWR + advantage head) with advantages from the adapted value. Returns the adapted parameters
    (leading task axis) of both."""
    n = batch["obs"].shape[0]
    phi = per_task(adapted_parameters(model.value), n)
    for _ in range(args.inner_steps):
        phi = inner_step(phi, value_loss(model.value, phi, batch), model.value_eta, create_graph)
    with torch.no_grad():  # the policy's losses treat the advantages as data (as AWR does)
        advantage = batch["ret"] - functional_call(model.value, phi, (batch["obs"],))
    theta = per_task(adapted_parameters(model.policy), n)
    head_weight = F.softplus(model.head_weight)
    for _ in range(args.inner_steps):
        loss = policy_loss(model.policy, theta, batch, advantage, args, head_weight)
        theta = inner_step(theta, loss, model.policy_eta, create_graph)
    return phi, theta


def outer_losses(model, support, query, args, create_graph=True):
    """Meta-objective of a meta-batch: the adapted value's and the adapted policy's (AWR only) losses on the
    query batches, averaged over tasks."""
    phi, theta = adapt(model, support, args, create_graph)
    with torch.no_grad():
        advantage = query["ret"] - functional_call(model.value, phi, (query["obs"],))
    n = query["obs"].shape[0]
    return (value_loss(model.value, phi, query) / n,
            policy_loss(model.policy, theta, query, advantage, args) / n)


# ----------------------------------------------------------------------------- data

def monte_carlo_returns(rew, gamma):
    """rew [..., H] -> discounted return to the end of each episode, [..., H]."""
    ret = np.zeros_like(rew, dtype=np.float64)
    running = np.zeros(rew.shape[:-1])
    for t in reversed(range(rew.shape[-1])):
        running = rew[..., t] + gamma * running
        ret[..., t] = running
    return ret


def transitions(data, gamma):
    """Histories [tasks, E, episodes, H, ...] -> per-task transition tables obs, act, ret [tasks, N, ...]
    (raw returns; standardise with `standardise`)."""
    n = data["obs"].shape[0]
    return {"obs": torch.as_tensor(data["obs"]).reshape(n, -1, data["obs"].shape[-1]),
            "act": torch.as_tensor(data["act"]).reshape(n, -1, data["act"].shape[-1]),
            "ret": torch.as_tensor(monte_carlo_returns(data["rew"], gamma), dtype=torch.float32).reshape(n, -1)}


def data_stats(table):
    obs = table["obs"].reshape(-1, table["obs"].shape[-1])
    return {"obs_mean": obs.mean(0), "obs_std": obs.std(0).clamp_min(1e-3),
            "ret_mean": table["ret"].mean(), "ret_std": table["ret"].std().clamp_min(1e-3)}


def standardise(table, stats, device):
    return {"obs": ((table["obs"] - stats["obs_mean"]) / stats["obs_std"]).to(device), "act": table["act"].to(device),
            "ret": ((table["ret"] - stats["ret_mean"]) / stats["ret_std"]).to(device)}


def sample(table, tasks, batch_size, generator):
    """batch_size transitions of each task in `tasks` (uniform over its history): [len(tasks), batch, ...]."""
    device = table["ret"].device
    index = torch.randint(table["ret"].shape[1], (len(tasks), batch_size), generator=generator).to(device)
    rows = torch.as_tensor(tasks, device=device)[:, None]
    return {key: value[rows, index] for key, value in table.items()}


def history_tasks(data_dir):
    """The task vector of every task_*.npz in data_dir, in file order."""
    return np.stack([envs.load_history(f)["task"] for f in sorted(glob.glob(os.path.join(data_dir, "task_*.npz")))])


# ----------------------------------------------------------------------------- meta-training

def inverse_softplus(x):
    return math.log(math.expm1(x))


class MACAW(nn.Module):
    """Everything meta-learned: the value function, the policy with its advantage head, the inner step sizes
    (softplus(eta), one per adapted tensor) and the advantage head's weight (softplus(head_weight))."""

    def __init__(self, obs_dim, act_dim, args):
        super().__init__()
        self.value = ValueFunction(obs_dim, args.hidden, args.depth, args.latent)
        self.policy = Policy(obs_dim, act_dim, args.hidden, args.depth, args.latent)
        self.value_eta, self.policy_eta = (
            nn.Parameter(torch.full((len(adapted_parameters(net)),), inverse_softplus(args.inner_lr)))
            for net in (self.value, self.policy))
        self.head_weight = nn.Parameter(torch.tensor(inverse_softplus(args.head_weight)))


def meta_train(model, table, args):
    """MACAW Algorithm 1 on the training tasks' transition table; returns the log of outer losses."""
    value_opt = torch.optim.Adam(model.value.parameters(), lr=args.value_lr)
    policy_opt = torch.optim.Adam(model.policy.parameters(), lr=args.policy_lr)
    meta_opt = torch.optim.Adam([model.value_eta, model.policy_eta, model.head_weight], lr=args.step_size_lr)
    generator = torch.Generator().manual_seed(args.seed)
    n_tasks = table["ret"].shape[0]
    log = []
    bar = tqdm(range(args.iters), desc="MACAW", mininterval=1.0, dynamic_ncols=True)
    for it in bar:
        tasks = torch.randperm(n_tasks, generator=generator)[:args.task_batch]
        support = sample(table, tasks, args.inner_batch, generator)
        query = sample(table, tasks, args.batch_size, generator)
        v_loss, pi_loss = outer_losses(model, support, query, args)
        if not (torch.isfinite(v_loss) and torch.isfinite(pi_loss)):
            raise FloatingPointError(f"the outer loss became {v_loss.item()}, {pi_loss.item()} at meta-step {it}: "
                                     f"lower the learning rates or check the data")
        for opt in (value_opt, policy_opt, meta_opt):
            opt.zero_grad(set_to_none=True)
        (v_loss + pi_loss).backward()
        for opt in (value_opt, policy_opt, meta_opt):
            opt.step()
        if (it + 1) % args.log_every == 0 or it + 1 == args.iters:
            log.append({"iter": it + 1, "value_loss": v_loss.item(), "policy_loss": pi_loss.item(),
                        "head_weight": F.softplus(model.head_weight).item(),
                        "value_eta": F.softplus(model.value_eta).mean().item(),
                        "policy_eta": F.softplus(model.policy_eta).mean().item()})
            bar.set_postfix(v=f"{v_loss.item():.3f}", pi=f"{pi_loss.item():.3f}", refresh=False)
    return log


# ----------------------------------------------------------------------------- test time

@torch.no_grad()
def rollout(policy, theta, env, tasks, n_seeds, n_episodes, stats, seed):
    """The adapted policies theta (leading axis: task x seed) act with their mean on n_seeds copies of each
    task for n_episodes consecutive episodes, unchanged between them. The envs are seeded as ad.rollout's
    and mql.py's by the test seed, so every method starts from the same initial states. Returns
    [tasks, seeds, episodes]."""
    vec = envs.MultiTaskVecEnv(env, tasks, n_seeds, seed=seed)
    device = stats["obs_mean"].device
    returns = np.zeros((vec.n_tasks, vec.n_envs, n_episodes))
    for episode in range(n_episodes):
        obs = vec.reset()
        for _ in range(vec.horizon):
            x = (torch.as_tensor(obs, device=device).reshape(-1, 1, vec.obs_dim) - stats["obs_mean"]) / stats["obs_std"]
            act = functional_call(policy, theta, (x,)).reshape(vec.n_tasks, vec.n_envs, vec.act_dim)
            obs, rew, _ = vec.step(act.cpu().numpy())
            returns[:, :, episode] += rew
    return returns


def test(model, test_table, tasks, stats, args, n_episodes):
    """On every test task and seed: adapt from --adapt-batch transitions of that task's offline history (a
    fresh sample per seed, drawn by the training seed), then roll out. Also the meta-policy's return before
    adaptation, for reference."""
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.arange(len(tasks)).repeat_interleave(args.test_seeds)      # task-major: [task0 x seeds, ...]
    batch = sample(test_table, index, args.adapt_batch, generator)
    _, theta = adapt(model, batch, args, create_graph=False)
    theta = {name: p.detach() for name, p in theta.items()}
    returns = rollout(model.policy, theta, args.env, tasks, args.test_seeds, n_episodes, stats, args.test_seed)
    unadapted = per_task({n: p.detach() for n, p in adapted_parameters(model.policy).items()}, len(index))
    before = rollout(model.policy, unadapted, args.env, tasks, args.test_seeds, 1, stats, args.test_seed)
    return returns, float(before.mean())


# ----------------------------------------------------------------------------- command line

def load_test_histories(test_dir, tasks, algo, args):
    """The source algorithm's histories on the test tasks (what MACAW adapts from), checked to be those tasks."""
    make = (f"python {algo}.py --env {args.env} --split test --tasks {len(tasks)} --seed {args.test_seed} "
            f"--out {test_dir}")
    if not os.path.isdir(test_dir):
        raise ad.DataError(f"no test-task histories at {test_dir}: make them with `{make}`")
    found = history_tasks(test_dir)
    if len(found) < len(tasks) or not np.allclose(found[:len(tasks)], tasks):
        raise ad.DataError(f"{test_dir} does not hold the first {len(tasks)} test tasks: make them with `{make}`")
    return ad.load_histories(test_dir, args.env, args.k)


def run(args):
    settings = envs.env_settings(args.env)
    data_dir = args.data or os.path.join("data", args.env, settings.algo)
    test_dir = args.test_data or os.path.join("data", args.env, f"{settings.algo}_test")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = ad.load_histories(data_dir, args.env, args.k)
    tasks = envs.sample_tasks(args.env, args.test_tasks, "test", seed=args.test_seed)  # evaluate.py --seed's
    test_data = load_test_histories(test_dir, tasks, data["algo"], args)
    out = args.out or os.path.join("out", args.env, "macaw")
    os.makedirs(out, exist_ok=True)

    table = transitions(data, args.gamma)
    stats = data_stats(table)
    obs_dim, act_dim = table["obs"].shape[-1], table["act"].shape[-1]
    model = MACAW(obs_dim, act_dim, args).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MACAW on {args.env}: {table['ret'].shape[0]} training tasks x {table['ret'].shape[1]} transitions "
          f"(every {args.k}th episode of {data_dir}); {n_params:,} parameters; {args.iters} meta-steps of "
          f"{args.task_batch} tasks; device {args.device} -> {out}")
    t0 = time.perf_counter()
    log = meta_train(model, standardise(table, stats, args.device), args)
    train_seconds = time.perf_counter() - t0
    ad.save_atomic({"model": model.state_dict(), "stats": stats, "args": vars(args), "obs_dim": obs_dim,
                    "act_dim": act_dim}, os.path.join(out, "ckpt.pt"))

    n_episodes = data["obs"].shape[2]  # an AD stream's length in (downsampled) episodes
    test_table = standardise(transitions({key: test_data[key][:args.test_tasks] for key in ("obs", "act", "rew")},
                                         args.gamma), stats, args.device)
    device_stats = {key: value.to(args.device) for key, value in stats.items()}
    returns, before = test(model, test_table, tasks, device_stats, args, n_episodes)
    curve, final = ad.source_curve(data["returns"], args.k)
    adaptation = (f"{args.inner_steps} value + {args.inner_steps} policy gradient step(s) on {args.adapt_batch} "
                  f"offline transitions of the test task ({data['algo']}'s history on it, every {args.k}th "
                  f"episode), before the first episode; none during the {n_episodes} episodes (a flat curve); "
                  f"no environment steps before them")
    result = {"env": args.env, "method": "MACAW", "train_seed": args.seed, "tasks": tasks.tolist(),
              "seeds": args.test_seeds, "returns": returns.tolist(), "source_final": final, "source_curve": curve,
              "algo": data["algo"], "k": args.k, "data": os.path.abspath(data_dir), "adaptation": adaptation,
              "budget": f"{args.iters:,} meta-steps of {args.task_batch} tasks (offline)",
              "selection": "final weights", "actions": "deterministic (the policy's mean)",
              "return_before_adaptation": before, "train_seconds": train_seconds, "log": log, "args": vars(args)}
    envs.write_json_atomic(os.path.join(out, "results.json"), result)  # never half a file
    print(f"meta-trained in {train_seconds:.0f} s; on {args.test_tasks} test tasks x {args.test_seeds} seeds: return "
          f"{before:.2f} before adaptation, {returns.mean():.2f} after ({data['algo']} final {final:.2f}); "
          f"score with `python evaluate.py {out}`")
    return result


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="reacher_goal", choices=list(envs.ENVS))
    p.add_argument("--data", default=None, help="training histories; None: data/ENV/ALGO of envs.ENVS, AD's data")
    p.add_argument("--test-data", default=None, help="the source algorithm's histories on the test tasks; "
                                                     "None: data/ENV/ALGO_test, what `sac.py --split test` writes")
    p.add_argument("--out", default=None, help="run directory; None: out/ENV/macaw")
    p.add_argument("--k", type=envs.positive_int, default=None, help="keep every k-th episode, as AD; None: ENVS")
    p.add_argument("--iters", type=envs.positive_int, default=1000, help="meta-steps (reference code: up to 1e6)")
    p.add_argument("--task-batch", type=envs.positive_int, default=5, help="tasks per meta-step")
    p.add_argument("--inner-batch", type=envs.positive_int, default=128,
                   help="support transitions per task (reference: 256)")
    p.add_argument("--batch-size", type=envs.positive_int, default=128,
                   help="query transitions per task (reference: 256)")
    p.add_argument("--inner-steps", type=envs.positive_int, default=1, help="inner gradient steps (train and test)")
    p.add_argument("--inner-lr", type=float, default=1e-3, help="initial inner step size (then learned)")
    p.add_argument("--step-size-lr", type=float, default=1e-3, help="lr of the step sizes and the head weight")
    p.add_argument("--value-lr", type=float, default=1e-3, help="outer value lr (paper: 1e-5, see above)")
    p.add_argument("--policy-lr", type=float, default=1e-3, help="outer policy lr (paper: 1e-4, see above)")
    p.add_argument("--head-weight", type=float, default=0.01, help="initial advantage-head weight lambda (learned)")
    p.add_argument("--hidden", type=envs.positive_int, default=64, help="units per hidden layer (reference: 100)")
    p.add_argument("--depth", type=envs.positive_int, default=3, help="hidden layers")
    p.add_argument("--latent", type=envs.positive_int, default=32, help="weight-transform latent size (reference: 100)")
    p.add_argument("--action-std", type=float, default=0.2, help="the policy's fixed std in the AWR likelihood")
    p.add_argument("--temperature", type=float, default=1.0, help="AWR temperature T")
    p.add_argument("--max-weight", type=float, default=20.0, help="AWR weights are clipped at this")
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--test-tasks", type=envs.positive_int, default=10, help="test tasks (evaluate.py's --tasks)")
    p.add_argument("--test-seeds", type=envs.positive_int, default=3,
                   help="adaptations and rollouts per test task (evaluate.py's --seeds)")
    p.add_argument("--test-seed", type=int, default=0,
                   help="the test tasks and the rollouts' env seeds of `evaluate.py --seed`")
    p.add_argument("--adapt-batch", type=envs.positive_int, default=256,
                   help="offline transitions of a test task used to adapt")
    p.add_argument("--log-every", type=envs.positive_int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seeds the networks and the batches drawn")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=envs.positive_int, default=None)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.k = args.k or envs.env_settings(args.env).k
        args.device = envs.resolve_device(args.device)
        run(args)
    except (OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
