"""The machinery every RL script here shares (sac.py, droq.py, ppo.py), so that each of them reads as its
algorithm alone:
  - task-batched layers: n independent networks evaluated as one batched matmul (TaskLinear, task_mlp),
    and the quadrature that gives a policy's mean and std in [-1, 1] action space (action_moments);
  - the learning history, which doubles as the replay buffer (HistoryBuffer);
  - one random stream per task (TaskRandom), so that a task's history does not depend on the tasks it
    trains beside;
  - the command line every script starts from, with the per-env defaults of envs.ENVS (base_parser,
    parse_args);
  - the run over many tasks: cache-sized chunks trained together, each task seeded by its own index,
    one history file per task written atomically, resume after a kill, and torchrun to split the tasks
    over processes and machines (run, main).

Many tasks at once: every weight carries a leading task axis; the loss is the sum of the per-task losses,
so each task gets exactly its own gradient, and Adam is element-wise, so one Adam over the stacked weights
is exactly independent Adams (no global gradient clipping: it would couple the tasks). On a CPU this saves
kernel calls and lets small nets use every core (RESULTS.md); on a GPU it is what fills the device.
"""
import argparse
import datetime
import functools
import math
import os
import sys
import time

import torch
import torch.nn as nn

import envs

# MKL picks its matmul kernels by where the operands sit in memory, so task i's slice of a task-batched
# matmul could round differently beside another number of tasks, and its history would depend on how the
# run was split. Strict conditional numerical reproducibility makes every result depend on the values
# alone. MKL reads the setting at its first call, which no import makes.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


# ----------------------------------------------------------------------------- task-batched networks

class TaskLinear(nn.Module):
    """n independent linear layers in one batched matmul: x [n, B, d_in] -> [n, B, d_out]."""

    def __init__(self, n, d_in, d_out):
        super().__init__()
        bound = 1 / math.sqrt(d_in)  # nn.Linear's default initialisation, per layer
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, d_out).uniform_(-bound, bound))

    def forward(self, x):
        if self.weight.shape[2] == 1:
            # One output (a Q or value head): multiply and sum. As a matmul it is a matrix-vector product,
            # which MKL rounds differently for one network than for a batch of them, so a task's history
            # would depend on whether it trained alone (--parallel 1) or beside others.
            return (x * self.weight.mT).sum(-1, keepdim=True) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)


def task_mlp(n, d_in, hidden, d_out, n_hidden=2, activation=functools.partial(nn.ReLU, inplace=True)):
    sizes = [d_in] + [hidden] * n_hidden
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [TaskLinear(n, a, b), activation()]
    return nn.Sequential(*layers, TaskLinear(n, sizes[-1], d_out))


def normal_quantile_nodes(n=32):
    """n points whose average approximates E[f(x)], x ~ N(0, 1): the midpoints of n equal-probability
    bins, scaled to unit variance. Unlike Gauss-Hermite nodes they stay accurate when f is nearly a
    step, as tanh(mu + std * x) is for a wide policy."""
    nodes = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return (nodes / nodes.square().mean().sqrt()).float()


def action_moments(mu, std, squash, nodes):
    """Mean and std of squash(u), u ~ N(mu, std) elementwise, by quadrature on `nodes`
    (normal_quantile_nodes): SAC squashes with tanh, PPO clips to [-1, 1]."""
    a = squash(mu[..., None] + std[..., None] * nodes)
    mean = a.mean(-1)
    var = a.square().mean(-1) - mean.square()
    return mean, var.clamp_min(0).sqrt()


# ----------------------------------------------------------------------------- per-task randomness

