"""Speed benchmarks. Targets are reported in the README, never asserted as timed tests.

    python bench.py rl --env reacher_goal --tasks 10 20 70 [--threads 1]
        Multi-task RL throughput: env steps per second when T tasks train together in one process
        (DESIGN.md, "Many tasks at once"), against one task alone (always measured first).
Small models run faster and steadier on one thread; the machine is shared, so compare rows of one run.
"""
import argparse
import time

import torch

import envs
import sac


def bench_rl(args):
    torch.set_num_threads(args.threads)
    argv = ["--env", args.env, "--device", args.device, "--n-envs", str(args.n_envs)]
    if args.gradient_steps:
        argv += ["--gradient-steps", str(args.gradient_steps)]
    cfg = sac.parse_args(sac.build_parser("sac", ""), argv)  # sac.py's defaults for this env
    cfg.warmup = 0  # time learning steps from the start
    horizon = envs.ENVS[args.env].horizon
    timed = max(1, round(args.vector_steps / horizon)) * horizon  # histories hold whole episodes
    print(f"SAC on {args.env}: {cfg.n_envs} envs per task, batch {cfg.batch_size}, hidden {cfg.hidden}, "
          f"{cfg.gradient_steps} gradient step(s) per vector step, {args.threads} thread(s), "
          f"{timed} vector steps timed after a quarter as many untimed")
    print(f"{'tasks':>6} {'env steps/s (all)':>18} {'env steps/s per task':>21} {'ms per vector step':>19}"
          f" {'vs one at a time':>17}")
    base = None
    for n_tasks in sorted(set(args.tasks) | {1}):  # one task alone is the baseline
        vec = envs.MultiTaskVecEnv(args.env, envs.sample_tasks(args.env, n_tasks), cfg.n_envs)
        agent = sac.make_sac(cfg, n_tasks, vec.obs_dim, vec.act_dim)
        sac.collect_and_learn(agent, vec, horizon * max(1, timed // horizon // 4), cfg, desc="warm-up")
        start = time.perf_counter()
        sac.collect_and_learn(agent, vec, timed, cfg, desc=f"{n_tasks} tasks")
        seconds = time.perf_counter() - start
        total = n_tasks * cfg.n_envs * timed / seconds
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
    rl.add_argument("--gradient-steps", type=sac.positive_int, default=None, help="default: sac.py's")
    rl.add_argument("--threads", type=sac.positive_int, default=torch.get_num_threads())
    rl.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    {"rl": bench_rl}[args.bench](args)


if __name__ == "__main__":
    main()
