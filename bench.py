"""Speed benchmarks. Targets are reported in the README, never asserted as timed tests.

    python bench.py rl --env reacher_goal --tasks 1 10 70
        Multi-task RL throughput: env steps per second when T tasks train together in one process
        (DESIGN.md, "Many tasks at once"). The T = 1 row is the one-task-at-a-time baseline.
Small models run faster and steadier on one thread; the machine is shared, so compare rows of one run.
"""
import argparse
import time
from types import SimpleNamespace

import torch

import envs
import sac


def bench_rl(args):
    torch.set_num_threads(args.threads)
    settings = envs.ENVS[args.env]
    rl = {"lr": 1e-4, "alpha_init": 1.0, "hidden": 256, **settings.rl}
    print(f"SAC on {args.env}: {args.n_envs} envs per task, batch 256, hidden {rl['hidden']}, "
          f"{args.gradient_steps} gradient step(s) per vector step, {args.threads} thread(s), "
          f"about {args.vector_steps} vector steps timed after a quarter as many untimed")
    print(f"{'tasks':>6} {'env steps/s (all)':>18} {'env steps/s per task':>21} {'ms per vector step':>19}"
          f" {'vs one at a time':>17}")
    horizon = settings.horizon
    timed = max(1, round(args.vector_steps / horizon)) * horizon  # histories hold whole episodes
    base = None
    for n_tasks in sorted(set(args.tasks) | {1}):  # one task alone is the baseline
        tasks = envs.sample_tasks(args.env, n_tasks)
        vec = envs.MultiTaskVecEnv(args.env, tasks, args.n_envs)
        agent = sac.SAC(n_tasks, vec.obs_dim, vec.act_dim, hidden=rl["hidden"], lr=rl["lr"],
                        alpha_init=rl["alpha_init"], device=args.device)
        run = SimpleNamespace(device=args.device, warmup=0, gradient_steps=args.gradient_steps,
                              batch_size=256, buffer_size=10 ** 6)
        sac.collect_and_learn(agent, vec, horizon * max(1, timed // horizon // 4), run, desc="warm-up")
        start = time.perf_counter()
        sac.collect_and_learn(agent, vec, timed, run, desc=f"{n_tasks} tasks")
        seconds = time.perf_counter() - start
        total = n_tasks * args.n_envs * timed / seconds
        base = base or total  # the one-task row
        print(f"{n_tasks:>6} {total:>18.0f} {total / n_tasks:>21.1f} {1000 * seconds / timed:>19.1f}"
              f" {total / base:>16.1f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    rl = sub.add_parser("rl", help="multi-task SAC throughput")
    rl.add_argument("--env", default="reacher_goal", choices=list(envs.ENVS))
    rl.add_argument("--tasks", type=sac.positive_int, nargs="+", default=[10, 20, 70])
    rl.add_argument("--vector-steps", type=sac.positive_int, default=200)
    rl.add_argument("--n-envs", type=sac.positive_int, default=5)
    rl.add_argument("--gradient-steps", type=sac.positive_int, default=1)
    rl.add_argument("--threads", type=sac.positive_int, default=torch.get_num_threads())
    rl.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    {"rl": bench_rl}[args.bench](args)


if __name__ == "__main__":
    main()
