"""Task-conditioned experts: the demonstrators of noise-distilled learning histories (noise.py).

AD needs histories in which a policy gets better, episode after episode, on a task it cannot see. An RL
learner makes them (sac.py, ppo.py, droq.py), but what AD must then fit is that learner's changing
weights. AD-eps (Zisman et al. 2023, "Emergence of In-Context Reinforcement Learning from Noise
Distillation") makes them from one good policy instead, whose actions are mixed with noise that is
annealed away over the history. That policy is trained here, once per env family: a SAC agent that *sees*
the task (its observation is the env's own with the hidden task vector appended; on Pusher, with the
cylinder moved to where it is now: envs.PusherGoal.expert_view), on tasks drawn afresh
from the task distribution at every episode, so that one network acts well on every task, the unseen
test tasks included.

SAC for every env, also where the paper's source algorithm is PPO (Pusher) or DroQ (Ant): the expert is
not a learning history, only a good policy, and one off-policy learner for every env keeps this file
short (each shipped expert's returns are in the expert.json beside it). One network learns all tasks
(sac.py's task axis has length 1; its n_envs envs each play their own task), with the per-env SAC
settings of envs.ENVS and the expert's own in ENVS[env].expert.

Only the actor is kept (checkpoints/experts/ENV/expert.pt, loaded with weights_only=True) and it acts
deterministically: tanh of the Gaussian's mean. After training, the expert is scored on the env's test
tasks, also when told the task distribution's mean instead of the task (how far a policy that ignores
the task gets); both go to expert.json beside it.

Training saves itself every few minutes (resume.pt in --out, at an episode's end); --resume continues a killed
run from there and ends with the very weights an unbroken run would have.

    python expert.py --env half_cheetah_vel               # -> checkpoints/experts/half_cheetah_vel/
    python expert.py --env point_goal --steps 20000 --out /tmp/pg_expert
    python expert.py --env ant_dir --resume                # continue a killed run
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

import envs
import rl
import sac

DEFAULTS = dict(n_envs=10, gradient_steps=3, lr=1e-3, alpha_init=0.1)  # ENVS[env].expert overrides these


class TaskVisibleVecEnv:
    """n_envs envs of one family, each drawing a new task from the task distribution at every reset and
    showing it: obs = [the env's obs, task]. It is shaped as a MultiTaskVecEnv with one task row, so that
    sac.collect_and_learn trains one SAC network on all of them."""

    def __init__(self, name, n_envs, seed=0):
        self.sample_task = envs.env_settings(name).sample_task
        self.rng = np.random.default_rng([seed, 0xE6])  # its own stream, apart from sample_tasks' splits
        self.vec = envs.MultiTaskVecEnv(name, self.draw(n_envs), 1, seed=seed)
        self.task_dim = self.vec.envs[0][0].task.shape[0]
        self.n_tasks, self.n_envs, self.horizon = 1, n_envs, self.vec.horizon
        self.obs_dim, self.act_dim = self.vec.obs_dim + self.task_dim, self.vec.act_dim

    def get_state(self):
        """What the next resets draw from: the task stream and every env's np_random. A MuJoCo env's reset
        clears its simulator (mj_resetData) before reset_model draws, so nothing else carries over."""
        return {"tasks": self.rng.bit_generator.state,
                "envs": [row[0].np_random.bit_generator.state for row in self.vec.envs]}

    def set_state(self, state):
        self.rng.bit_generator.state = state["tasks"]
        for row, env_state in zip(self.vec.envs, state["envs"], strict=True):
            row[0].np_random.bit_generator.state = env_state

    def draw(self, n):
        return np.stack([self.sample_task(self.rng) for _ in range(n)]).astype(np.float32)

    def reset(self):
        for row, task in zip(self.vec.envs, self.draw(self.n_envs)):
            row[0].task = task  # every MetaTask reads self.task at reset and in its reward
        return self.show(self.vec.reset())

    def step(self, actions):
        """actions [1, n_envs, act_dim] -> obs [1, n_envs, obs_dim], reward [1, n_envs], episode_over."""
        obs, rew, episode_over = self.vec.step(actions.reshape(self.n_envs, 1, -1))
        return self.show(obs), rew.reshape(1, -1), episode_over

    def show(self, obs):
        tasks = np.stack([row[0].task for row in self.vec.envs])
        return np.concatenate([obs[:, 0], self.vec.expert_views(tasks[:, None])[:, 0]], -1)[None]


class Expert(nn.Module):
    """A trained task-conditioned SAC actor, acting deterministically: a = tanh(mu(obs, task))."""

    def __init__(self, env, obs_dim, task_dim, act_dim, hidden):
        super().__init__()
        self.config = dict(env=env, obs_dim=obs_dim, task_dim=task_dim, act_dim=act_dim, hidden=hidden)
        self.actor = sac.Actor(1, obs_dim + task_dim, act_dim, hidden)

    @torch.no_grad()
    def forward(self, obs, task):
        """obs [..., obs_dim], task [..., task_dim] (tensors or arrays) -> actions [..., act_dim] in [-1, 1]."""
        x = torch.cat([torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(task, dtype=torch.float32)], -1)
        mu, _ = self.actor(x.reshape(1, -1, x.shape[-1]))
        return torch.tanh(mu).reshape(*x.shape[:-1], -1)


def expert_path(path):
    return os.path.join(path, "expert.pt") if not path.endswith(".pt") else path


def load_expert(path, env=None):
    """The Expert saved in `path` (a directory or its expert.pt); with `env`, it must be that env's."""
    path = expert_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no expert at {path}: train one with `python expert.py --env {env or 'ENV'}`")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        expert = Expert(**saved["config"])
        expert.actor.load_state_dict(saved["actor"])
    except Exception as e:  # unpickling, missing keys and shape errors all mean another kind of file
        raise ValueError(f"{path} is not an expert written by expert.py ({str(e).splitlines()[0][:120]})") from None
    if env is not None and expert.config["env"] != env:
        raise ValueError(f"{path} is an expert for {expert.config['env']}, not {env}")
    return expert.eval()


def expert_returns(expert, tasks, n_envs=3, seed=0, told=None):
    """Mean return of one episode on each task [n_tasks] (n_envs copies each). `told`: the task vector the
    expert is shown instead of the true one (e.g. the distribution's mean: a policy blind to the task)."""
    name = expert.config["env"]
    vec = envs.MultiTaskVecEnv(name, tasks, n_envs, seed=seed)
    shown = np.broadcast_to(tasks[:, None] if told is None else told, (len(tasks), n_envs, tasks.shape[-1])).copy()
    obs, total, episode_over = vec.reset(), 0.0, False
    while not episode_over:
        obs, rew, episode_over = vec.step(expert(obs, vec.expert_views(shown)).numpy())
        total = total + rew
    return total.mean(1)


def mean_task(name, n=10_000):
    """The task distribution's mean, estimated on n training-split draws."""
    return envs.sample_tasks(name, n, "train", seed=12345).mean(0)


def own_and_told(expert, tasks, n_envs=3, seed=0):
    """Per-task returns [n_tasks] of the expert shown each task, and shown the distribution's mean instead."""
    told = mean_task(expert.config["env"])
    return (expert_returns(expert, tasks, n_envs, seed),
            expert_returns(expert, tasks, n_envs, seed, told=told), told)


def score(expert, n_tasks=10, seed=0):
    """The expert on the env's test tasks (evaluate.py's: split "test", --seed), shown the task and shown
    the distribution's mean: the figures of expert.json."""
    tasks = envs.sample_tasks(expert.config["env"], n_tasks, "test", seed=seed)
    own, blind, told = own_and_told(expert, tasks, seed=seed)
    return {"test_tasks": n_tasks, "test_seed": seed, "test_return": float(own.mean()),
            "test_return_per_task": own.tolist(), "told_mean_task_return": float(blind.mean()),
            "told_mean_task_return_per_task": blind.tolist(), "mean_task": told.tolist()}


def train(args):
    """SAC on TaskVisibleVecEnv, saved to --out/resume.pt as it goes and with --resume continued from there;
    returns the Expert (its actor), the training curve's episode returns and the minutes trained (over every
    session of a resumed run)."""
    vec = TaskVisibleVecEnv(args.env, args.n_envs, seed=args.seed)
    n_steps = args.steps // (args.n_envs * vec.horizon) * vec.horizon  # vector steps, whole episodes
    if n_steps == 0:
        raise ValueError(f"--steps {args.steps} is less than one episode of {args.n_envs} envs")
    torch.manual_seed(args.seed)
    agent = sac.make_sac(args, 1, vec.obs_dim, vec.act_dim)
    agent.rng.seed([args.seed])
    buf = rl.HistoryBuffer(vec.n_tasks, vec.n_envs, n_steps, vec.horizon, vec.obs_dim, vec.act_dim, args.device)
    path = resume_path(args.out)
    if args.resume:
        start, seconds_before = load_resume(path, args, agent, vec, buf)
    elif os.path.exists(path):  # never start over a killed run's progress silently
        raise ValueError(f"{args.out} holds a killed run ({path}): pass --resume to continue it, or another --out")
    else:
        start, seconds_before = 0, 0.0
    t0 = last_save = time.perf_counter()

    def save_now_and_then(t):  # at each episode's end; the first one past --checkpoint-every minutes saves
        nonlocal last_save
        if time.perf_counter() - last_save >= 60 * args.checkpoint_every:
            save_resume(path, args, agent, vec, buf, t, seconds_before + time.perf_counter() - t0)
            last_save = time.perf_counter()
    sac.collect_and_learn(agent, vec, n_steps, args, f"{args.env} expert", buf=buf, start=start,
                          on_episode_end=save_now_and_then)
    episode_returns = buf.rew[0].reshape(args.n_envs, -1, vec.horizon).sum(-1).mean(0)
    expert = Expert(args.env, vec.vec.obs_dim, vec.task_dim, vec.act_dim, args.hidden)
    expert.actor.load_state_dict(agent.actor.state_dict())
    return expert.eval(), episode_returns, (seconds_before + time.perf_counter() - t0) / 60


# What a resumed run must share with the killed one: each shapes the buffer, the random draws or the updates.
RESUME_KEYS = ("env", "steps", "n_envs", "seed", "gamma", "lr", "batch_size", "warmup", "buffer_size", "tau",
               "alpha_init", "hidden", "gradient_steps", "bf16")


def resume_path(out):
    return os.path.join(out, "resume.pt")


def run_settings(args):
    """RESUME_KEYS' values, and the kind of device: a CPU's random streams do not load into a GPU's."""
    return {**{key: getattr(args, key) for key in RESUME_KEYS}, "device": torch.device(args.device).type}


def optimizers(agent):
    return agent.actor_opt, agent.critic_opt, agent.alpha_opt


def save_resume(path, args, agent, vec, buf, t, seconds):
    """All that the run, t vector steps in at an episode's end, needs to go on exactly as it would have:
    the networks, Adam's moments, every random stream and the buffer so far. Written atomically: a kill
    while writing leaves the previous file."""
    state = {"settings": run_settings(args), "t": t, "seconds": seconds, "agent": agent.state_dict(),
             "optimizers": [opt.state_dict() for opt in optimizers(agent)], "rng": agent.rng.get_state(),
             "envs": vec.get_state(), "buffer": buf.state_dict()}
    envs.write_atomic(path, lambda f: torch.save(state, f))


def load_resume(path, args, agent, vec, buf):
    """Restore what save_resume wrote into the fresh agent, envs and buffer, refusing a file made with other
    settings; returns (vector steps done, seconds trained)."""
    if not os.path.isfile(path):
        raise ValueError(f"--resume: no {path} to resume from; drop --resume to start a new run")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in run_settings(args).items():
        if state["settings"][key] != value:
            flag = {"bf16": "--dtype"}.get(key, "--" + key.replace("_", "-"))
            raise ValueError(f"--resume: {path} was trained with {key}={state['settings'][key]!r}, this run has "
                             f"{value!r}: resume with its {flag}, or use another --out")
    agent.load_state_dict(state["agent"])
    for opt, opt_state in zip(optimizers(agent), state["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
    agent.rng.set_state(state["rng"])
    vec.set_state(state["envs"])
    buf.load_state_dict(state["buffer"])
    print(f"resuming from vector step {state['t']} of {path}")
    return state["t"], state["seconds"]


def save(expert, info, out):
    """expert.pt (the actor and its config) and expert.json (`info`), each written atomically."""
    envs.write_atomic(expert_path(out), lambda f: torch.save({"config": expert.config,
                                                            "actor": expert.actor.state_dict()}, f))
    envs.write_json_atomic(os.path.join(out, "expert.json"), info, indent=1)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="reacher_goal", choices=list(envs.ENVS), help="meta-RL task family")
    p.add_argument("--steps", type=envs.positive_int, default=None,
                   help="env steps in all (over every env); None: ENVS[env].expert's")
    p.add_argument("--n-envs", type=envs.positive_int, help="envs, each on its own task, stepped together")
    p.add_argument("--seed", type=int, default=0, help="seeds the networks, envs and task draws")
    p.add_argument("--gamma", type=float, default=0.99, help="discount")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--threads", type=envs.positive_int, default=None, help="torch CPU threads; None: torch's")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32", "fp32-strict"),
                   help="matmul precision of the updates; auto = bf16 where the hardware has bf16 units; fp32 is "
                        "TF32 on CUDA's tensor cores, fp32-strict is not")
    p.add_argument("--test-tasks", type=envs.positive_int, default=10, help="test tasks the expert is scored on")
    p.add_argument("--out", default=None, help="where expert.pt and expert.json go; None: checkpoints/experts/ENV")
    p.add_argument("--resume", action="store_true", help="continue the killed run in --out from its resume.pt")
    p.add_argument("--checkpoint-every", type=float, default=5.0,
                   help="minutes between writes of resume.pt, each at an episode's end (0: every episode). "
                        "Minutes, not episodes: episodes take far longer on Ant than on point_goal, and a kill "
                        "should cost a few minutes on any env while the writes (the buffer so far: up to 0.1 GB, "
                        "Ant's) stay a small share of the time")
    return sac.add_options(p)


def parse_args(argv=None):
    """The command line, with defaults from --env's ENVS row (envs.parse_with_env_defaults): its SAC
    settings, overridden by DEFAULTS, overridden by its expert settings."""
    def defaults(env):
        settings = envs.ENVS[env]
        return {**settings.rl.get("sac", {}), **DEFAULTS, **settings.expert}
    args = envs.parse_with_env_defaults(build_parser(), argv, defaults)
    args.out = args.out or os.path.join("checkpoints", "experts", args.env)
    args.device = envs.resolve_device(args.device)
    args.bf16 = envs.use_bf16(args.dtype, args.device)
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        envs.set_matmul_precision(args.device, args.dtype)
        envs.prepare_out_dir(args.out)
        expert, curve, minutes = train(args)
        info = {"env": args.env, "steps": args.steps, "minutes": round(minutes, 1),
                "train_return_last10pct": float(curve[-max(1, len(curve) // 10):].mean()),
                "args": {k: v for k, v in vars(args).items() if k != "out"}, **score(expert, args.test_tasks)}
        save(expert, info, args.out)
        if os.path.exists(resume_path(args.out)):  # a finished run has nothing to resume
            os.remove(resume_path(args.out))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.env} expert: {minutes:.1f} min; on {args.test_tasks} test tasks {info['test_return']:.2f}, "
          f"told the mean task {info['told_mean_task_return']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
