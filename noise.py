"""Noise-distilled learning histories (AD-eps: Zisman et al. 2023, "Emergence of In-Context Reinforcement
Learning from Noise Distillation"; Vintix, 2025, for continuous actions).

A history that no learner made: a task-conditioned expert (expert.py) acts on a training task with its
actions mixed with uniform noise,
    a = (1 - eps) a*(s, task) + eps u,   u ~ U(-1, 1)^act_dim,
and eps is annealed from 1 (random actions) towards 0 over the first episodes of each stream, then held
at 0 for the last --clean share of them: eps_e = (1 - e / n_noisy) ** --power. The return rises episode
by episode as in an RL learning history, and AD learns to climb it in context. It costs rollouts only:
minutes per env where the RL scripts take hours. What AD must fit is then a function of the task and
eps, not of an RL learner's changing weights.

What AD is trained to output (--target; the histories' act_mean and act_std):
  expert     the expert's action a* at every step, the context unchanged (relabelled, as the
             Decision-Pretrained Transformer (Lee et al. 2023) and Vintix do), std --expert-std;
  behaviour  the behaviour's own distribution: mean (1 - eps) a*, std eps / sqrt(3) (AD-eps as written),
             floored at --expert-std;
  shown      the noise-free action of the expert shown the task it means to act on (the true one, or with
             --shown posterior the searcher's guess; below), std --expert-std: the noise then only widens
             the states the histories visit (as DART does for imitation).
A context the model writes itself at test time looks like none of these: its own actions are clean
(close to an expert's) but for the task it guessed, not the true one, and only the rewards say so. In
the histories above, clean-looking actions always belong to the true task, so the actions alone tell
the task and the rewards need not be read. --wrong-task P adds the missing case: in each noisy episode,
with probability P, the expert is shown a task drawn afresh from the training distribution instead of
the true one (the noise mixed in as usual), while the relabelled target stays the true task's a*.
--wrong-near K makes some of those near misses: the wrong task is the nearest to the true one of k fresh
draws, k uniform in 1..K. A model's own guess at test time is often nearly right; far-off wrong tasks
alone never show it a context that is clean, a little off and says so only in its rewards.
Pusher's histories above never show a search: the expert is told the task, or a wrong one at random,
and a model trained on them does not learn to find the cylinder. --shown posterior makes the expert a
searcher instead (PusherPosterior): in each episode it is shown its best guess of the task from the
stream's earlier rewards, so a history is a search that finds the cylinder, then the goal, from rewards
alone; --target shown trains AD to act as that searcher (with no noise at all, --clean 1, the model's own
rollouts fell below zero action; --eps-start below 1 keeps a little). Its actions carry its guess, so a model
can copy the guess from them rather than read the rewards: --wrong-task P then steers a noisy episode by a
wrong task while the target stays the searcher's action for its guess. --clean-first N leaves the first N
episodes noise-free: their rewards are then free of the control cost of noise, which hides the cylinder.
A model trained on such histories reads the searcher's path, not the rewards, and its own path at test time
is not the searcher's. --player RUN aims at that gap as DAgger does in imitation (Ross et al. 2011): an AD
checkpoint plays the last --player-streams streams of each task itself, noise-free and in context, as at
test time, while the target stays the expert's action (with --target shown: the searcher's guess from those
very rewards). The next model is trained on contexts like its own; DAgger repeats it, for each new model's
path differs again, and keeps every round's data: --player RUN0 RUN1 ... deals the played streams to the
models of all rounds in turn.
The files are the RL scripts' format (envs.save_history, algo "noise"), so ad.py reads them as they are.
The settings, eps per episode and the expert's path go to noise.json beside them: ad.py keeps it in its
checkpoint, and evaluate.py then scores against the expert's noise-free return on the same test tasks.
Each task's noise comes from its own seed, so a task's history does not depend on --parallel (a --player
acts for a chunk in one batch: by rounding only); tasks are written --parallel at a time and a killed run
resumes from the tasks not yet written.

    python noise.py --env half_cheetah_vel             # expert at checkpoints/experts/ENV -> data/ENV/noise_expert
    python noise.py --env point_goal --target behaviour --tasks 20 --episodes 40
    python noise.py --env half_cheetah_vel --wrong-task 0.5 --out data/half_cheetah_vel/noise_wrong
    python noise.py --env half_cheetah_vel --wrong-task 0.5 --wrong-near 8 --out data/half_cheetah_vel/noise_near
    python noise.py --env pusher_goal --shown posterior --eps-start 0.3 --target shown --out data/pusher_goal/post
    python noise.py --env pusher_goal --shown posterior --eps-start 0.6 --target shown --clean-first 1 --episodes 3
    python noise.py --env pusher_goal --shown posterior --eps-start 0.6 --target shown --episodes 3 \
        --streams 2 --player out/pusher_goal/RUN --player-streams 1 --out data/pusher_goal/dagger
    python noise.py --env pusher_goal --shown posterior --eps-start 0.6 --target shown --episodes 3 \
        --streams 3 --player out/pusher_goal/RUN0 out/pusher_goal/RUN1 --player-streams 2 --out data/pusher_goal/dagger2
    python ad.py --env half_cheetah_vel --data data/half_cheetah_vel/noise_expert --k 1
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import ad
import envs
import expert as experts
import sac


def epsilon_schedule(n_episodes, clean=0.2, power=1.5, start=1.0, clean_first=0):
    """eps per episode: 0 for the first `clean_first` episodes; then, over the n left, from `start` down
    towards 0 over their first round(n (1 - clean)) episodes and 0 for the rest (the last one is always
    noise-free)."""
    n = n_episodes - clean_first
    n_noisy = min(n - 1, int(round(n * (1 - clean))))
    noisy = start * (1 - np.arange(n_noisy) / n_noisy) ** power if n_noisy > 0 else np.zeros(0)
    return np.concatenate([np.zeros(clean_first), noisy, np.zeros(n - n_noisy)]).astype(np.float32)


def shown_tasks(name, intended, epsilon, wrong_task, task_rngs, wrong_near=1):
    """The task the expert is shown in each stream for one episode, [T, E, task_dim]: the intended one
    [T, E, task_dim] (the true task, or the searcher's guess), or (in a noisy episode, with probability
    wrong_task) one drawn afresh from the training distribution: the nearest to the intended task of k
    draws, k uniform in 1..wrong_near (1: any draw)."""
    shown = intended.copy()
    if epsilon > 0 and wrong_task > 0:
        sample = envs.env_settings(name).sample_task
        for i, rng in enumerate(task_rngs):
            for j in np.flatnonzero(rng.random(shown.shape[1]) < wrong_task):
                # wrong_near = 1 draws nothing more, so earlier histories are made again bit for bit
                k = rng.integers(1, wrong_near + 1) if wrong_near > 1 else 1
                draws = np.stack([sample(rng) for _ in range(k)])
                shown[i, j] = draws[np.argmin(np.linalg.norm(draws - intended[i, j], axis=1))]
    return shown


class PusherPosterior:
    """A searcher's best guess of a pusher_goal task from what one stream's earlier episodes showed: the tip's
    path, the rewards and the controls (all in AD's context), and how far the cylinder was pushed (which
    follows from them through the physics; the expert's own view takes it from the simulator too).
    Reward + control cost = -(||obj - goal|| + 0.5 ||obj - tip||). While the cylinder stands still the
    first term is a constant c, so the cylinder's start is the grid point whose distances to the tip
    explain the rewards best, c fitted by least squares (trilateration). The goal is then the grid point
    (far enough from the cylinder, as the prior demands) whose distance to the cylinder's path explains what
    is left; with no push yet that is a circle, and the point of it nearest the mean goal is the guess.
    Before any step, the guess is the task distribution's mean."""
    GRID = 0.01  # metres: the resolution of the guess

    @classmethod
    def _geometry(cls):
        if not hasattr(cls, "obj_origin"):  # the bodies' positions for task (0, 0, 0, 0), and the grids
            env = envs.make_env("pusher_goal", np.zeros(4))
            cls.obj_origin, cls.goal_origin = env.get_body_com("object").copy(), env.get_body_com("goal").copy()
            cls.mean_task = experts.mean_task("pusher_goal")
            cls.obj_grid, cls.goal_grid = cls._grid(envs.PUSHER_OBJ_BOX), cls._grid(envs.PUSHER_GOAL_BOX)

    @classmethod
    def _grid(cls, box):  # every point of an (x, y) box, GRID apart, [n, 2]
        axes = (np.arange(lo, hi + 1e-9, cls.GRID) for lo, hi in box)
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)

    def __init__(self):
        self._geometry()
        self.tip, self.left, self.moved = [], [], []

    def record(self, obs, reward, ctrl_cost, moved):
        """One step's clues: obs (ending with the tip), its reward and control cost, the cylinder's push."""
        self.tip.append(obs[-3:])
        self.left.append(-(reward + ctrl_cost))  # = ||obj - goal|| + 0.5 ||obj - tip||
        self.moved.append(moved)

    @staticmethod
    def _world(xy, origin):  # grid (x, y) offsets -> world positions of a body
        return origin + np.concatenate([xy, np.zeros(xy.shape[:-1] + (1,))], -1)

    def guess(self):
        """The best guess (obj_x, obj_y, goal_x, goal_y) so far."""
        if not self.tip:
            return self.mean_task.astype(np.float32)
        tip, left, moved = np.array(self.tip), np.array(self.left), np.array(self.moved)
        still = np.linalg.norm(moved, axis=1) < 1e-3
        obj = self.mean_task[:2]
        if still.sum() >= 3:  # three unknowns: the start's x, y and c
            starts = self._world(self.obj_grid, self.obj_origin)
            half_dist = 0.5 * np.linalg.norm(starts[:, None] - tip[still], axis=-1)  # [grid, still steps]
            c = (left[still] - half_dist).mean(1, keepdims=True)
            obj = self.obj_grid[((left[still] - half_dist - c) ** 2).sum(1).argmin()]
        path = self._world(obj + moved, self.obj_origin)
        to_goal = left - 0.5 * np.linalg.norm(path - tip, axis=1)  # = ||obj_t - goal|| at each step
        goals = self._world(self.goal_grid, self.goal_origin)
        misfit = ((np.linalg.norm(path - goals[:, None], axis=-1) - to_goal) ** 2).sum(1)
        misfit[np.linalg.norm(self.goal_grid - obj, axis=1) <= envs.PUSHER_MIN_GAP] = np.inf
        best = np.flatnonzero(misfit <= misfit.min() * (1 + 1e-4))
        goal = self.goal_grid[best[np.linalg.norm(self.goal_grid[best] - self.mean_task[2:], axis=1).argmin()]]
        return np.concatenate([obj, goal]).astype(np.float32)


