"""In-context RL on unseen tasks: roll a trained AD checkpoint out and plot how its return improves from
episode to episode with no gradient step (the paper's Figures 1 and 2, Section 5).

For every checkpoint: M held-out *test* tasks (envs.sample_tasks(split="test"), never used for training or
model selection) x S seeds, N consecutive episodes each with a persistent context (the model's recurrent
state), all tasks batched in one model call per step (ad.rollout). It writes
  eval.json      every episode's return per task and seed, the baselines and a summary;
  incontext.png  the in-context curve (mean and spread over tasks) against the source algorithm's learning
                 curve on its training tasks (every k-th episode, the units the model was trained in) and
                 the zero-action and random-policy baselines;
  behaviour.png  what the agent does on the first test tasks in its first, middle and last episode, with
                 the goal it cannot see marked (the envs' trace(): the point's, fingertip's, cylinder's or
                 torso's path, or the cheetah's velocity against its target);
  behaviour.gif  with --animate: the first test task's episodes one after another.
The summary scores the mean return of the last 5 episodes two ways. The strict score, the headline:
0 = the better of the zero-action and random policies on the same test tasks, 1 = the source algorithm's
final return on the same test tasks, from its own run on them (`sac.py --split test`, found beside the
training data or given by --source-test-data; test tasks can be harder or easier than the training
tasks), else on its training tasks, flagged; and against the random policy alone (0 = random), which
flatters tasks where standing still is far above random (Reacher, Ant-Dir). Where the goal is a place, it
also gives how far the traced point (the point, the fingertip, Pusher's cylinder) ends the first and the
last 5 episodes from that goal.

The reward-blind control (on by default, --no-blind skips it) plays the same rollouts again with the reward
slot of every token set to 0: its strict score, and strict minus it, show how much of the score comes from
reading rewards. For AD on noise histories (noise.py) the strict score's 1 is their expert's noise-free
return on the same test tasks, and the expert told the task distribution's mean is reported beside it.
A model trained with a task-guess loss (`ad.py --task-loss`) also reports how far its guess of the hidden
task is from the truth at the end of each episode of its own rollouts (TaskGuesses).

A model trained on N-token windows (`ad.py --context N`) sees at most N tokens in its rollout, whatever
its architecture (ad.SlidingContext); `--unbounded-context` lifts the bound, for comparison.

A directory may also hold a baseline's `results.json` instead of a checkpoint (mql.py, macaw.py, rl2.py
write one: returns per test task, seed and episode): it is scored and plotted the same way, beside AD, with
its reward-blind control where it played one (rl2.py, a recurrent policy whose tokens hold the reward).

Several checkpoints make one comparison (the paper's Figure 1: Mamba vs transformer; Figure 2: context
lengths). Runs that differ only in their training seed form one group: one curve, the mean over seeds,
shaded by the spread across seeds (a group of one run: the spread across tasks). All must be scored on the
same test tasks for as many episodes (--allow-mixed lifts that). The table of final scores (mean and std
over seeds, every seed's score) is printed and written to scores.md, with a second table of how each row
was made: its training budget, which weights are scored (AD: the best on validation tasks, or the final
ones from a run's last.pt; MQL and MACAW: their final weights), its action rule (AD samples; MQL and MACAW
act deterministically) and its 1.

    python evaluate.py                                    # out/reacher_goal/mamba
    python evaluate.py out/point_goal/mamba --action-mode mean
    python evaluate.py out/a out/b --out out/compare      # several checkpoints -> one comparison plot
    python evaluate.py out/a/last.pt                      # the run's final weights -> out/a/final
"""
import argparse
import functools
import glob
import json
import os
import sys

import matplotlib
import numpy as np
import torch