class TaskRandom:
    """One random stream per task: every draw is [task, ...], and task i's slice comes from its own
    generator. A batched run draws for each task exactly what a run of that task alone would, in the
    same order, so exploration noise, minibatches and dropout masks depend on the task's seed alone,
    not on which tasks share its chunk, its --parallel or its torchrun process."""

    def __init__(self, seeds, device="cpu"):
        self.device = device
        self.generators = [torch.Generator(device) for _ in seeds]
        self.seed(seeds)

    def seed(self, seeds):
        for generator, seed in zip(self.generators, seeds, strict=True):
            generator.manual_seed(seed)

    def __len__(self):
        return len(self.generators)

    def get_state(self):
        """Every task's generator state, for a run's resume file (expert.py)."""
        return [generator.get_state() for generator in self.generators]

    def set_state(self, states):
        for generator, state in zip(self.generators, states, strict=True):
            generator.set_state(state)

    def _draw(self, sample, shape):
        if shape[0] != len(self):
            raise ValueError(f"draw of shape {tuple(shape)} for {len(self)} tasks")
        return torch.stack([sample(generator) for generator in self.generators])

    def rand(self, shape):
        """U[0, 1) of `shape`, task axis first."""
        return self._draw(lambda g: torch.rand(shape[1:], generator=g, device=self.device), shape)

    def randn(self, shape):
        """N(0, 1) of `shape`, task axis first."""
        return self._draw(lambda g: torch.randn(shape[1:], generator=g, device=self.device), shape)

    def randint(self, high, shape):
        """Integers uniform in [0, high) of `shape`, task axis first."""
        return self._draw(lambda g: torch.randint(high, shape[1:], generator=g, device=self.device), shape)


# ----------------------------------------------------------------------------- history = replay buffer