def expert_actions(expert, vec, obs, shown):
    """The expert's actions [T, E, act_dim] in vec's envs at obs, shown the tasks [T, E, task_dim]. One call
    per task: a matmul's rounding depends on its row count, and a task's history must not depend on the
    tasks rolled out beside it."""
    return np.stack([expert(obs[i], view).numpy() for i, view in enumerate(vec.expert_views(shown))])


def noise_histories(expert, name, tasks, task_ids, eps, streams, target, expert_std, seed, wrong_task=0.0,
                    wrong_near=1, posterior=False, players=(), player_streams=0):
    """Roll the expert out with annealed noise on `tasks` (streams copies each) for len(eps) episodes; with
    `posterior`, the expert intends each stream's PusherPosterior guess instead of the true task (and is
    shown it, unless a wrong-task episode shows it another; the target "shown" stays the guess's action).
    players (AD checkpoints: (model, meta) each) play the last `player_streams` streams of each task, dealt
    in turn, noise-free, in context as at test time; their targets are the expert's as in the other streams.
    Returns one dict of history arrays per task, as envs.save_history takes them."""
    vec = envs.MultiTaskVecEnv(name, tasks, streams, seed=seed, task_ids=task_ids)
    # per task: independent of chunking
    rngs = [np.random.default_rng([seed, i, 0x0E5]) for i in task_ids]
    task_rngs = [np.random.default_rng([seed, i, 0x7A5]) for i in task_ids]
    true = np.repeat(tasks[:, None], streams, 1)
    searchers = [[PusherPosterior() for _ in range(streams)] for _ in tasks] if posterior else None
    T, E, H, A = len(tasks), streams, vec.horizon, vec.act_dim
    agents = player_agents(players, T, E, player_streams, A)
    arrays = {"obs": np.zeros((T, E, len(eps), H, vec.obs_dim), np.float32), "rew": np.zeros((T, E, len(eps), H), np.float32),
              **{key: np.zeros((T, E, len(eps), H, A), np.float32) for key in ("act", "act_mean", "act_std")}}
    for e, epsilon in enumerate(eps):
        obs = vec.reset()
        intended = np.array([[searcher.guess() for searcher in row] for row in searchers]) if posterior else true
        shown = shown_tasks(name, intended, epsilon, wrong_task, task_rngs, wrong_near)
        told_truth, told_intended = (shown == true).all(), (shown == intended).all()
        for t in range(H):
            best = expert_actions(expert, vec, obs, true)
            guided = best if told_truth else expert_actions(expert, vec, obs, shown)
            searched = guided if told_intended else expert_actions(expert, vec, obs, intended)
            u = np.stack([rng.uniform(-1, 1, (E, A)) for rng in rngs])
            act = (1 - epsilon) * guided + epsilon * u  # a convex mix of two actions in [-1, 1]: no clip needed
            for streams_k, agent in agents:
                act[:, streams_k] = agent.act(obs[:, streams_k].reshape(-1, vec.obs_dim), t == 0).reshape(T, -1, A)
            if target == "expert":
                mean, std = best, expert_std
            elif target == "shown":
                mean, std = searched, expert_std
            else:
                mean, std = (1 - epsilon) * guided, max(epsilon * sac.UNIFORM_STD, expert_std)
            for key, value in (("obs", obs), ("act", act), ("act_mean", mean), ("act_std", std)):
                arrays[key][:, :, e, t] = value
            obs, arrays["rew"][:, :, e, t], _ = vec.step(act)
            for streams_k, agent in agents:
                agent.observe(arrays["act"][:, streams_k, e, t].reshape(-1, A),
                              arrays["rew"][:, streams_k, e, t].reshape(-1), vec.envs[0][0])
            for i, (row, env_row) in enumerate(zip(searchers or (), vec.envs)):
                for j, (searcher, env) in enumerate(zip(row, env_row)):
                    reward = arrays["rew"][i, j, e, t]
                    searcher.record(obs[i, j], reward, env.ctrl_cost_of(act[i, j]), env.cylinder_moved())
    return [{key: value[i] for key, value in arrays.items()} for i in range(T)]


