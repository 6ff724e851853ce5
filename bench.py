"""Speed benchmarks. Targets are reported in the README, never asserted as timed tests.

    python bench.py rl [--algo sac|droq|ppo] --env reacher_goal --tasks 10 20 70 [--threads 1]
        Multi-task RL throughput: env steps per second when T tasks train together in one process
        (DESIGN.md, "Many tasks at once"), against one task alone (always measured first), with the
        script's own defaults for the env (ENVS overrides included).
    python bench.py scan [--shapes 16x128x400 8x256x1000] [--backends ref torch] [--threads 1]
        Mamba's selective scan: forward and backward seconds of each backend (mamba.selective_scan) on
        batch x dim x L inputs with N = 16, median of --repeats, side by side in one run.
Small models run faster and steadier on one thread; the machine is shared, so compare rows of one run.
"""
import argparse
import math
import statistics
import time

import torch

import droq
import envs
import mamba
import ppo
import sac

RL_ALGOS = {  # script -> (its command line, its agent, its collect-and-learn loop)
    "sac": (lambda: sac.build_parser("sac", ""), sac.make_sac, sac.collect_and_learn),
    "droq": (droq.build_parser, droq.make_droq, sac.collect_and_learn),
    "ppo": (ppo.build_parser, ppo.make_ppo, ppo.collect_and_learn),
}


def bench_rl(args):
    torch.set_num_threads(args.threads)
    build_parser, make_agent, learn = RL_ALGOS[args.algo]
    argv = ["--env", args.env, "--device", args.device, "--n-envs", str(args.n_envs)]
    if args.gradient_steps:
        argv += ["--gradient-steps", str(args.gradient_steps)]
    cfg = sac.parse_args(build_parser(), argv, args.algo)  # the script's defaults for this env
    cfg.warmup = 0  # off-policy: time learning steps from the start
    horizon = envs.ENVS[args.env].horizon
    unit = math.lcm(horizon, getattr(cfg, "rollout_steps", 1))  # whole episodes (and PPO: whole rollouts)
    timed = max(1, round(args.vector_steps / unit)) * unit
    updates = (f"{cfg.epochs} epochs of minibatches every {cfg.rollout_steps} vector steps" if args.algo == "ppo"
               else f"{cfg.gradient_steps} gradient step(s) per vector step")
    print(f"{args.algo.upper()} on {args.env}: {cfg.n_envs} envs per task, batch {cfg.batch_size}, "
          f"hidden {cfg.hidden}, {updates}, {args.threads} thread(s), "
          f"{timed} vector steps timed after a quarter as many untimed")
    print(f"{'tasks':>6} {'env steps/s (all)':>18} {'env steps/s per task':>21} {'ms per vector step':>19}"
          f" {'vs one at a time':>17} {'envs alone: steps/s':>20}")
    base = None
    for n_tasks in sorted(set(args.tasks) | {1}):  # one task alone is the baseline
        vec = envs.MultiTaskVecEnv(args.env, envs.sample_tasks(args.env, n_tasks), cfg.n_envs)
        agent = make_agent(cfg, n_tasks, vec.obs_dim, vec.act_dim)
        learn(agent, vec, horizon * max(1, timed // horizon // 4), cfg, desc="warm-up")
        start = time.perf_counter()
        learn(agent, vec, timed, cfg, desc=f"{n_tasks} tasks")
        seconds = time.perf_counter() - start
        total = n_tasks * cfg.n_envs * timed / seconds
        base = base or total  # the one-task row
        print(f"{n_tasks:>6} {total:>18.0f} {total / n_tasks:>21.1f} {1000 * seconds / timed:>19.1f}"
              f" {total / base:>16.1f}x {env_steps_per_second(vec, timed):>20.0f}", flush=True)


def env_steps_per_second(vec, n_steps):
    """The simulation alone (random actions, no network): the bound on any speed-up of the updates."""
    actions = torch.rand(n_steps, vec.n_tasks, vec.n_envs, vec.act_dim).numpy() * 2 - 1
    vec.reset()
    start = time.perf_counter()
    for a in actions:
        if vec.step(a)[2]:
            vec.reset()
    return vec.n_tasks * vec.n_envs * n_steps / (time.perf_counter() - start)


def bench_scan(args):
    torch.set_num_threads(args.threads)
    print(f"selective_scan forward + backward, N = {args.d_state}, median of {args.repeats}, "
          f"{args.threads} thread(s), device {args.device}")
    print(f"{'batch x dim x L':>18} {'backend':>8} {'forward s':>10} {'backward s':>11} {'vs ' + args.backends[0]:>10}")
    for shape in args.shapes:
        first = None
        for backend in args.backends:
            forward, backward = time_scan(backend, *shape, args.d_state, args.repeats, args.device)
            first = first or forward + backward
            print(f"{'x'.join(map(str, shape)):>18} {backend:>8} {forward:>10.3f} {backward:>11.3f}"
                  f" {first / (forward + backward):>9.1f}x", flush=True)


def time_scan(backend, batch, dim, L, N, repeats, device):
    """Median forward and backward seconds of one selective_scan call with D, z and delta_softplus."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(device).requires_grad_()
    inputs = dict(u=leaf(batch, dim, L), delta=leaf(batch, dim, L, scale=0.5), A=-leaf(dim, N).detach().abs(),
                  B=leaf(batch, N, L), C=leaf(batch, N, L), D=leaf(dim), z=leaf(batch, dim, L))
    forward, backward = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        y = mamba.selective_scan(**inputs, delta_softplus=True, backend=backend)
        _sync(device)
        middle = time.perf_counter()
        y.sum().backward()
        _sync(device)
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
    return statistics.median(forward), statistics.median(backward)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def shape_arg(text):
    try:
        return tuple(envs.positive_int(x) for x in text.split("x"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected BATCHxDIMxL, e.g. 8x256x1000, got {text}") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    rl = sub.add_parser("rl", help="multi-task RL throughput")
    rl.add_argument("--algo", default="sac", choices=list(RL_ALGOS))
    rl.add_argument("--env", default="reacher_goal", choices=list(envs.ENVS))
    rl.add_argument("--tasks", type=envs.positive_int, nargs="+", default=[10, 20, 70])
    rl.add_argument("--vector-steps", type=envs.positive_int, default=200)
    rl.add_argument("--n-envs", type=envs.positive_int, default=5)
    rl.add_argument("--gradient-steps", type=envs.positive_int, default=None,
                    help="off-policy updates per vector step (default: the script's)")
    rl.add_argument("--threads", type=envs.positive_int, default=torch.get_num_threads())
    rl.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    scan = sub.add_parser("scan", help="Mamba's selective scan, each backend")
    scan.add_argument("--shapes", type=shape_arg, nargs="+", default=[(16, 128, 400), (8, 256, 1000)],
                      help="BATCHxDIMxL")
    scan.add_argument("--backends", nargs="+", default=["ref", "torch"], choices=mamba.BACKENDS[1:])
    scan.add_argument("--d-state", type=envs.positive_int, default=16)
    scan.add_argument("--repeats", type=envs.positive_int, default=3)
    scan.add_argument("--threads", type=envs.positive_int, default=1)
    scan.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    {"rl": bench_rl, "scan": bench_scan}[args.bench](args)


if __name__ == "__main__":
    main()