import ad
import envs
import expert as experts

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def summarise(returns, env, tasks, source_final, blind=None):
    """Returns [tasks, seeds, episodes] -> mean returns (first episode, all, last 5), the strict score of
    the first episode and of the last 5 and the score of the last 5 against random, with the zero-action
    and random-policy baselines measured on the same tasks. With the reward-blind control's returns
    (`blind`, the same shape), its first episode, last 5 and strict score too."""
    zero, random = (envs.baseline_return(env, tasks, policy) for policy in ("zero", "random"))
    floor = ad.strict_floor(zero, random)
    last5 = returns[:, :, -5:].mean()
    summary = {"first_episode": float(returns[:, :, 0].mean()), "all_episodes": float(returns.mean()),
               "last5": float(last5),
               "score_first_episode": float(ad.normalised(returns[:, :, 0].mean(), floor, source_final)),
               "score_last5": float(ad.normalised(last5, floor, source_final)),
               "score_last5_vs_random": float(ad.normalised(last5, random, source_final)),
               "score_last5_per_task": ad.normalised(returns[:, :, -5:].mean((1, 2)), floor, source_final).tolist(),
               "source_final": source_final, "zero_action": zero, "random_policy": random}
    if blind is not None:
        summary.update(blind_first_episode=float(blind[:, :, 0].mean()), blind_last5=float(blind[:, :, -5:].mean()),
                       blind_score_last5=float(ad.normalised(blind[:, :, -5:].mean(), floor, source_final)))
    return summary


def expert_reference(meta, tasks, returns, args):
    """For AD on noise histories (noise.py): the strict score's 1 is their expert's noise-free return on
    these same test tasks, not the histories' final return on the training tasks. Also the expert's
    return when told the task distribution's mean instead of the task, per task: the most a policy that
    ignores the task is shown to get (on HalfCheetah-Vel, running at the mean velocity), and on how many
    tasks the model's last 5 episodes beat it. None for RL histories."""
    if "noise" not in meta:
        return None
    path = meta["noise"]["expert"]
    if not os.path.isabs(path) and not os.path.exists(path):  # a shipped checkpoint names the repository's
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    expert = experts.load_expert(path, env=meta["env"])
    own, told, _ = experts.own_and_told(expert, tasks, n_envs=args.seeds, seed=args.seed)
    beats = returns[:, :, -5:].mean((1, 2)) > told
    return {"expert": meta["noise"]["expert"], "expert_return": float(own.mean()),
            "told_mean_task_per_task": told.tolist(), "told_mean_task": float(told.mean()),
            "tasks_beating_told_mean_task": int(beats.sum())}


def goal_distances(where, goal):
    """Where the goal is a place: how far the traced point is from it at the start and at the end of the
    first and the last 5 episodes, averaged over tasks and seeds. It tells what a return hides: on Pusher,
    whether the cylinder was pushed at all or only reached for."""
    distance = np.linalg.norm(where - goal[:, :, None, None], axis=-1)   # [tasks, seeds, episodes, steps]
    return {"goal_distance_start": float(distance[:, :, :, 0].mean()),
            "goal_distance_end_first": float(distance[:, :, 0, -1].mean()),
            "goal_distance_end_last5": float(distance[:, :, -5:, -1].mean())}


def source_final_on(directory, env, algo, tasks, k, n_curve):
    """The source algorithm's final return (ad.source_curve's: the last 10% of its episodes) on `tasks`,
    from its own run on them (`python ALGO.py --split test`), if `directory` holds one: its first len(tasks)
    histories must be of env and algo, on those tasks, and as long as the training run's (n_curve episodes
    once downsampled k-fold). Else None."""
    files = sorted(glob.glob(os.path.join(directory, "task_*.npz")))[:len(tasks)]
    if len(files) < len(tasks):
        return None
    histories = [envs.load_history(f) for f in files]
    if not all(h["env"] == env and h["algo"] == algo and np.allclose(h["task"], task)
               for h, task in zip(histories, tasks)):
        return None
    returns = np.stack([h["rew"].sum(-1) for h in histories])           # [tasks, E, episodes]
    if len(range(0, returns.shape[-1], k)) != n_curve:
        return None
    return ad.source_curve(returns, k)[1]


def strict_one(env, algo, k, n_curve, tasks, training_final, data_dir, args):
    """The strict score's 1 for these test tasks, and where it comes from: the source algorithm's final
    return on the tasks themselves (test tasks differ in difficulty from the training tasks), from
    --source-test-data, else from DATA_test beside the run's training data DATA (where `ALGO.py --split
    test` writes by default); else its final on the training tasks, flagged as such."""
    directory = args.source_test_data or (f"{os.path.normpath(data_dir)}_test" if data_dir else None)
    if directory and os.path.isdir(directory):
        final = source_final_on(directory, env, algo, tasks, k, n_curve)
        if final is not None:
            return final, "test tasks", f"the last 10% of the {algo} histories on these test tasks ({directory})"
    if args.source_test_data:
        raise ValueError(f"--source-test-data {args.source_test_data} does not hold {algo} histories of the "
                         f"first {len(tasks)} test tasks of --seed {args.seed}, as long as the training run's")
    out = f" --out {directory}" if directory else ""
    return training_final, "training tasks", (
        f"the last 10% of the {algo} histories on the training tasks; none on these test tasks (make them with "
        f"`python {algo}.py --env {env} --split test --tasks {len(tasks)} --seed {args.seed}{out}` and the "
        f"training run's --steps)")


