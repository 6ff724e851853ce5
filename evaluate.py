"""In-context RL on unseen tasks: roll a trained AD checkpoint out and plot how its return improves from
episode to episode with no gradient step (the paper's Figures 1 and 2, Section 5).

For every checkpoint: M held-out *test* tasks (envs.sample_tasks(split="test"), never used for training or
model selection) x S seeds, N consecutive episodes each with a persistent context (the model's recurrent
state), all tasks batched in one model call per step (ad.rollout). It writes
  eval.json      every episode's return per task and seed, the baselines and a summary;
  incontext.png  the in-context curve (mean and spread over tasks) against the source algorithm's learning
                 curve on its training tasks (every k-th episode, the units the model was trained in) and
                 the zero-action and random-policy baselines.
The summary's score normalises the mean return of the last 5 episodes: 0 = random policy, 1 = the source
algorithm's final return.

    python evaluate.py                                    # out/reacher_goal/mamba
    python evaluate.py out/point_goal/mamba --act mean
    python evaluate.py out/a out/b --out out/compare      # several checkpoints -> one comparison plot
"""
import argparse
import json
import os
import sys

import matplotlib
import numpy as np
import torch

import ad
import envs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def evaluate(directory, args):
    """Roll one checkpoint out on the test tasks; returns the eval.json dict."""
    model, ckpt = ad.load_checkpoint(directory, device=args.device)
    meta = ckpt["meta"]
    tasks = envs.sample_tasks(meta["env"], args.tasks, "test", seed=args.seed)
    n_episodes = args.episodes or meta["episodes"]
    returns = ad.rollout(model, meta, tasks, n_episodes, n_seeds=args.seeds, act=args.act, seed=args.seed,
                         device=args.device, desc=os.path.basename(os.path.normpath(directory)))
    zero, random = (envs.baseline_return(meta["env"], tasks, policy) for policy in ("zero", "random"))
    last5 = returns[:, :, -5:].mean()
    summary = {"first_episode": float(returns[:, :, 0].mean()), "last5": float(last5),
               "score_last5": float(ad.normalised(last5, random, meta["source_final"])),
               "score_last5_per_task": ad.normalised(returns[:, :, -5:].mean((1, 2)), random,
                                                     meta["source_final"]).tolist(),
               "source_final": meta["source_final"], "zero_action": zero, "random_policy": random}
    return {"checkpoint": os.path.abspath(directory), "env": meta["env"], "arch": ckpt["model_config"]["arch"],
            "model_config": ckpt["model_config"], "trained_updates": ckpt["iter"], "algo": meta["algo"],
            "k": meta["k"], "context": meta["context"], "loss": meta["loss"], "act": args.act,
            "seeds": args.seeds, "tasks": tasks.tolist(), "returns": returns.tolist(),
            "source_curve": meta["source_curve"], "summary": summary}


def label(result, directory):
    return f"AD-{result['arch']} ({os.path.normpath(directory)})"


def plot(results, directories, png_path):
    """In-context curves of every checkpoint, the source algorithm's learning curve and the baselines."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result, directory in zip(results, directories):
        per_task = np.asarray(result["returns"]).mean(1)                  # [tasks, episodes]
        x = np.arange(per_task.shape[1])
        mean, std = per_task.mean(0), per_task.std(0)
        line, = ax.plot(x, mean, label=label(result, directory))
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
    first = results[0]
    source = first["source_curve"]
    ax.plot(np.arange(len(source)), source, "k--",
            label=f"{first['algo'].upper()} learning curve, training tasks (one episode in {first['k']})")
    ax.axhline(first["summary"]["zero_action"], color="grey", ls=":", label="zero action")
    ax.axhline(first["summary"]["random_policy"], color="grey", ls="-.", label="random policy")
    ax.set(xlabel="episode in context (downsampled units)", ylabel="return",
           title=f"{first['env']}: in-context RL on {len(first['tasks'])} unseen test tasks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="*", default=[os.path.join("out", "reacher_goal", "mamba")],
                   help="checkpoint directories (or ckpt.pt files) written by ad.py")
    p.add_argument("--tasks", type=envs.positive_int, default=10, help="held-out test tasks")
    p.add_argument("--seeds", type=envs.positive_int, default=3, help="rollouts per task")
    p.add_argument("--episodes", type=envs.positive_int, default=None,
                   help="consecutive episodes (default: a training stream's length)")
    p.add_argument("--act", default="sample", choices=("mean", "sample"),
                   help="actions: the Gaussian head's mean or a sample of it (mse checkpoints: always the mean)")
    p.add_argument("--out", default=None, help="where eval.json and incontext.png go (default: the checkpoint's "
                                               "directory; out/compare for several)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=envs.positive_int, default=None)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.device = ad.resolve_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        results = [evaluate(d, args) for d in args.checkpoints]
        if len({r["env"] for r in results}) > 1:
            raise ValueError(f"checkpoints of different envs ({', '.join(r['env'] for r in results)}) "
                             f"cannot share one plot")
        out = args.out or (args.checkpoints[0] if len(args.checkpoints) == 1 else os.path.join("out", "compare"))
        out = os.path.dirname(out) if out.endswith(".pt") else out
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f)
        plot(results, args.checkpoints, os.path.join(out, "incontext.png"))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    for result, directory in zip(results, args.checkpoints):
        s = result["summary"]
        print(f"{label(result, directory)} on {len(result['tasks'])} test tasks x {args.seeds} seeds, "
              f"actions {args.act}: first episode {s['first_episode']:.2f} -> last 5 {s['last5']:.2f}; "
              f"score {s['score_last5']:.2f} (random {s['random_policy']:.2f} = 0, "
              f"{result['algo']} final {s['source_final']:.2f} = 1; zero action {s['zero_action']:.2f})")
    print(f"wrote {out}/eval.json and {out}/incontext.png")


if __name__ == "__main__":
    main()