def player_agents(players, n_tasks, streams, player_streams, act_dim):
    """One (stream indices, InContextAgent) per player: the last `player_streams` streams, dealt in turn. An
    agent acts for all its streams of all tasks in one batch, so a played history depends on the tasks beside
    it by rounding only; it takes the head's mean action, noise-free as at test time."""
    first = streams - player_streams
    dealt = [list(range(first + k, streams, len(players))) for k in range(len(players))]
    return [(mine, ad.InContextAgent(model, meta, n=n_tasks * len(mine), act_dim=act_dim,
                                     window=ad.rollout_window(meta)))
            for mine, (model, meta) in zip(dealt, players)]


def check_settings(out, settings):
    """Write noise.json, or check that the one already in `out` (a resumed run) has the same settings."""
    path = os.path.join(out, "noise.json")
    if os.path.isfile(path):
        with open(path) as f:
            found = json.load(f)
        # a setting added after the file was written reads as its default: the histories were made without it
        parser = build_parser()
        changed = sorted(k for k in settings if found.get(k, parser.get_default(k)) != settings[k])
        if changed:
            raise ValueError(f"{out} holds noise histories made with other settings ({', '.join(changed)}): "
                             f"use another --out or delete it")
        return
    envs.write_json_atomic(path, settings, indent=1)


