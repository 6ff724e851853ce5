"""Algorithm Distillation (Laskin et al. 2023) for continuous control, with Mamba (paper Sections 3, 5.2, 5.3,
eq. 6 and Appendix B).

A source RL algorithm (sac.py, ppo.py, droq.py) left one learning history per training task: every episode
from its first random actions to its last good ones. AD trains a sequence model to predict the next action
from a long *cross-episodic* context of that history. To do so it must model how the source algorithm
improves its policy from what it saw, so on a new task it improves in context, with no gradient step.

Tokens: one per time step, x_t = [obs_t, act_{t-1}, rew_{t-1}, first_t] (obs and reward standardised with
dataset statistics, first_t = 1 on an episode's first step; across an episode boundary act_{t-1}, rew_{t-1}
are the previous episode's last step; zeros before the very first step); the target is a_t. Histories are
downsampled to every k-th episode (`--offsets N` also reads each history from N start episodes: N streams
per history). `--context full` trains on whole downsampled streams (the paper's best), `--context N` on
random windows of N tokens inside one stream. Losses: `mse` on the executed action (eq. 6)
or `nll`, a Gaussian head trained against the source policy's own distribution (act_mean, act_std).
`--task-loss W` (not the paper's: a change of method) adds W x the squared error of a guess of the hidden
task at every token, from extra outputs the policy never uses: it asks the model to read the task, which
the action loss alone need not, and evaluate.py scores the guess the model makes from its own rollouts.

Three sequence models read the tokens (--arch): mamba.py, transformer.py and hybrid.py (Decision Mamba-Hybrid:
Mamba over c-step segments emits a sub-goal, a small transformer acts on it and the segment; trained with a
second pass on valuable sub-goals from the histories, unless --no-valuable-subgoals).

The training loss barely moves while rollouts improve, so every --eval-every updates the model is rolled out
in context on a few *validation* tasks (never the test tasks evaluate.py reports on) and the best checkpoint
by the strict score is kept: 0 = the better of the zero-action and random policies, 1 = the source
algorithm's final return.

    python ad.py --arch mamba                                 # data/reacher_goal/sac -> out/reacher_goal/mamba
    python ad.py --env point_goal                             # the CPU demo (README; ENVS sets lr, epochs)
    python ad.py --env point_goal --resume                    # continue a killed run
    python ad.py --env point_goal --arch hybrid --params 98884   # DM-H at the AD-Mamba's size
"""
import argparse
import glob
import json
import math
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import envs
import hybrid
import mamba
import transformer

ARCHS = ("mamba", "transformer", "hybrid")
# Bounds of the Gaussian action head's log-std, in the [-1, 1] action box itself (sac.PRE_TANH_LOG_STD bounds
# a spread that tanh squashes afterwards). The floor, std 0.007, keeps the NLL finite where the target has no
# spread (histories without a stored policy: act_std = 0); the cap, std 2.7, already covers the whole box.
HEAD_LOG_STD = (-5.0, 1.0)


class DataError(ValueError):
    """Missing, empty or mismatched learning histories, or an unusable checkpoint."""


# ----------------------------------------------------------------------------- histories -> tokens

def load_histories(data_dir, env, k, offsets=1):
    """Every task_*.npz of data_dir, downsampled to every k-th episode (from `offsets` start episodes) as
    it is read (a paper-scale data set need not fit in memory whole) and stacked: obs [tasks, E x offsets,
    episodes, H, obs_dim], act, act_mean, act_std [.., act_dim] (without a stored policy: act and 0), rew
    [tasks, E x offsets, episodes, H]; plus `returns` [tasks, E, all episodes] of the full histories, for
    the source algorithm's learning curve, and each history's hidden `task` [tasks, task_dim]."""
    make = f"python {envs.env_settings(env).algo}.py --env {env}"
    if not os.path.isdir(data_dir):
        raise DataError(f"no learning histories at {data_dir}: make them with `{make}`")
    files = sorted(glob.glob(os.path.join(data_dir, "task_*.npz")))
    if not files:
        raise DataError(f"{data_dir} holds no task_*.npz learning histories: make them with `{make}`")
    kept, returns, tasks, first = [], [], [], None
    for f in files:
        h = envs.load_history(f)
        first = h if first is None else first
        if h["env"] != env:
            raise DataError(f"{f} holds {h['env']} histories, not {env}: pass --env {h['env']} or another --data")
        if h["obs"].shape != first["obs"].shape or h["algo"] != first["algo"] or h["split"] != first["split"]:
            raise DataError(f"{f} does not match {files[0]} (shape {h['obs'].shape} vs {first['obs'].shape}, "
                            f"algo {h['algo']} vs {first['algo']}, split {h['split']} vs {first['split']}): "
                            f"one data directory per run")
        h.setdefault("act_mean", h["act"])
        h.setdefault("act_std", np.zeros_like(h["act"]))
        kept.append(downsample(h, k, offsets))
        returns.append(h["rew"].sum(-1))
        tasks.append(h["task"])
    data = {key: np.stack([h[key] for h in kept]) for key in kept[0]}
    data.update(returns=np.stack(returns), task=np.stack(tasks).astype(np.float32), algo=first["algo"],
                split=first["split"])
    return data


HISTORY_ARRAYS = ("obs", "act", "rew", "act_mean", "act_std")