def run_directory(path):
    """The run a checkpoint belongs to: `path` itself, or the directory of its ckpt.pt / last.pt file."""
    return os.path.dirname(path) if path.endswith(".pt") else os.path.normpath(path)


def is_final(path):
    """Whether `path` is a run's last.pt: its latest weights (what --resume continues), not the best on
    validation that ckpt.pt keeps. Validation on a few noisy rollouts can pick early weights."""
    return os.path.basename(path) == "last.pt"


def training_budget(ckpt, final=False):
    """The run's updates and the one whose weights are scored: ckpt.pt's (the best on validation, often
    earlier) or, from last.pt, the final ones."""
    if final:
        return f"{ckpt['iter']:,} updates, final weights"
    best = f"best at {ckpt['iter']:,}"
    total = ckpt.get("total_updates")  # checkpoints from before it was recorded lack it
    return f"{total:,} updates, {best}" if total else f"{best} (the run's total is not recorded)"


BEHAVIOUR_TASKS = 3  # test tasks drawn in behaviour.png


class TaskGuesses:
    """A model trained with ad.py --task-loss, stepped by ad.rollout: it keeps the model's guess of the
    hidden task (its last task_dim outputs) at every step, so that the guess made from the model's own
    rollouts can be set beside the truth. On the histories it was trained on, the context can give the
    task away in ways the model's own rollouts do not (a demonstrator's actions carry its guess)."""

    def __init__(self, model, task_dim):
        self.model, self.task_dim, self.steps = model, task_dim, []

    def init_state(self, batch, device=None):
        self.steps = []
        return self.model.init_state(batch, device)

    def step(self, x, state):
        y, state = self.model.step(x, state)
        self.steps.append(y[..., -self.task_dim:].float().cpu())
        return y, state

    def errors(self, meta, tasks, n_seeds):
        """The guess's distance to the true task at the last step of each episode, root-mean-square over
        tasks and seeds, and (the line to beat) the training tasks' mean's distance."""
        stats = meta["task_stats"]
        guesses = torch.stack(self.steps, 1)[:, meta["horizon"] - 1::meta["horizon"]] * stats["std"] + stats["mean"]
        truth = torch.as_tensor(tasks, dtype=torch.float32).repeat_interleave(n_seeds, 0)
        rms = lambda d: float(d.square().sum(-1).mean().sqrt())
        return [rms(guesses[:, e] - truth) for e in range(guesses.shape[1])], rms(stats["mean"] - truth)