class HistoryBuffer:
    """Every transition of the run, in order: tensors [task, env, step, ...]. Sampled as a replay
    buffer (uniformly over the last `capacity` transitions of each task) and saved as the history.
    The next observation of a step is the following step's observation, except at an episode's end,
    where it is kept in `final_obs` (the next step starts a fresh episode)."""
    FIELDS = ("obs", "act", "act_mean", "act_std", "rew")  # [task, env, step, ...]

    def __init__(self, n_tasks, n_envs, n_steps, horizon, obs_dim, act_dim, device):
        if n_steps % horizon:
            raise ValueError(f"a history holds whole episodes: {n_steps} steps is not a multiple of {horizon}")
        shape = (n_tasks, n_envs, n_steps)
        self.obs = torch.zeros(*shape, obs_dim, device=device)
        self.act, self.act_mean, self.act_std = (torch.zeros(*shape, act_dim, device=device) for _ in range(3))
        self.rew = torch.zeros(*shape, device=device)
        self.final_obs = torch.zeros(n_tasks, n_envs, n_steps // horizon, obs_dim, device=device)
        self.horizon, self.n = horizon, 0

    def add(self, obs, act, rew, next_obs, act_mean, act_std):
        """Append one vector step: each argument [task, env, ...]."""
        t = self.n
        self.obs[:, :, t], self.act[:, :, t], self.rew[:, :, t] = obs, act, rew
        self.act_mean[:, :, t], self.act_std[:, :, t] = act_mean, act_std
        if (t + 1) % self.horizon == 0:
            self.final_obs[:, :, t // self.horizon] = next_obs
        else:
            self.obs[:, :, t + 1] = next_obs
        self.n += 1

    def state_dict(self):
        """The transitions so far, for a run's resume file (expert.py), which is written at an episode's end:
        nothing lies past them then. Copies, since saving a slice would save its whole tensor."""
        filled = {name: getattr(self, name)[:, :, :self.n].clone() for name in self.FIELDS}
        return {"n": self.n, "final_obs": self.final_obs[:, :, :self.n // self.horizon].clone(), **filled}

    def load_state_dict(self, state):
        self.n = state["n"]
        for name in ("final_obs", *self.FIELDS):
            getattr(self, name)[:, :, :state[name].shape[2]] = state[name]

    def sample(self, batch_size, capacity, rng):
        """batch_size transitions per task, each task's from its own stream of `rng` (TaskRandom) ->
        obs, act, rew, next_obs, each [task, batch, ...]."""
        T, E = self.obs.shape[:2]
        first = max(0, self.n - capacity // E)  # the oldest step still in the replay window
        span = self.n - first
        index = rng.randint(E * span, (T, batch_size))  # one draw picks the env and the step
        env, t = index // span, first + index % span
        task = torch.arange(T, device=self.obs.device)[:, None]
        return self.obs[task, env, t], self.act[task, env, t], self.rew[task, env, t], self.next_obs(task, env, t)

    def next_obs(self, task, env, t):
        """The observation that followed step t of (task, env); the index tensors broadcast."""
        ends = ((t + 1) % self.horizon == 0)[..., None]
        following = (t + 1).clamp(max=self.obs.shape[2] - 1)  # only ever read where not `ends`
        return torch.where(ends, self.final_obs[task, env, t // self.horizon], self.obs[task, env, following])

    def task_arrays(self, i):
        """Task i's history as save_history takes it: numpy arrays [env, episode, step, ...]."""
        E, S = self.obs.shape[1:3]

        def by_episode(x):
            return x[i].reshape(E, S // self.horizon, self.horizon, *x.shape[3:]).cpu().numpy()
        return {name: by_episode(getattr(self, name)) for name in self.FIELDS}


# ----------------------------------------------------------------------------- the command line

def base_parser(algo, description):
    """The command line of every RL script (sac.py, droq.py, ppo.py); each adds its own options."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="reacher_goal", choices=list(envs.ENVS), help="meta-RL task family")
    p.add_argument("--tasks", type=envs.positive_int, default=None,
                   help="number of training tasks; None: the env's in envs.ENVS")
    p.add_argument("--steps", type=envs.positive_int, default=None,
                   help="env steps per task; None: the env's in envs.ENVS")
    p.add_argument("--parallel", type=envs.positive_int, default=None,
                   help="train at most this many tasks at a time; None: all on a GPU, on a CPU as "
                        "many as stay cache-friendly (e.g. 24 for 256-unit nets)")
    p.add_argument("--seed", type=int, default=0, help="seeds the training tasks, envs and networks")
    p.add_argument("--split", default="train", choices=("train", "val", "test"),
                   help="which tasks to learn: AD's training tasks, or held-out ones (a baseline that adapts "
                        "from a test task's own data, macaw.py, reads the source's histories on them)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--threads", type=envs.positive_int, default=None,
                   help="torch CPU threads; None: torch's, one per core (use 1 per job when "
                        "running several jobs at once)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32", "fp32-strict"),
                   help="matmul precision of the updates (weights and optimiser stay fp32); auto = bf16 "
                        "where the hardware has bf16 units (AMX, AVX512-BF16, recent GPUs), else fp32; "
                        "fp32 is TF32 on CUDA's tensor cores, fp32-strict is not")
    p.add_argument("--out", default=None, help=f"output directory; None: data/ENV/{algo}, "
                                               f"data/ENV/{algo}_SPLIT for another --split")
    p.add_argument("--n-envs", type=envs.positive_int, default=5, help="parallel envs per task")
    p.add_argument("--gamma", type=float, default=0.99, help="discount")
    return p


def parse_args(parser, argv, algo):
    """The command line, with the defaults of --env's ENVS row and its overrides for `algo`
    (envs.parse_with_env_defaults)."""
    def defaults(env):
        settings = envs.ENVS[env]
        return {"tasks": settings.train_tasks, "steps": settings.steps_per_task, **settings.rl.get(algo, {})}
    args = envs.parse_with_env_defaults(parser, argv, defaults)
    try:
        args.device = envs.resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    args.bf16 = envs.use_bf16(args.dtype, args.device)
    return args


# ----------------------------------------------------------------------------- the run over many tasks

def task_seed(seed, index):
    """The seed of task `index` of a run: its networks, its random stream (TaskRandom: warm-up actions,
    exploration, minibatches, dropout) and its envs depend on it alone, not on --parallel or on how many
    processes share the run."""
    return seed * 100_003 + index


def init_per_task(agent, seeds, make_one):
    """Give task i of a task-batched agent the initial weights that a one-task agent built right after
    torch.manual_seed(seeds[i]) gets, and a random stream (agent.rng, a TaskRandom) seeded by seeds[i].
    Tensors with a task axis first (weights, targets, entropy weights; twin critics hold 2 networks per
    task) are copied slice by slice; shared constants are left alone."""
    agent.rng.seed(seeds)
    state = agent.state_dict()
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        for name, one in make_one().state_dict().items():
            many = state[name]
            if many.dim() and many.shape[0] == len(seeds) * one.shape[0]:
                many.view(len(seeds), *one.shape)[i].copy_(one)


def run(args, algo, make_agent, learn):
    """Train every pending task of the run, --parallel at a time, with `learn` (sac.collect_and_learn for
    SAC and DroQ, ppo.collect_and_learn for PPO), and write one history file per task. Finished tasks are skipped,
    so a killed run resumes where it stopped. Under torchrun each process takes every world-size-th
    pending task (one machine or several sharing a filesystem); rank 0 plots once all are done."""
    out = args.out or os.path.join("data", args.env, algo if args.split == "train" else f"{algo}_{args.split}")
    horizon = envs.ENVS[args.env].horizon
    n_episodes = args.steps // (args.n_envs * horizon)
    if n_episodes < 1:
        raise ValueError(f"--steps {args.steps} is less than one episode per env "
                         f"({args.n_envs} envs x horizon {horizon})")
    steps = n_episodes * args.n_envs * horizon
    rank, world = envs.dist_env()
    if world > 1:  # gloo for a barrier only; no timeout worth the name: ranks may finish hours apart
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    envs.prepare_out_dir(out)
    tasks = envs.sample_tasks(args.env, args.tasks, args.split, seed=args.seed)
    todo = envs.pending_tasks(out, tasks, env=args.env, algo=algo, seed=args.seed, steps=steps)
    if world > 1:
        torch.distributed.barrier()  # every rank has read the same pending list before any writes
    mine = todo[rank::world]
    print(f"{algo} on {args.env}: {args.tasks} tasks x {steps} steps ({n_episodes} episodes x {args.n_envs} "
          f"envs), {len(todo)} to do" + (f", {len(mine)} of them on rank {rank} of {world}" if world > 1 else "")
          + f", device {args.device}, {'bf16' if args.bf16 else 'fp32'} updates -> {out}")
    if args.threads:
        torch.set_num_threads(args.threads)
    envs.set_matmul_precision(args.device, args.dtype)
    parallel = args.parallel or default_parallel(args, len(mine))
    for start in range(0, len(mine), parallel):
        chunk = mine[start:start + parallel]
        seeds = [task_seed(args.seed, i) for i in chunk]
        vec = envs.MultiTaskVecEnv(args.env, tasks[chunk], args.n_envs, seed=args.seed, task_ids=chunk)
        agent = make_agent(args, len(chunk), vec.obs_dim, vec.act_dim)
        init_per_task(agent, seeds, lambda: make_agent(args, 1, vec.obs_dim, vec.act_dim))
        desc = f"tasks {chunk[0]}-{chunk[-1]}" if len(chunk) > 1 else f"task {chunk[0]}"
        t0 = time.perf_counter()
        buf = learn(agent, vec, n_episodes * horizon, args, desc)
        seconds = time.perf_counter() - t0
        for i, task_index in enumerate(chunk):
            envs.save_history(envs.history_path(out, task_index), **buf.task_arrays(i), task=tasks[task_index],
                              env=args.env, algo=algo, seed=args.seed, steps=steps, split=args.split)
        print(f"  saved {len(chunk)} histories; {len(chunk) * steps / seconds:.0f} env steps/s in all")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        final = envs.plot_learning_curves(out, os.path.join(out, "learning_curves.png"))
        print(f"mean return over the last 10% of episodes: {final:.2f}; curves: {out}/learning_curves.png")


CPU_ACTIVATION_BUDGET = 12 * 2 ** 20  # bytes


def default_parallel(args, n_tasks):
    """All tasks at once on a GPU. On a CPU, batching more tasks stops paying once one layer's
    activations (2 networks x tasks x batch x hidden floats) outgrow the caches; CPU_ACTIVATION_BUDGET
    puts the chunk near where `bench.py rl` found the most env steps per second on 2 cores (RESULTS.md):
    24 tasks of 256-unit nets at batch 256, 96 of 64-unit ones."""
    if args.device.startswith("cuda"):
        return n_tasks
    per_task = 2 * args.batch_size * args.hidden * 4
    return max(1, min(n_tasks, CPU_ACTIVATION_BUDGET // per_task))


def main(argv, algo, parser, make_agent, learn):
    """The entry point of every RL script: its parser, its agent factory and its collect-and-learn loop."""
    args = parse_args(parser, argv, algo)
    try:
        run(args, algo, make_agent, learn)
    except (OSError, ValueError) as e:  # bad --out, mismatched old files, too few steps: one line
        sys.exit(f"error: {e}")