def downsample(history, k, offsets=1):
    """Keep every k-th episode (0, k, 2k, ...) of each stream: the arrays' episode axis is the second.
    offsets > 1 reads each stream again from later start episodes spread over those that keep as many
    episodes as start 0 (all of [0, k) when k divides the episodes: k = 50, offsets = 5 starts at 0, 10, 20,
    30, 40), one stream each, appended on the stream axis. Every such stream is the learning history
    downsampled k-fold, as faithful as the first: more streams from the same source runs (on Pusher they
    lowered the held-out loss, not the rollouts' score)."""
    n_episodes = history["rew"].shape[1]
    n_starts = (n_episodes - 1) % k + 1  # starts 0 .. n_starts - 1 keep ceil(n_episodes / k) episodes
    if offsets > n_starts:
        raise DataError(f"--offsets {offsets} with --k {k}: only {n_starts} start episodes keep as many of the "
                        f"{n_episodes} episodes as the first; use --offsets {n_starts} or fewer")
    starts = [i * n_starts // offsets for i in range(offsets)]
    return {key: np.concatenate([history[key][:, s::k] for s in starts], axis=0) for key in HISTORY_ARRAYS}


def dataset_stats(obs, rew):
    """Standardisation statistics of observations (per dimension) and rewards (one scalar)."""
    obs, rew = obs.reshape(-1, obs.shape[-1]).astype(np.float64), rew.astype(np.float64)
    return {"obs_mean": torch.tensor(obs.mean(0), dtype=torch.float32),
            "obs_std": torch.tensor(np.maximum(obs.std(0), 1e-3), dtype=torch.float32),
            "rew_mean": torch.tensor(rew.mean(), dtype=torch.float32),
            "rew_std": torch.tensor(max(rew.std(), 1e-3), dtype=torch.float32)}


def reward_input(rew, act, env, kind):
    """The reward a token carries, numpy rew [...] after actions act [..., act_dim] taken in `env` (any env of
    the task family): "reward", the env's own, as the paper; "task", its part that the task decides, the
    reward plus the control cost of the action taken. That cost follows from the model's own action and says
    nothing of the task, yet a model must subtract it almost exactly to read what is left: on Pusher, with
    noisy actions, it varies more within an episode than the distances that locate the cylinder."""
    return rew if kind == "reward" else (rew + env.ctrl_cost_of(act)).astype(np.float32)


def standardise_reward(rew, stats):
    return (rew - stats["rew_mean"]) / stats["rew_std"]


def make_token(obs, prev_act, prev_rew, first, stats):
    """x_t = [obs_t, act_{t-1}, rew_{t-1}, first_t]: obs raw, prev_act in [-1, 1], prev_rew already
    standardised (0 before the very first step), first 0/1. Any leading shape."""
    obs = (obs - stats["obs_mean"]) / stats["obs_std"]
    return torch.cat([obs, prev_act, prev_rew[..., None], first[..., None]], dim=-1)


def model_io(obs_dim, act_dim, loss):
    """(d_in, d_out) of the sequence model: a token as make_token builds it; the action head (nll: mean and
    log-std per action dimension)."""
    return obs_dim + act_dim + 2, act_dim * (2 if loss == "nll" else 1)


def stream_tokens(obs, act, rew, stats):
    """Whole streams of episodes obs [..., episodes, H, obs_dim], act [..., episodes, H, act_dim],
    rew [..., episodes, H] -> tokens [..., episodes * H, d_in]."""
    episodes, H = rew.shape[-2:]
    obs, act = obs.flatten(-3, -2), act.flatten(-3, -2)
    rew = standardise_reward(rew.flatten(-2), stats)
    prev_act, prev_rew = torch.zeros_like(act), torch.zeros_like(rew)
    prev_act[..., 1:, :], prev_rew[..., 1:] = act[..., :-1, :], rew[..., :-1]
    first = torch.zeros_like(rew)
    first[..., ::H] = 1
    return make_token(obs, prev_act, prev_rew, first, stats)


def build_streams(data, stats, subgoals=False):
    """Flatten each (task, env) pair of downsampled histories into one token stream.
    Returns tokens [tasks, E, L, d_in] and targets act, act_mean, act_std [tasks, E, L, act_dim]; with
    subgoals, also each step's valuable sub-goal for DM-H (hybrid.py): the standardised observation of the
    future step of its episode that hybrid.valuable_subgoal_steps picks, "subgoal" [tasks, E, L, obs_dim]."""
    arrays = {key: torch.as_tensor(data[key]) for key in HISTORY_ARRAYS}
    tokens = stream_tokens(arrays["obs"], arrays["act"], arrays["rew"], stats)
    targets = {key: arrays[key].flatten(-3, -2) for key in ("act", "act_mean", "act_std")}
    if subgoals:
        steps = hybrid.valuable_subgoal_steps(arrays["rew"])[..., None]          # [.., episodes, H, 1]
        goal = torch.take_along_dim(arrays["obs"], steps, dim=-2)
        targets["subgoal"] = ((goal - stats["obs_mean"]) / stats["obs_std"]).flatten(-3, -2)
    return tokens, targets


def source_curve(returns, k):
    """The source algorithm's mean return per downsampled episode (the units AD is trained in), and its
    final return: the mean over the last 10% of all its episodes, as sac.py reports it."""
    returns = returns.reshape(-1, returns.shape[-1])             # [streams, episodes]
    last = max(1, returns.shape[1] // 10)
    return returns[:, ::k].mean(0).tolist(), float(returns[:, -last:].mean())


# ----------------------------------------------------------------------------- model and loss

def build_model(config):
    """The sequence model of a checkpoint config: d_in -> d_out per token, `forward` and `init_state`/`step`."""
    if config["arch"] == "mamba":
        return mamba.Mamba(config["d_in"], config["d_out"], config["d_model"], config["n_layer"],
                           d_state=config["d_state"])
    if config["arch"] == "transformer":
        return transformer.Transformer(config["d_in"], config["d_out"], config["d_model"], config["n_layer"],
                                       n_head=config["n_head"], max_len=config["max_len"], d_ff=config["d_ff"])
    if config["arch"] == "hybrid":
        return hybrid.Hybrid(config["d_in"], config["d_out"], config["d_model"], config["n_layer"],
                             config["attn_layers"], config["segment"], d_goal=config["d_goal"],
                             d_state=config["d_state"], n_head=config["n_head"], d_ff=config["d_ff"])
    raise DataError(f"unknown arch {config['arch']!r}; this version knows: {', '.join(ARCHS)}")


def arch_config(arch, sizes, d_in, d_out, max_len, obs_dim=None):
    """A checkpoint's model config from sizes {d_model, n_layer, d_state | n_head, d_ff | all of those and
    segment, attn_layers, valuable_subgoals (default on) for DM-H}. A transformer's position table is as long
    as its training context (max_len); Mamba and DM-H have no such limit. DM-H's sub-goals are observations."""
    config = {"arch": arch, "d_in": d_in, "d_out": d_out, "d_model": sizes["d_model"], "n_layer": sizes["n_layer"]}
    if arch == "mamba":
        return {**config, "d_state": sizes["d_state"]}
    if arch == "hybrid":
        return {**config, "d_state": sizes["d_state"], "n_head": sizes["n_head"], "d_ff": sizes["d_ff"],
                "attn_layers": sizes["attn_layers"], "segment": sizes["segment"], "d_goal": obs_dim,
                "valuable_subgoals": sizes.get("valuable_subgoals", True)}
    return {**config, "n_head": sizes["n_head"], "d_ff": sizes["d_ff"], "max_len": max_len}


def count_params(config):
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
        return sum(p.numel() for p in build_model(config).parameters())


def match_params(config, target):
    """The config with the d_model (a multiple of n_head for a transformer) whose parameter count is
    closest to target: the paper compares archs "with the same number of parameters" (Appendix B)."""
    step = config.get("n_head", 1)

    def count(width):
        return count_params({**config, "d_model": width * step})
    lo, hi = 1, 1
    while count(hi) < target:  # the count grows with the width: double, then bisect
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    best = min((w for w in (lo - 1, lo) if w >= 1), key=lambda w: abs(count(w) - target))
    return {**config, "d_model": best * step}


def policy_head(out, loss):
    """Model output -> (mean action, log-std or None)."""
    if loss == "mse":
        return out, None
    mean, log_std = out.chunk(2, dim=-1)
    return mean, log_std.clamp(*HEAD_LOG_STD)


def action_loss(out, targets, loss):
    """mse: squared error to the executed action (paper eq. 6). nll: the Gaussian head's expected negative
    log-likelihood of actions drawn from the source policy N(act_mean, act_std) (the cross-entropy; for
    a history without a policy distribution, the NLL of the executed action)."""
    mean, log_std = policy_head(out, loss)
    if loss == "mse":
        return F.mse_loss(mean, targets["act"])
    squared = (targets["act_mean"] - mean).square() + targets["act_std"].square()
    return (log_std + 0.5 * squared * torch.exp(-2 * log_std)).mean()


def action_outputs(out, task_dim):
    """The policy head's part of a model's output: all but the last task_dim (the task guess of --task-loss)."""
    return out[..., :out.shape[-1] - task_dim]


def task_dim_of(targets):
    return targets["task"].shape[-1] if "task" in targets else 0


def head_loss(out, targets, loss, task_weight):
    """The action loss; with a task target (--task-loss), plus task_weight x the squared error of the task
    guess, the model's last task_dim outputs, to the standardised hidden task at every token."""
    task_dim = task_dim_of(targets)
    value = action_loss(action_outputs(out, task_dim), targets, loss)
    if not task_dim:
        return value
    return value + task_weight * F.mse_loss(out[..., -task_dim:], targets["task"])


def training_loss(model, tokens, targets, loss, task_weight=0.0):
    """head_loss; for DM-H trained with valuable sub-goals (targets hold "subgoal"), the mean of it and
    the loss of a second pass whose segments are conditioned on those sub-goals instead of Mamba's (DM-H
    Section 4.3): the same actions, so the transformer learns to follow a sub-goal."""
    value = head_loss(model(tokens).float(), targets, loss, task_weight)  # fp32 loss, also under bf16 autocast
    if "subgoal" not in targets:
        return value
    second = head_loss(model(tokens, subgoals=targets["subgoal"]).float(), targets, loss, task_weight)
    return 0.5 * (value + second)


def choose_action(out, loss, action_mode, generator=None):
    """The rollout's action in [-1, 1]: the mean, or a sample of the Gaussian head (action_mode="sample")."""
    mean, log_std = policy_head(out, loss)
    if action_mode == "sample" and log_std is not None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        mean = mean + log_std.exp() * noise
    return mean.clamp(-1, 1)


# ----------------------------------------------------------------------------- in-context rollouts

class SlidingContext:
    """A model trained on windows of `window` tokens, rolled out so that it never sees more: when its
    context holds `window` tokens, a fresh state is primed with the newest window // 2 of them and the
    rollout goes on, so every output sees between window // 2 and window - 1 earlier tokens. This is the
    transformer's own slide past its position table (transformer.py), made one protocol for every
    architecture: without it a windowed Mamba's state would carry the whole rollout."""

    def __init__(self, model, window):
        self.model, self.window = model, window

    def init_state(self, batch, device=None):
        return {"inner": self.model.init_state(batch, device), "tokens": []}

    def step(self, x, state):
        if len(state["tokens"]) == self.window:
            state["tokens"] = state["tokens"][-(self.window // 2):]
            state["inner"] = self.model.init_state(x.shape[0], x.device)
            for token in state["tokens"]:  # re-prime: the kept tokens, replayed from an empty context
                _, state["inner"] = self.model.step(token, state["inner"])
        state["tokens"].append(x)
        y, state["inner"] = self.model.step(x, state["inner"])
        return y, state


def rollout_window(meta, bounded=True):
    """The context a rollout allows a checkpoint: its training window (None for full streams, or when
    `bounded` is off: the model's own state then keeps everything, for comparison)."""
    return meta["context"] if bounded and meta["context"] != "full" else None


class InContextAgent:
    """A model acting in context in n envs at once: at each step it reads the token [obs, the previous action
    and reward, first] and answers an action [act_dim]; its state (the context) persists across episodes.
    `window`: see at most that many tokens (SlidingContext). `blind`: the reward-blind control: the reward
    slot of every token stays 0 (the data set's mean reward), so whatever the model still gains over the
    episodes it did not learn from rewards. rollout() plays whole episodes with it; noise.py --player lets
    it play learning histories."""

    def __init__(self, model, meta, n, act_dim, action_mode="mean", seed=0, device="cpu", window=None, blind=False):
        self.model = SlidingContext(model, window) if window else model
        self.loss, self.action_mode, self.device, self.blind = meta["loss"], action_mode, device, blind
        self.stats = {key: value.to(device) for key, value in meta["stats"].items()}
        self.generator = torch.Generator(device).manual_seed(seed)
        self.reward_kind = meta.get("reward_input", RUN_DEFAULTS["reward_input"])
        self.task_dim = meta.get("task_dim", RUN_DEFAULTS["task_dim"])  # outputs after the policy's: a task guess
        self.state = self.model.init_state(n, device)
        self.prev_act = torch.zeros(n, act_dim, device=device)
        self.prev_rew = torch.zeros(n, device=device)

    @torch.no_grad()
    def act(self, obs, first):
        """obs [n, obs_dim] (numpy), first: the episode's first step -> the actions [n, act_dim] in [-1, 1]."""
        obs = torch.as_tensor(obs, device=self.device)
        first = torch.full((len(obs),), float(first), device=self.device)
        out, self.state = self.model.step(make_token(obs, self.prev_act, self.prev_rew, first, self.stats), self.state)
        action = choose_action(action_outputs(out, self.task_dim), self.loss, self.action_mode, self.generator)
        return action.cpu().numpy()

    def observe(self, taken, rew, env):
        """What the step did: the actions taken [n, act_dim] (the agent's, or others mixed in) and their
        rewards [n] in `env` (any env of the task family: it prices the control cost for reward_input)."""
        self.prev_act = torch.as_tensor(taken, device=self.device)
        if not self.blind:
            seen = reward_input(rew, taken, env, self.reward_kind)
            self.prev_rew = standardise_reward(torch.as_tensor(seen, device=self.device), self.stats)


@torch.no_grad()
def rollout(model, meta, tasks, n_episodes, n_seeds=1, action_mode="mean", seed=0, device="cpu", desc=None,
            window=None, record=False, blind=False):
    """In-context RL on `tasks`: n_seeds copies of each task play n_episodes consecutive episodes while the
    model's recurrent state (the context) persists across them; no gradient step. All tasks and seeds go
    through one model call per time step. `window` and `blind`: see InContextAgent.
    Returns the episode returns [tasks, seeds, episodes]; with `record`, also what the agent did (the envs'
    trace(), for evaluate.py's pictures): where [tasks, seeds, episodes, horizon + 1, d] (after the reset and
    after every step) and each env's hidden goal [tasks, seeds, g]."""
    vec = envs.MultiTaskVecEnv(meta["env"], tasks, n_seeds, seed=seed)
    n = vec.n_tasks * vec.n_envs
    agent = InContextAgent(model, meta, n, vec.act_dim, action_mode, seed, device, window, blind)
    returns = np.zeros((vec.n_tasks, vec.n_envs, n_episodes))
    where = []  # per episode: [horizon + 1] arrays [tasks, seeds, d]
    for episode in tqdm(range(n_episodes), desc=desc, disable=desc is None, leave=False):
        obs = vec.reset()
        if record:
            where.append([vec.trace()[0]])
        for t in range(vec.horizon):
            taken = agent.act(obs.reshape(n, -1), first=t == 0)
            obs, rew, _ = vec.step(taken.reshape(vec.n_tasks, vec.n_envs, -1))
            returns[:, :, episode] += rew
            agent.observe(taken, rew.reshape(n), vec.envs[0][0])
            if record:
                where[-1].append(vec.trace()[0])
    if not record:
        return returns
    return returns, np.stack([np.stack(steps, axis=2) for steps in where], axis=2), vec.trace()[1]


def normalised(returns, floor, source_final):
    """0 = `floor`, 1 = the source algorithm's final return."""
    return (np.asarray(returns) - floor) / (source_final - floor)


def strict_floor(zero_return, random_return):
    """The strict score's 0: the better of standing still and acting at random. Against random alone,
    tasks where standing still is far above random (Reacher, Ant-Dir) would score well for doing nothing."""
    return max(zero_return, random_return)


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save, atomically: a kill never leaves half a checkpoint (envs.write_atomic)."""
    envs.write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, arch=None, device="cpu"):
    """A checkpoint written by ad.py, with its model rebuilt and loaded (in eval mode)."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise DataError(f"no checkpoint at {path}: train one with `python ad.py`")
    try:  # weights_only: tensors and plain types only, so a shared checkpoint cannot run code
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise DataError(f"{path} is not a checkpoint written by ad.py ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise DataError(f"{path} is not a checkpoint written by ad.py")
    if arch is not None and ckpt["model_config"]["arch"] != arch:
        raise DataError(f"{path} holds a {ckpt['model_config']['arch']} model, not {arch}")
    model = build_model(ckpt["model_config"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


# ----------------------------------------------------------------------------- training

def lr_at(it, total, args):
    """Linear warm-up, then cosine decay to a tenth of --lr (nanoGPT's schedule)."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = (it - args.warmup_iters) / max(1, total - args.warmup_iters)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, args):
    """AdamW; no weight decay on biases, norms, A_log and D (as in the Mamba reference)."""
    def decays(p):
        return p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if decays(p)], [p for p in params if not decays(p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)


def sample_batch(tokens, targets, args, generator, rank=0, world=1):
    """[batch, length, ...] training samples, with their input noise: whole streams (--context full) or
    windows inside one stream. Every process draws the same global batch of batch_size x world samples
    from the shared generator and keeps its own slice, so DDP's averaged gradient is exactly the one
    process's gradient on the whole global batch."""
    n_streams, L = tokens.shape[:2]
    n, mine = args.batch_size * world, slice(rank * args.batch_size, (rank + 1) * args.batch_size)
    device = generator.device  # the training device: no copy, no wait
    rows = torch.randint(n_streams, (n,), generator=generator, device=device)
    if args.context == "full":
        index = (rows[mine],)
        length = L
    else:
        starts = torch.randint(L - args.context + 1, (n,), generator=generator, device=device)
        index = (rows[mine, None], (starts[:, None] + torch.arange(args.context, device=device))[mine])
        length = args.context
    noise = args.noise * torch.randn((n, length, tokens.shape[-1]), generator=generator, device=device)[mine]
    return tokens[index] + noise, {key: value[index] for key, value in targets.items()}


def iters_per_epoch(n_streams, L, args, world=1):
    """One epoch = as many tokens as the training streams hold (global batch: batch_size x world)."""
    length = L if args.context == "full" else args.context
    return max(1, math.ceil(n_streams * L / (args.batch_size * world * length)))


@torch.no_grad()
def validation_loss(model, tokens, targets, loss, window=None, batch_size=16):
    """The action loss (without --task-loss's term) on held-out streams, in the training context: whole
    streams, or (`window` tokens) the streams cut into consecutive windows, as the model was trained (a
    transformer cannot take more than its window, and a windowed Mamba is not trained on more); a remainder
    shorter than a window is left out. Every sample weighs the same: batch means are weighted by batch
    size, so an uneven last batch does not count more than its share."""
    if window:
        tokens, targets = tile_windows(tokens, window), {key: tile_windows(v, window) for key, v in targets.items()}
    if len(tokens) == 0:
        return float("nan")
    model.eval()
    starts = range(0, len(tokens), batch_size)
    task_dim = task_dim_of(targets)
    losses = [action_loss(action_outputs(model(tokens[i:i + batch_size]), task_dim),
                          {key: v[i:i + batch_size] for key, v in targets.items()}, loss).item() for i in starts]
    model.train()
    return float(np.average(losses, weights=[len(tokens[i:i + batch_size]) for i in starts]))


def tile_windows(x, window):
    """[streams, L, ...] -> [streams * (L // window), window, ...]: consecutive windows of every stream."""
    n_windows = x.shape[1] // window
    return x[:, :n_windows * window].reshape(x.shape[0] * n_windows, window, *x.shape[2:])


def prepare(args):
    """Load the histories and build everything a run needs: streams, statistics, the model's config."""
    settings = envs.env_settings(args.env)
    data_dir = args.data or os.path.join("data", args.env, settings.algo)
    data = load_histories(data_dir, args.env, args.k, args.offsets)
    if data["split"] != "train":  # evaluate.py would score the model on the very tasks it learnt
        raise DataError(f"{data_dir} holds histories of the {data['split']} tasks: AD trains on --split train")
    n_tasks = data["obs"].shape[0]
    n_holdout = min(n_tasks - 1, max(1, round(args.holdout * n_tasks))) if args.holdout > 0 else 0
    n_train = n_tasks - n_holdout
    data["rew"] = reward_input(data["rew"], data["act"], envs.make_env(args.env), args.reward_input)
    stats = dataset_stats(data["obs"][:n_train], data["rew"][:n_train])
    tokens, targets = build_streams(data, stats, subgoals=args.arch == "hybrid" and args.valuable_subgoals)
    L = tokens.shape[2]
    task_dim = data["task"].shape[-1] if args.task_loss > 0 else 0
    task_stats = None
    if task_dim:  # every token's task target: the stream's hidden task, standardised over the training tasks
        task = torch.as_tensor(data["task"])
        task_stats = {"mean": task[:n_train].mean(0), "std": task[:n_train].std(0).clamp_min(1e-3)}
        task = (task - task_stats["mean"]) / task_stats["std"]
        targets["task"] = task[:, None, None].expand(*tokens.shape[:3], task_dim)
    if args.context != "full" and args.context > L:
        raise DataError(f"--context {args.context} is longer than a downsampled stream ({L} tokens); "
                        f"use --context full or a smaller N")

    def streams(tasks):  # [tasks, E, ...] -> [streams, ...] on the training device
        return (tokens[tasks].flatten(0, 1).to(args.device),
                {key: value[tasks].flatten(0, 1).to(args.device) for key, value in targets.items()})
    train, held = streams(slice(0, n_train)), streams(slice(n_train, n_tasks))
    curve, final = source_curve(data["returns"], args.k)
    obs_dim, act_dim = data["obs"].shape[-1], data["act"].shape[-1]
    d_in, d_out = model_io(obs_dim, act_dim, args.loss)
    d_out += task_dim
    shape = dict(d_in=d_in, d_out=d_out, max_len=L if args.context == "full" else args.context, obs_dim=obs_dim)
    config = arch_config(args.arch, vars(args), **shape)
    other = "transformer" if args.arch == "mamba" else "mamba"
    other_config = arch_config(other, {**getattr(settings, other), "d_state": args.d_state}, **shape)
    if args.params:
        config = match_params(config, args.params)
    print(f"AD-{args.arch} {config['d_model']}x{config['n_layer']}: {count_params(config):,} parameters; "
          f"AD-{other} at this env's size {other_config['d_model']}x{other_config['n_layer']}: "
          f"{count_params(other_config):,} (--params N picks the --d-model that gives about N)")
    meta = {"env": args.env, "algo": data["algo"], "data": os.path.abspath(data_dir), "n_tasks": n_tasks,
            "holdout_tasks": n_holdout, "k": args.k, "offsets": args.offsets, "episodes": L // settings.horizon,
            "horizon": settings.horizon, "obs_dim": obs_dim, "act_dim": act_dim, "loss": args.loss,
            "context": args.context, "reward_input": args.reward_input, "task_loss": args.task_loss,
            "task_dim": task_dim, "task_stats": task_stats, "stats": stats, "source_curve": curve,
            "source_final": final}
    noise_settings = os.path.join(data_dir, "noise.json")
    if os.path.isfile(noise_settings):  # noise.py's histories: evaluate.py scores against their expert
        with open(noise_settings) as f:
            meta["noise"] = json.load(f)
    return train, held, config, meta


RUN_KEYS = ("env", "algo", "data", "k", "offsets", "loss", "context", "reward_input", "task_loss")  # --resume keeps
# what a checkpoint from before a key existed was trained with
RUN_DEFAULTS = {"offsets": 1, "reward_input": "reward", "task_loss": 0.0, "task_dim": 0}


def train(args):
    """Train AD; under torchrun, with DistributedDataParallel (gloo on CPU, NCCL on CUDA, or --dist-backend):
    every process holds the training streams (they fit: about 0.2 GB for Pusher at the paper's scale) and
    trains on its slice of each global batch; rank 0 alone validates and writes checkpoints. Returns the
    best validation score."""
    rank, world = init_processes(args)
    train_set, held_set, model_config, meta = prepare(args)
    out_dir = args.out or os.path.join("out", args.env, args.arch)
    model, optimizer, generator, (start, best, log) = init_run(args, model_config, meta, out_dir, world)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    n_streams, L = train_set[0].shape[:2]
    total = args.epochs * iters_per_epoch(n_streams, L, args, world)
    validation = Validation(args, meta, held_set)
    if rank == 0:
        print(f"AD-{args.arch} on {args.env}: {n_streams} training streams of {L} tokens ({meta['episodes']} "
              f"episodes, k={args.k}) from {meta['n_tasks'] - meta['holdout_tasks']} tasks, {len(held_set[0])} "
              f"held-out streams; {total} updates of {args.batch_size * world} samples ({args.batch_size} per "
              f"process x {world}); device {args.device}, {'bf16' if args.bf16 else 'fp32'} matmuls -> {out_dir}")
        print(validation.describe())

    bar = tqdm(range(start, total), initial=start, total=total, desc=f"AD-{args.arch}", disable=rank > 0)
    model.train()
    loss_sum, n_summed = torch.zeros((), device=args.device), 0  # the losses since the last read, on the device
    for it in bar:
        loss = update(ddp, model, optimizer, lr_at(it, total, args),
                      sample_batch(*train_set, args, generator, rank, world), args)
        loss_sum += loss
        n_summed += 1
        evaluating = (it + 1) % args.eval_every == 0 or it + 1 == total
        reading = evaluating or (it + 1) % LOSS_READ_EVERY == 0
        if reading:
            mean_loss, last_loss = read_losses(torch.stack([loss_sum / n_summed, loss]), world,
                                               first=it + 1 - n_summed, last=it)
            loss_sum.zero_()
            n_summed = 0
        if evaluating and rank == 0:
            entry = validation(model, it + 1, last_loss)
            log.append(entry)
            improved = entry["val_score"] > best
            if improved:
                best = entry["val_score"]
            state = {"model_config": model_config, "model": model.state_dict(), "meta": meta, "args": vars(args),
                     "iter": it + 1, "total_updates": total, "best_score": best, "log": log, "world_size": world}
            save_checkpoints(out_dir, state, optimizer, generator, improved)
            tqdm.write(f"update {it + 1}: loss {entry['loss']:.4f}, held-out loss {entry['val_loss']:.4f}, "
                       f"validation return first {entry['val_first_episode']:.2f} -> last 5 {entry['val_last5']:.2f}"
                       f" (score {entry['val_score']:.2f}, best {best:.2f})")
        if reading:  # after the validation, so that its best shows at once
            bar.set_postfix(loss=f"{mean_loss:.4f}", best=f"{best:.2f}", refresh=False)
    if world > 1:  # leave together: a rank that exits while rank 0 still validates can abort in teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"best validation score {best:.2f}; checkpoint {out_dir}/ckpt.pt; evaluate with "
              f"`python evaluate.py {out_dir}`")
    return best


def init_processes(args):
    """This process's (rank, world size); under torchrun it joins the process group that DDP averages the
    gradients over."""
    rank, world = envs.dist_env()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:  # NCCL and Triton launch on the *current* GPU:
        torch.cuda.set_device(device)                        # make it this process's own
    if world > 1:
        auto = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(auto if args.dist_backend == "auto" else args.dist_backend)
    return rank, world


def init_run(args, model_config, meta, out_dir, world):
    """The model, its optimiser and the generator of batches and token noise: new and seeded by --seed, or
    with --resume as out_dir/last.pt left them. Also where the run stands: (next update, best score, log)."""
    os.makedirs(out_dir, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    envs.set_matmul_precision(args.device, args.dtype)
    torch.manual_seed(args.seed)
    model = build_model(model_config).to(args.device)
    optimizer = make_optimizer(model, args)
    generator = torch.Generator(args.device).manual_seed(args.seed)  # batches and noise drawn where they are used
    last = os.path.join(out_dir, "last.pt")
    if args.resume:
        progress = resume(last, model, optimizer, generator, model_config, meta, world)
    elif os.path.exists(last):  # never overwrite a run's best checkpoint silently
        raise DataError(f"{out_dir} already holds a run: pass --resume to continue it, or another --out")
    else:
        progress = 0, -math.inf, []
    return model, optimizer, generator, progress


def update(ddp, model, optimizer, lr, batch, args):
    """One AdamW step at learning rate lr on a batch (tokens, targets), matmuls in --dtype's precision, the
    gradient norm clipped; returns the loss, left on the device (reading it would wait for the device)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    tokens, targets = batch
    with envs.autocast(args.device, args.bf16):
        loss = training_loss(ddp, tokens, targets, args.loss, args.task_loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    return loss.detach()


class Validation:
    """What picks the checkpoint to keep: in-context rollouts on the validation tasks, scored by the strict
    score of their last 5 episodes (the training loss is a poor signal of rollouts), and the held-out loss."""

    def __init__(self, args, meta, held_set):
        self.args, self.meta, self.held_set = args, meta, held_set
        self.tasks = envs.sample_tasks(args.env, args.val_tasks, "val", seed=args.seed)
        self.zero, self.random = (envs.baseline_return(args.env, self.tasks, p) for p in ("zero", "random"))
        self.floor = strict_floor(self.zero, self.random)
        self.window = rollout_window(meta)  # validation sees what training saw: the window, or whole streams (None)

    def describe(self):
        # What copying the source's kept episodes would score: a k too large keeps too few of its late ones.
        ceiling = float(normalised(np.mean(self.meta["source_curve"][-5:]), self.floor, self.meta["source_final"]))
        return (f"validation: {self.args.val_tasks} tasks; zero action {self.zero:.2f}, random policy "
                f"{self.random:.2f}, source {self.meta['algo']} final {self.meta['source_final']:.2f} (strict score: "
                f"{self.floor:.2f} = 0, source = 1); the source's last 5 kept episodes would score {ceiling:.2f}")

    def __call__(self, model, it, loss):
        """The log entry of update `it` (whose training loss was `loss`); leaves the model in training mode."""
        args, meta = self.args, self.meta
        model.eval()
        returns = rollout(model, meta, self.tasks, meta["episodes"], n_seeds=args.val_seeds,
                          action_mode=args.action_mode, seed=args.seed, device=args.device, window=self.window)
        model.train()
        return {"iter": it, "loss": loss,
                "val_loss": validation_loss(model, *self.held_set, args.loss, window=self.window),
                "val_score": float(normalised(returns[:, :, -5:].mean(), self.floor, meta["source_final"])),
                "val_first_episode": float(returns[:, :, 0].mean()), "val_last5": float(returns[:, :, -5:].mean())}


def save_checkpoints(out_dir, state, optimizer, generator, improved):
    """ckpt.pt, the model evaluate.py reads, when the validation score `improved`; always last.pt, which adds
    what --resume needs (the optimiser and random states), and log.json. Each written atomically."""
    if improved:
        save_atomic(state, os.path.join(out_dir, "ckpt.pt"))
    save_atomic({**state, "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                 "torch_rng": torch.get_rng_state()}, os.path.join(out_dir, "last.pt"))
    envs.write_json_atomic(os.path.join(out_dir, "log.json"), state["log"], indent=1)


# Updates between reads of the loss: a read waits for the device to finish everything queued before it.
LOSS_READ_EVERY = 50


def read_losses(losses, world, first, last):
    """The device's loss tensor (here [mean since the last read, the latest update's]) averaged over the
    processes, read back. A non-finite mean means some update from `first` to `last` went NaN or inf (the
    sum keeps it): stop there, before a checkpoint is written."""
    if world > 1:
        torch.distributed.all_reduce(losses)
        losses /= world
    mean, latest = losses.tolist()
    if not math.isfinite(mean):
        raise FloatingPointError(f"the loss became {mean} at an update from {first} to {last}: lower --lr or "
                                 f"check the data")
    return mean, latest


def resume(path, model, optimizer, generator, model_config, meta, world):
    """Restore a killed run from last.pt, refusing one made with other data, settings or model."""
    if not os.path.isfile(path):
        raise DataError(f"--resume: no {path} to resume from; drop --resume to start a new run")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("world_size", 1) != world:
        raise DataError(f"--resume: {path} was trained by {ckpt.get('world_size', 1)} process(es), this run has "
                        f"{world}: resume with the same number (the global batch and data order depend on it)")
    if ckpt["model_config"] != model_config:
        raise DataError(f"--resume: {path} holds a {ckpt['model_config']} model, this run asks for {model_config}")
    for key in RUN_KEYS:
        old = ckpt["meta"].get(key, RUN_DEFAULTS.get(key))
        if old != meta[key]:
            raise DataError(f"--resume: {path} was trained with {key}={old!r}, this run has "
                            f"{meta[key]!r}; use another --out or the old settings")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    try:
        generator.set_state(ckpt["generator"])
    except RuntimeError:  # a CPU generator's state does not fit a CUDA one, nor the other way round
        raise DataError(f"--resume: {path} was trained on another kind of device than {generator.device.type}: "
                        f"resume on the kind it was trained on") from None
    torch.set_rng_state(ckpt["torch_rng"])
    print(f"resuming from update {ckpt['iter']} of {path}")
    return ckpt["iter"], ckpt["best_score"], ckpt["log"]


# ----------------------------------------------------------------------------- command line

def context_arg(text):
    return text if text == "full" else envs.positive_int(text)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="reacher_goal", choices=list(envs.ENVS), help="meta-RL task family")
    p.add_argument("--arch", default="mamba", choices=ARCHS, help="sequence model")
    p.add_argument("--data", default=None, help="history directory; None: data/ENV/ALGO of envs.ENVS")
    p.add_argument("--out", default=None, help="checkpoint directory; None: out/ENV/ARCH")
    p.add_argument("--k", type=envs.positive_int, default=None, help="keep every k-th episode; None: envs.ENVS's")
    p.add_argument("--offsets", type=envs.positive_int, default=1,
                   help="streams read from each history, from start episodes spread over [0, k)")
    p.add_argument("--context", type=context_arg, default="full", help="full (whole streams) or N tokens")
    p.add_argument("--loss", default="nll", choices=("nll", "mse"), help="action loss")
    p.add_argument("--d-model", type=envs.positive_int, default=None, help="model width; None: envs.ENVS's")
    p.add_argument("--n-layer", type=envs.positive_int, default=None, help="layers; None: envs.ENVS's")
    p.add_argument("--d-state", type=envs.positive_int, default=16, help="Mamba's SSM state size N")
    p.add_argument("--n-head", type=envs.positive_int, default=None, help="transformer heads; None: envs.ENVS's")
    p.add_argument("--d-ff", type=envs.positive_int, default=None, help="transformer MLP width; None: envs.ENVS's")
    p.add_argument("--segment", type=envs.positive_int, default=None,
                   help="DM-H: steps per segment, one sub-goal each (the paper's c); None: envs.ENVS's")
    p.add_argument("--attn-layers", type=envs.positive_int, default=None,
                   help="DM-H: transformer layers (--n-layer counts its Mamba layers); None: envs.ENVS's")
    p.add_argument("--valuable-subgoals", action=argparse.BooleanOptionalAction, default=True,
                   help="DM-H: train a second pass on valuable sub-goals (DM-H 4.3); --no-...: the ablation")
    p.add_argument("--params", type=envs.positive_int, default=None,
                   help="pick --d-model so that the model has about this many parameters (to match archs)")
    p.add_argument("--epochs", type=envs.positive_int, default=450, help="passes over the training tokens (App. B)")
    p.add_argument("--batch-size", type=envs.positive_int, default=16, help="streams (or windows) a batch")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    p.add_argument("--warmup-iters", type=envs.positive_int, default=100, help="linear warm-up updates")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay; None: envs.ENVS's")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--reward-input", default="reward", choices=("reward", "task"),
                   help="what a token's reward slot holds: the env's reward (the paper) or its task part, the reward "
                        "without the control cost of the action taken (see reward_input)")
    p.add_argument("--task-loss", type=float, default=0.0,
                   help="weight of an auxiliary loss on a guess of the hidden task at every token (0: AD as the "
                        "paper; a change of method: it asks the model to read the task, which AD's loss does not)")
    p.add_argument("--noise", type=float, default=0.05, help="std of the Gaussian noise added to input tokens")
    p.add_argument("--holdout", type=float, default=0.05, help="fraction of training tasks held out for a loss")
    p.add_argument("--eval-every", type=envs.positive_int, default=200, help="updates between validation rollouts")
    p.add_argument("--val-tasks", type=envs.positive_int, default=10, help="validation tasks (split 'val')")
    p.add_argument("--val-seeds", type=envs.positive_int, default=3, help="rollouts per validation task")
    p.add_argument("--action-mode", default="sample", choices=("mean", "sample"), help="validation rollout actions")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="torchrun's collectives; auto: nccl on CUDA, gloo elsewhere (gloo also carries CUDA "
                        "tensors, and lets two processes share one GPU, which NCCL refuses)")
    p.add_argument("--threads", type=envs.positive_int, default=None, help="torch CPU threads; None: torch's")
    p.add_argument("--dtype", default=None, choices=("auto", "bf16", "fp32", "fp32-strict"),
                   help="matmul precision of training (autocast; weights, optimiser and loss stay fp32); auto = "
                        "bf16 where the hardware has bf16 units (AMX, AVX512-BF16, recent GPUs); fp32 is TF32 "
                        "on CUDA's tensor cores, fp32-strict is not; None: auto on CUDA, fp32 elsewhere")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt "
                                                         "(with as many processes as it was trained with)")
    return p


def parse_args(argv=None):
    """The command line, with the defaults of --env's ENVS row (envs.parse_with_env_defaults); what is left
    None there (k, the model's sizes, weight decay) comes from the row too, after the arch is known."""
    args = envs.parse_with_env_defaults(build_parser(), argv, lambda env: envs.ENVS[env].ad)
    if args.task_loss < 0:
        sys.exit(f"error: --task-loss {args.task_loss} must be 0 (AD as the paper) or positive")
    settings = envs.ENVS[args.env]
    args.k = args.k or settings.k
    sizes = getattr(settings, args.arch)
    args.d_model = args.d_model or sizes["d_model"]
    args.n_layer = args.n_layer or sizes["n_layer"]
    attention = settings.hybrid if args.arch == "hybrid" else settings.transformer
    args.n_head = args.n_head or attention["n_head"]
    args.d_ff = args.d_ff or attention["d_ff"]
    args.segment = args.segment or settings.hybrid["segment"]
    args.attn_layers = args.attn_layers or settings.hybrid["attn_layers"]
    args.weight_decay = settings.weight_decay if args.weight_decay is None else args.weight_decay
    args.device = envs.resolve_device(args.device)
    # bf16 on CUDA by default: PyTorch's flash attention takes 16-bit inputs only (it pads head sizes such as
    # Reacher's 42 to a multiple of 8), and the fp32 memory-efficient kernel needs head sizes that are
    # multiples of 4, so fp32 at 42 dims a head falls back to attention that materialises [B, 4, T, T].
    # On a CPU the default stays fp32: on ad.py's small models bf16 gains little there, and often loses.
    args.dtype = args.dtype or ("auto" if torch.device(args.device).type == "cuda" else "fp32")
    args.bf16 = envs.use_bf16(args.dtype, args.device)
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        train(args)
    except (OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