def evaluate(directory, args):
    """Roll one checkpoint out on the test tasks (or score a baseline's results.json): the eval.json dict and
    what the agent did on the first BEHAVIOUR_TASKS tasks (None for a baseline), for plot_behaviour."""
    if os.path.isfile(os.path.join(directory, "results.json")):
        return baseline_result(directory, args), None
    model, ckpt = ad.load_checkpoint(directory, device=args.device)
    meta = ckpt["meta"]
    tasks = envs.sample_tasks(meta["env"], args.tasks, "test", seed=args.seed)
    n_episodes = args.episodes or meta["episodes"]
    window = ad.rollout_window(meta, bounded=not args.unbounded_context)
    final = is_final(directory)
    name = os.path.basename(run_directory(directory))
    guesser = None
    if meta.get("task_dim"):  # outside the sliding window, which replays tokens: one guess per real step
        guesser = TaskGuesses(ad.SlidingContext(model, window) if window else model, meta["task_dim"])
    rollout = functools.partial(ad.rollout, guesser or model, meta, tasks, n_episodes, n_seeds=args.seeds,
                                action_mode=args.action_mode, seed=args.seed, device=args.device,
                                window=None if guesser else window)
    returns, where, goal = rollout(record=True, desc=name)
    guess_errors = guesser.errors(meta, tasks, args.seeds) if guesser else None
    blind = rollout(blind=True, desc=f"{name}, reward-blind") if args.blind else None
    reference = expert_reference(meta, tasks, returns, args)
    if reference:
        one = reference["expert_return"], "expert", "the expert, noise-free, on these test tasks"
    else:
        one = strict_one(meta["env"], meta["algo"], meta["k"], len(meta["source_curve"]), tasks,
                         meta["source_final"], meta["data"], args)
    summary = summarise(returns, meta["env"], tasks, one[0], blind)
    summary.update(source_final_on=one[1], source_final_from=one[2])
    if reference:
        summary.update(reference)
    if guess_errors:
        summary.update(task_guess_error=guess_errors[0], task_mean_error=guess_errors[1])
    if envs.ENVS[meta["env"]].env_class.trace_kind == "path":
        summary.update(goal_distances(where, goal))
    behaviour = {"where": where[:BEHAVIOUR_TASKS], "goal": goal[:BEHAVIOUR_TASKS],
                 "returns": returns[:BEHAVIOUR_TASKS]}
    return {"checkpoint": os.path.abspath(directory), "env": meta["env"], "arch": ckpt["model_config"]["arch"],
            "model_config": ckpt["model_config"], "params": sum(p.numel() for p in model.parameters()),
            "train_seed": ckpt["args"]["seed"], "best_at_update": ckpt["iter"],
            "total_updates": ckpt.get("total_updates"), "algo": meta["algo"],
            "k": meta["k"], "context": meta["context"], "stream_tokens": meta["episodes"] * meta["horizon"],
            "rollout_window": window, "reward_input": meta.get("reward_input", ad.RUN_DEFAULTS["reward_input"]),
            "task_loss": meta.get("task_loss", ad.RUN_DEFAULTS["task_loss"]),
            "loss": meta["loss"], "action_mode": args.action_mode,
            "budget": training_budget(ckpt, final), "final_weights": final,
            "selection": "final weights (last.pt)" if final else
                         f"best on validation tasks (checked every {ckpt['args']['eval_every']} updates)",
            "actions": "the mean" if meta["loss"] == "mse" or args.action_mode == "mean" else "sampled",
            "seeds": args.seeds, "tasks": tasks.tolist(), "returns": returns.tolist(),
            "blind_returns": None if blind is None else blind.tolist(),
            "source_curve": meta["source_curve"], "summary": summary}, behaviour


BASELINE_KEYS = ("env", "method", "train_seed", "tasks", "seeds", "returns", "source_final", "source_curve",
                 "algo", "k", "adaptation")


def baseline_result(directory, args):
    """A baseline's results.json (mql.py, macaw.py, rl2.py: returns on the test tasks, in evaluate.py's
    split), scored like a checkpoint. It must hold BASELINE_KEYS and the test tasks this run would use; its
    `blind_returns`, where it played the reward-blind control (rl2.py), are reported as AD's."""
    path = os.path.join(directory, "results.json")
    with open(path) as f:
        result = json.load(f)
    missing = [key for key in BASELINE_KEYS if key not in result]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a baseline results file")
    returns = np.asarray(result["returns"], dtype=np.float64)
    tasks = envs.sample_tasks(result["env"], len(result["tasks"]), "test", seed=args.seed)
    if not np.allclose(tasks, result["tasks"]) or returns.shape[:2] != (len(tasks), result["seeds"]):
        raise ValueError(f"{path} was not run on the test tasks of --seed {args.seed} "
                         f"({len(result['tasks'])} tasks x {result['seeds']} seeds): re-run it with them")
    blind = result.get("blind_returns") if args.blind else None  # rl2.py plays the reward-blind control
    if blind is not None and np.shape(blind) != returns.shape:
        raise ValueError(f"{path}: blind_returns is {np.shape(blind)}, returns {returns.shape}: not the same trials")
    one = strict_one(result["env"], result["algo"], result["k"], len(result["source_curve"]), tasks,
                     result["source_final"], result.get("data"), args)
    summary = summarise(returns, result["env"], tasks, one[0], None if blind is None else np.asarray(blind))
    summary.update(source_final_on=one[1], source_final_from=one[2])
    return {"budget": "not recorded", "selection": "final weights", "actions": "deterministic", **result,
            "blind_returns": blind, "checkpoint": os.path.abspath(directory), "arch": result["method"],
            "summary": summary}