def load_player(path, env):
    """An AD checkpoint to play histories: (model, meta), checked against the env."""
    model, ckpt = ad.load_checkpoint(path)
    meta = ckpt["meta"]
    if meta["env"] != env:
        raise ValueError(f"--player {path} acts in {meta['env']}, not {env}: train one with `python ad.py --env {env}`")
    return model, meta


def run(args):
    expert = experts.load_expert(args.expert, env=args.env)
    eps = epsilon_schedule(args.episodes, args.clean, args.power, args.eps_start, args.clean_first)
    horizon = envs.env_settings(args.env).horizon
    players = [load_player(path, args.env) for path in args.player or ()]
    steps = args.streams * args.episodes * horizon
    envs.prepare_out_dir(args.out)
    settings = {"env": args.env, "expert": args.expert, "target": args.target, "tasks": args.tasks,
                "streams": args.streams, "episodes": args.episodes, "clean": args.clean,
                "clean_first": args.clean_first, "power": args.power,
                "eps_start": args.eps_start, "expert_std": args.expert_std, "wrong_task": args.wrong_task,
                "wrong_near": args.wrong_near, "shown": args.shown, "player": args.player,
                "player_streams": args.player_streams if args.player else None, "split": args.split, "seed": args.seed,
                "eps": eps.round(4).tolist()}
    check_settings(args.out, settings)
    tasks = envs.sample_tasks(args.env, args.tasks, args.split, seed=args.seed)
    todo = envs.pending_tasks(args.out, tasks, env=args.env, algo="noise", seed=args.seed, steps=steps)
    after = f" after {args.clean_first} noise-free" if args.clean_first else ""
    print(f"noise histories on {args.env}: {args.tasks} tasks x {args.streams} streams x {args.episodes} episodes "
          f"(eps {eps[args.clean_first]:g} -> 0 over {int((eps > 0).sum())}{after}), shown the {args.shown} task, "
          f"target {args.target}, {len(todo)} to do -> {args.out}")
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(todo), args.parallel), desc="tasks", unit="chunk", disable=not todo):
        chunk = todo[start:start + args.parallel]
        histories = noise_histories(expert, args.env, tasks[chunk], chunk, eps, args.streams, args.target,
                                    args.expert_std, args.seed, args.wrong_task, args.wrong_near,
                                    posterior=args.shown == "posterior", players=players,
                                    player_streams=args.player_streams)
        for i, history in zip(chunk, histories):
            envs.save_history(envs.history_path(args.out, i), **history, task=tasks[i], env=args.env,
                              algo="noise", seed=args.seed, steps=steps, split=args.split)
    returns = np.stack([envs.load_history(envs.history_path(args.out, i))["rew"].sum(-1).mean(0)
                        for i in range(args.tasks)]).mean(0)
    print(f"{time.perf_counter() - t0:.0f} s; mean return per episode: {' '.join(f'{r:.2f}' for r in returns)}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="reacher_goal", choices=list(envs.ENVS), help="meta-RL task family")
    p.add_argument("--expert", default=None, help="expert.py's output; None: checkpoints/experts/ENV")
    p.add_argument("--target", default="expert", choices=("expert", "behaviour", "shown"),
                   help="what AD is trained to output: the expert's action (relabelled), the behaviour's, or "
                        "the noise-free action of the expert shown its intended task (--shown posterior: the searcher's)")
    p.add_argument("--tasks", type=envs.positive_int, default=None, help="training tasks; None: ENVS[env]'s")
    p.add_argument("--streams", type=envs.positive_int, default=5, help="histories per task")
    p.add_argument("--episodes", type=envs.positive_int, default=40, help="episodes per history")
    p.add_argument("--clean", type=float, default=0.2, help="share of noise-free episodes at the end (1: all)")
    p.add_argument("--clean-first", type=int, default=0,
                   help="noise-free episodes at the start, before the schedule (its rewards then read clean)")
    p.add_argument("--power", type=float, default=1.5, help="eps_e = start (1 - e / n_noisy) ** power")
    p.add_argument("--eps-start", type=float, default=1.0, help="eps of the first episode, the schedule's start")
    p.add_argument("--expert-std", type=float, default=0.05,
                   help="std of the relabelled target (and the floor of the behaviour's)")
    p.add_argument("--wrong-task", type=float, default=0.0,
                   help="probability that the expert is shown a random task in a noisy episode (0: AD-eps as published)")
    p.add_argument("--wrong-near", type=envs.positive_int, default=1,
                   help="a wrong task is the nearest to the true one of k draws, k uniform in 1..K (1: any draw)")
    p.add_argument("--shown", default="true", choices=("true", "posterior"),
                   help="the task the expert is shown: the true one, or (pusher_goal) PusherPosterior's guess "
                        "from the stream's earlier episodes")
    p.add_argument("--player", nargs="+", default=None,
                   help="AD checkpoints (ckpt.pt or run directories) that play --player-streams streams of each "
                        "task, dealt in turn, noise-free, with the expert's targets (DAgger); None: the expert plays")
    p.add_argument("--player-streams", type=int, default=None,
                   help="how many streams of each task (the last ones) the players play; None: all of them")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="whose tasks: training, or evaluate.py's test tasks (with its --seed: the demonstrator's "
                        "own curve there, to set beside a model's)")
    p.add_argument("--parallel", type=envs.positive_int, default=10, help="tasks rolled out (and written) together")
    p.add_argument("--seed", type=int, default=0, help="seeds the training tasks, envs and noise")
    p.add_argument("--threads", type=envs.positive_int, default=1, help="torch CPU threads (the expert is tiny)")
    p.add_argument("--out", default=None, help="None: data/ENV/noise_TARGET (_test with --split test)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not 0 <= args.clean <= 1:
        sys.exit(f"error: --clean {args.clean} must be in [0, 1]")
    if not 0 <= args.clean_first < args.episodes:
        sys.exit(f"error: --clean-first {args.clean_first} must be in [0, --episodes)")
    if not 0 < args.eps_start <= 1:
        sys.exit(f"error: --eps-start {args.eps_start} must be in (0, 1]")
    if not 0 <= args.wrong_task <= 1:
        sys.exit(f"error: --wrong-task {args.wrong_task} must be in [0, 1]")
    if args.wrong_near > 1 and args.wrong_task == 0:
        sys.exit(f"error: --wrong-near {args.wrong_near} needs wrong-task episodes: set --wrong-task above 0")
    if args.shown == "posterior" and args.env != "pusher_goal":
        sys.exit("error: --shown posterior is pusher_goal's searcher: use --env pusher_goal")
    if args.expert_std <= 0:
        sys.exit(f"error: --expert-std {args.expert_std} must be positive")
    if args.player is None and args.player_streams is not None:
        sys.exit("error: --player-streams needs --player, the AD checkpoints that play them")
    args.player_streams = (args.streams if args.player_streams is None else args.player_streams) if args.player else 0
    if not 0 <= args.player_streams <= args.streams:
        sys.exit(f"error: --player-streams {args.player_streams} must be in [0, --streams {args.streams}]")
    if args.player and args.player_streams < len(args.player):
        sys.exit(f"error: --player-streams {args.player_streams} leaves one of the {len(args.player)} players "
                 f"without a stream: give each at least one")
    if args.player and args.target == "behaviour":
        sys.exit("error: --player with --target behaviour would train a model on its own actions: "
                 "use --target expert or shown")
    args.tasks = args.tasks or envs.env_settings(args.env).train_tasks
    args.expert = args.expert or os.path.join("checkpoints", "experts", args.env)
    suffix = "_test" if args.split == "test" else ""
    args.out = args.out or os.path.join("data", args.env, f"noise_{args.target}{suffix}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        run(args)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