def label(result):
    """What a group of runs shares: arch, size and context (not the seed)."""
    if "method" in result:  # a baseline: its name says what it is
        return result["method"]
    config = result["model_config"]
    full = result["context"] == "full"
    context = f"{result['stream_tokens']} tokens (full streams)" if full else f"{result['context']} tokens"
    if not full and result["rollout_window"] is None:
        context += ", rolled out unbounded"
    ablation = ", no valuable sub-goals" if config.get("valuable_subgoals") is False else ""  # DM-H's ablation
    weights = ", final weights" if result.get("final_weights") else ""
    reward = ", reads the reward less its control cost" if result.get("reward_input") == "task" else ""
    task_loss = f", task-guess loss x {result['task_loss']:g}" if result.get("task_loss") else ""
    return (f"AD-{result['arch']} {config['d_model']}x{config['n_layer']} ({result['params'] / 1e3:.0f}k params)"
            f"{ablation}, context {context}{reward}{task_loss}{weights}")


def group_runs(results):
    """{label: [results]}, in the order of first appearance; runs in one group differ only in their seed."""
    groups = {}
    for result in results:
        groups.setdefault(label(result), []).append(result)
    for name, runs in groups.items():
        seeds = [r["train_seed"] for r in runs]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"two checkpoints of '{name}' share training seed {seeds}: nothing tells them apart")
    return groups


def mean_std(values):
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def score_table(groups):
    """Markdown table per group: mean returns (first episode; all episodes, a measure of in-context sample
    efficiency; last 5), the strict score of the last 5 (mean ± std over training seeds, each seed), of the
    first episode (adaptation within an episode, not across episodes), of the reward-blind control and the
    difference (the part of the score that comes from reading rewards), and the score against random."""
    rows = ["| model | runs (seeds) | first episode | all episodes | last 5 episodes | strict score: mean ± std "
            "over seeds | per seed | first-episode score | reward-blind score | strict − blind | score vs random |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        summaries = [r["summary"] for r in runs]
        scores = np.array([s["score_last5"] for s in summaries])
        returns = [np.mean([s[key] for s in summaries]) for key in ("first_episode", "all_episodes", "last5")]
        has_blind = all("blind_score_last5" in s for s in summaries)  # MQL's and MACAW's results have none
        blind = np.array([s["blind_score_last5"] for s in summaries]) if has_blind else None
        rows.append(f"| {name} | {len(runs)} ({', '.join(str(r['train_seed']) for r in runs)}) | "
                    + " | ".join(f"{x:.2f}" for x in returns) + f" | {mean_std(scores)} | "
                    f"{', '.join(f'{s:.2f}' for s in scores)} | "
                    f"{mean_std([s['score_first_episode'] for s in summaries])} | "
                    f"{mean_std(blind) if has_blind else '—'} | {mean_std(scores - blind) if has_blind else '—'} | "
                    f"{mean_std([s['score_last5_vs_random'] for s in summaries])} |")
    return "\n".join(rows)


def protocol_table(groups):
    """Markdown table per group: how its rows were made, which a score alone does not say. The training
    budget, which weights are scored (AD: the best checkpoint on validation tasks; the baselines: their
    final weights), how actions are chosen (AD samples its Gaussian head, as the source algorithm
    explored, unless told the mean; MQL and MACAW act deterministically, as their code does) and where the
    strict score's 1 comes from. Values that differ between a group's seeds are listed in seed order."""
    rows = ["| model | training budget | scored weights | actions | strict score's 1 |", "|---|---|---|---|---|"]
    for name, runs in groups.items():
        columns = ([r["budget"] for r in runs], [r["selection"] for r in runs], [r["actions"] for r in runs],
                   [source_label(r) for r in runs])
        rows.append(f"| {name} | " + " | ".join(" / ".join(dict.fromkeys(c)) for c in columns) + " |")
    return "\n".join(rows)


def source_label(result):
    """The strict score's 1 in a few words: its value and whose return on which tasks it is."""
    s = result["summary"]
    whose = "the expert" if s["source_final_on"] == "expert" else f"{result['algo']} on the {s['source_final_on']}"
    return f"{s['source_final']:.2f}, {whose}"


def check_alike(results, directories):
    """One comparison scores every run on the same test tasks for as many episodes; else a one-line error."""
    scored = [(len(r["tasks"]), np.shape(r["returns"])[2]) for r in results]
    if all(r["tasks"] == results[0]["tasks"] and n == scored[0] for r, n in zip(results, scored)):
        return
    runs = "; ".join(f"{os.path.normpath(d)}: {t} tasks x {e} episodes" for d, (t, e) in zip(directories, scored))
    raise ValueError(f"the runs were scored on different test tasks or episode counts ({runs}): score them alike "
                     f"(--tasks, --episodes here; a baseline's --test-tasks, --episodes) or pass --allow-mixed")


def plot(groups, png_path):
    """In-context curve of every group, the source algorithm's learning curve and the baselines."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in groups.items():
        per_task = np.stack([np.asarray(r["returns"]).mean(1) for r in runs])   # [runs, tasks, episodes]
        mean = per_task.mean((0, 1))
        std = per_task.mean(1).std(0) if len(runs) > 1 else per_task[0].std(0)
        x = np.arange(len(mean))
        line, = ax.plot(x, mean, label=name + (f", {len(runs)} seeds" if len(runs) > 1 else ""))
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
        if all(r.get("blind_returns") is not None for r in runs):
            blind = np.mean([np.asarray(r["blind_returns"]).mean((0, 1)) for r in runs], axis=0)
            ax.plot(x, blind, "--", color=line.get_color(), lw=1, label="  the same, reward-blind")
    first = next(iter(groups.values()))[0]
    source = first["source_curve"]
    ax.plot(np.arange(len(source)), source, "k-", lw=0.8,
            label=f"{first['algo'].upper()} learning curve, training tasks (one episode in {first['k']})")
    ax.axhline(first["summary"]["zero_action"], color="grey", ls=":", label="zero action")
    ax.axhline(first["summary"]["random_policy"], color="grey", ls="-.", label="random policy")
    ax.set(xlabel="episode in context (downsampled units)", ylabel="return",
           title=f"{first['env']}: in-context RL on {len(first['tasks'])} unseen test tasks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def draw_path(ax, kind, where, **style):
    """One episode's trace, where [steps, d], as the env's trace_kind says (envs.MetaTask): a 2-D path, or
    the velocity against the step ("speed"). Returns the line."""
    return ax.plot(*(where.T if kind != "speed" else (np.arange(len(where)), where[:, 0])), **style)[0]


def draw_goal(ax, kind, goal, start, length=1.0):
    """The hidden goal: the point to reach, the target velocity, or an arrow along the direction to run in.
    Returns the points it occupies [n, d], which frame_panel must keep in view (matplotlib drops an arrow
    whose tip falls outside the axes)."""
    if kind == "path":
        ax.plot(*goal, "*", color="k", ms=12)
        return goal[None]
    if kind == "speed":
        ax.axhline(goal[0], color="k", ls="--", lw=1)
        return goal[None]
    tip = start + length * goal
    ax.annotate("", xy=tip, xytext=start, arrowprops=dict(arrowstyle="->", lw=1.5))
    return np.stack([start, tip])


def frame_panel(ax, kind, where, marks):
    """Axis limits that hold every trace in `where` [..., steps, d] and the goal's marks (draw_goal's), and
    the axis labels."""
    if kind == "speed":
        values = np.append(where[..., 0].ravel(), marks[:, 0])
        ax.set(xlabel="step", ylabel="forward velocity", ylim=(values.min() - 0.2, values.max() + 0.2))
        return
    points = np.vstack([where.reshape(-1, 2), marks])
    low, high = points.min(0), points.max(0)
    half = 0.55 * (high - low).max() + 1e-3    # a square around the middle: the same scale on both axes
    middle = (low + high) / 2
    ax.set(xlim=(middle[0] - half, middle[0] + half), ylim=(middle[1] - half, middle[1] + half),
           xlabel="x", ylabel="y", aspect="equal")


def plot_behaviour(result, behaviour, png_path):
    """Rows: the first test tasks; columns: the first, middle and last in-context episode with every seed's
    rollout in it (one colour a seed) and the hidden goal marked."""
    kind = envs.ENVS[result["env"]].env_class.trace_kind
    where, goals, returns = behaviour["where"], behaviour["goal"], behaviour["returns"]
    n_tasks, n_seeds, n_episodes = returns.shape
    episodes = sorted({0, n_episodes // 2, n_episodes - 1})
    fig, axes = plt.subplots(n_tasks, len(episodes), figsize=(3 * len(episodes), 3 * n_tasks), squeeze=False)
    for i in range(n_tasks):
        length = max(1.0, np.abs(where[i] - where[i, :, :, :1]).max())  # Ant-Dir's arrow: as long as the paths
        for ax, e in zip(axes[i], episodes):
            for s in range(n_seeds):
                draw_path(ax, kind, where[i, s, e], color=f"C{s}", lw=1)
            marks = draw_goal(ax, kind, goals[i, 0], where[i, 0, e, 0], length)
            frame_panel(ax, kind, where[i, :, episodes], marks)
            ax.set_title(f"test task {i}, episode {e + 1}: return {returns[i, :, e].mean():.1f}", fontsize=8)
    goal = "dashed: the target" if kind == "speed" else "black: the goal, which the agent never sees"
    fig.suptitle(f"{result['env']}, {label(result)}\n{n_seeds} rollouts a task (colours); {goal}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def animate(result, behaviour, gif_path, max_frames=240):
    """The first test task's first rollout, episode after episode, step by step, earlier episodes fading:
    the agent searching for a goal that is shown here but never to it. matplotlib's own GIF writer."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    kind = envs.ENVS[result["env"]].env_class.trace_kind
    where, goal = behaviour["where"][0, 0], behaviour["goal"][0, 0]     # [episodes, steps, d], [g]
    n_episodes, n_steps = where.shape[:2]
    stride = -(-n_episodes * n_steps // max_frames)                      # every stride-th step, and each end
    frames = [(e, t) for e in range(n_episodes) for t in sorted({*range(1, n_steps, stride), n_steps - 1})]
    fig, ax = plt.subplots(figsize=(3.6, 3.6))
    marks = draw_goal(ax, kind, goal, where[0, 0], max(1.0, np.abs(where - where[0, 0]).max()))
    frame_panel(ax, kind, where, marks)
    ax.set(xticks=[], yticks=[])  # ticks would take most of each frame's drawing time
    lines = [draw_path(ax, kind, where[e, :1], color="C0", lw=1.5) for e in range(n_episodes)]
    title = ax.set_title(" ", fontsize=9)
    fig.tight_layout()  # with room for the title

    def draw(frame):
        e, t = frame
        for past in range(e):
            lines[past].set(color="grey", alpha=0.2 + 0.5 * past / n_episodes, lw=1)
        trace = where[e, :t + 1]
        lines[e].set_data(*(trace.T if kind != "speed" else (np.arange(t + 1), trace[:, 0])))
        title.set_text(f"{result['env']}: in-context episode {e + 1} of {n_episodes}")

    FuncAnimation(fig, draw, frames=frames).save(gif_path, writer=PillowWriter(fps=12), dpi=70)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="*", default=[os.path.join("out", "reacher_goal", "mamba")],
                   help="checkpoint directories (or ckpt.pt files) written by ad.py; a run's last.pt scores "
                        "its final weights instead of the best on validation (-> RUN/final)")
    p.add_argument("--tasks", type=envs.positive_int, default=10, help="held-out test tasks")
    p.add_argument("--seeds", type=envs.positive_int, default=3, help="rollouts per task")
    p.add_argument("--episodes", type=envs.positive_int, default=None,
                   help="consecutive episodes; None: a training stream's length")
    p.add_argument("--action-mode", default="sample", choices=("mean", "sample"),
                   help="actions: the Gaussian head's mean or a sample of it (mse checkpoints: always the mean)")
    p.add_argument("--unbounded-context", action="store_true",
                   help="let a model trained on N-token windows see the whole rollout (Mamba's state keeps "
                        "everything); otherwise every architecture sees at most its training window")
    p.add_argument("--blind", action=argparse.BooleanOptionalAction, default=True,
                   help="also roll out the reward-blind control: every reward input to the model zeroed "
                        "(twice the rollouts); what it keeps of the gain was not learned from rewards")
    p.add_argument("--animate", action="store_true",
                   help="also write behaviour.gif: the first test task's episodes one after another")
    p.add_argument("--out", default=None, help="where eval.json and the figures go; None: the checkpoint's "
                                               "directory, out/compare for several")
    p.add_argument("--seed", type=int, default=0, help="test tasks and rollouts seed")
    p.add_argument("--source-test-data", default=None,
                   help="the source algorithm's histories on the test tasks (`ALGO.py --split test`), whose final "
                        "return is the strict score's 1; None: DATA_test beside the run's training data, else "
                        "the final on the training tasks (flagged)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="compare runs scored on different test tasks or episode counts (refused otherwise)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--threads", type=envs.positive_int, default=None, help="torch CPU threads; None: torch's")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.device = envs.resolve_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        results, behaviours = zip(*(evaluate(d, args) for d in args.checkpoints))
        if len({r["env"] for r in results}) > 1:
            raise ValueError(f"checkpoints of different envs ({', '.join(r['env'] for r in results)}) "
                             f"cannot share one plot")
        if not args.allow_mixed:
            check_alike(results, args.checkpoints)
        groups = group_runs(results)
        out = args.out or (args.checkpoints[0] if len(args.checkpoints) == 1 else os.path.join("out", "compare"))
        if out.endswith(".pt"):  # one checkpoint file: its run directory; last.pt's RUN/final keeps ckpt.pt's eval.json
            out = os.path.join(run_directory(out), "final") if is_final(out) else run_directory(out)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f)
        plot(groups, os.path.join(out, "incontext.png"))
        drawn = next(((r, b) for r, b in zip(results, behaviours) if b is not None), None)  # the first checkpoint's
        if drawn:
            plot_behaviour(*drawn, os.path.join(out, "behaviour.png"))
        if args.animate:
            if not drawn:
                raise ValueError("--animate needs an AD checkpoint: a baseline's results.json holds no behaviour")
            animate(*drawn, os.path.join(out, "behaviour.gif"))
        table = score_table(groups) + "\n\n" + protocol_table(groups)
        with open(os.path.join(out, "scores.md"), "w") as f:
            f.write(table + "\n")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    for result, directory in zip(results, args.checkpoints):
        s = result["summary"]
        print(f"{os.path.normpath(directory)}: {label(result)}, seed {result['train_seed']}, on "
              f"{len(result['tasks'])} test tasks x {result['seeds']} seeds, actions {result['actions']}: "
              f"first episode {s['first_episode']:.2f} -> last 5 {s['last5']:.2f}; strict score {s['score_last5']:.2f} "
              f"(zero action {s['zero_action']:.2f}, random {s['random_policy']:.2f}: the better = 0; "
              f"{s['source_final']:.2f} = 1: {s['source_final_from']}), vs random "
              f"{s['score_last5_vs_random']:.2f}")
        if "blind_score_last5" in s:
            print(f"  reward-blind control: first episode {s['blind_first_episode']:.2f} -> last 5 "
                  f"{s['blind_last5']:.2f}, strict score {s['blind_score_last5']:.2f}: "
                  f"{s['score_last5'] - s['blind_score_last5']:.2f} of the score comes from reading rewards")
        if "task_guess_error" in s:
            errors = s["task_guess_error"]
            print(f"  its guess of the task (--task-loss) from its own rollouts is off by {errors[0]:.3f} after episode "
                  f"1, {errors[-1]:.3f} after episode {len(errors)} (root-mean-square distance; the training tasks' "
                  f"mean: {s['task_mean_error']:.3f})")
        if "tasks_beating_told_mean_task" in s:
            print(f"  the expert told the mean task scores {s['told_mean_task']:.2f}; the last 5 episodes beat it on "
                  f"{s['tasks_beating_told_mean_task']} of {len(result['tasks'])} test tasks")
        if "goal_distance_start" in s:
            print(f"  distance to the goal: {s['goal_distance_start']:.3f} at the start, at the end of the first "
                  f"episode {s['goal_distance_end_first']:.3f}, of the last 5 {s['goal_distance_end_last5']:.3f}")
    print(table)
    print(f"wrote {out}/eval.json, {out}/scores.md, {out}/incontext.png"
          + (f", {out}/behaviour.png" if drawn else "") + (f", {out}/behaviour.gif" if args.animate else ""))


if __name__ == "__main__":
    main()
