"""Speed benchmarks. Their results are in RESULTS.md, never asserted as timed tests.

    python bench.py rl [--algo sac|droq|ppo] --env reacher_goal --tasks 10 20 70 [--threads 1]
        Multi-task RL throughput: env steps per second when T tasks train together in one process
        (rl.py's docstring, "Many tasks at once"), against one task alone (always measured first), with the
        script's own defaults for the env (ENVS overrides included).
    python bench.py scan [--shapes 16x128x400 8x256x1000] [--backends ref torch] [--threads 1]
        Mamba's selective scan: forward and backward milliseconds of each backend (mamba.selective_scan)
        on batch x dim x L inputs with N = 16, median of --repeats, side by side in one run. On a GPU the
        defaults sweep L from 1k to 64k with dim 1536 and compare "triton" with "torch" and, when the
        package is importable (never a dependency), the official CUDA kernel as backend "mamba_ssm".
        On a CPU "triton" runs only under TRITON_INTERPRET=1: a correctness tool, not a speed measure.
    python bench.py rollout [--env reacher_goal] [--contexts 1024 4096 16384 65536] [--batch 10]
        In-context rollout cost: per-step latency of Mamba.step, Transformer.step (KV cache) and
        Hybrid.step (DM-H: Mamba once per segment, a KV cache of at most c + 1 tokens) at the env's ENVS
        sizes once 1k..64k tokens of context have been consumed, and the memory the context takes; prints
        a table and saves a plot (--plot, default figures/rollout_latency.png).
    python bench.py ad [--env point_goal] [--batch 16] [--length 200]
        AD training updates per second for Mamba and the transformer at the env's ENVS sizes, fp32 against
        bf16 autocast (ad.py --dtype), side by side; on a GPU add fp32-strict (--dtypes fp32-strict fp32
        bf16): IEEE fp32 against TF32 (fp32 on the tensor cores) against bf16.
    python bench.py rl2 [--env point_goal] [--packs 1 4] [--archs mamba gru]
        RL^2's PPO updates per second (rl2.py) with P trials packed into each training row against one trial
        a row (S5-RL's speed claim): the same trials and minibatches of as many trials, only their layout
        differs; Mamba reads a packed row in one scan with resets, the GRU is cut at the trials (a control).
Small models run faster and steadier on one thread; the machine is shared, so compare rows of one run.
"""
import argparse
import math
import os
import resource
import statistics
import time

import matplotlib
import torch

import ad
import droq
import envs
import hybrid
import mamba
import ppo
import rl
import rl2
import sac
import transformer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

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
    configs = {dtype: rl.parse_args(build_parser(), argv + ["--dtype", dtype], args.algo) for dtype in args.dtypes}
    cfg = configs[args.dtypes[0]]  # the script's defaults for this env
    horizon = envs.ENVS[args.env].horizon
    unit = math.lcm(horizon, getattr(cfg, "rollout_steps", 1))  # whole episodes (and PPO: whole rollouts)
    timed = max(1, round(args.vector_steps / unit)) * unit
    updates = (f"{cfg.epochs} epochs of minibatches every {cfg.rollout_steps} vector steps" if args.algo == "ppo"
               else f"{cfg.gradient_steps} gradient step(s) per vector step")
    print(f"{args.algo.upper()} on {args.env}: {cfg.n_envs} envs per task, batch {cfg.batch_size}, "
          f"hidden {cfg.hidden}, {updates}, {args.threads} thread(s), "
          f"{timed} vector steps timed after a quarter as many untimed; update precisions side by side")
    print(f"{'tasks':>6} {'dtype':>6} {'env steps/s (all)':>18} {'per task':>9} {'ms per vector step':>19}"
          f" {'vs one task':>12} {f'vs {args.dtypes[0]}':>8} {'envs alone: steps/s':>20}")
    base = {}
    for n_tasks in sorted(set(args.tasks) | {1}):  # one task alone is the baseline
        first = None
        for dtype, cfg in configs.items():
            cfg.warmup = 0  # off-policy: time learning steps from the start
            torch.manual_seed(0)
            vec = envs.MultiTaskVecEnv(args.env, envs.sample_tasks(args.env, n_tasks), cfg.n_envs)
            agent = make_agent(cfg, n_tasks, vec.obs_dim, vec.act_dim)
            learn(agent, vec, horizon * max(1, timed // horizon // 4), cfg, desc="warm-up")
            start = time.perf_counter()
            learn(agent, vec, timed, cfg, desc=f"{n_tasks} tasks, {dtype}")
            seconds = time.perf_counter() - start
            total = n_tasks * cfg.n_envs * timed / seconds
            base.setdefault(dtype, total)  # the one-task row
            first = first or total
            print(f"{n_tasks:>6} {dtype:>6} {total:>18.0f} {total / n_tasks:>9.1f} {1000 * seconds / timed:>19.1f}"
                  f" {total / base[dtype]:>11.1f}x {total / first:>7.2f}x {env_steps_per_second(vec, timed):>20.0f}",
                  flush=True)


def env_steps_per_second(vec, n_steps):
    """The simulation alone (random actions, no network): the bound on any speed-up of the updates."""
    actions = torch.rand(n_steps, vec.n_tasks, vec.n_envs, vec.act_dim).numpy() * 2 - 1
    vec.reset()
    start = time.perf_counter()
    for a in actions:
        if vec.step(a)[2]:
            vec.reset()
    return vec.n_tasks * vec.n_envs * n_steps / (time.perf_counter() - start)


CPU_SCAN_SHAPES = [(16, 128, 400), (8, 256, 1000), (2, 128, 4000)]
GPU_SCAN_SHAPES = [(8, 1536, 1024), (8, 1536, 4096), (2, 1536, 16384), (1, 1536, 65536)]  # the bar: 8x1536x4096


def bench_scan(args):
    torch.set_num_threads(args.threads)
    cuda = str(args.device).startswith("cuda")
    shapes = args.shapes or (GPU_SCAN_SHAPES if cuda else CPU_SCAN_SHAPES)
    backends = args.backends or (["torch", "triton"] + ["mamba_ssm"] * (_official_scan() is not None) if cuda
                                 else ["ref", "torch"])
    print(f"selective_scan forward + backward, N = {args.d_state}, {args.dtype}, with D, z, delta_bias and "
          f"softplus, median of {args.repeats}, {args.threads} thread(s), device {args.device}")
    print(f"{'batch x dim x L':>18} {'backend':>9} {'forward ms':>11} {'backward ms':>12} {'total ms':>10}"
          f" {'vs ' + backends[0]:>10}")
    for shape in shapes:
        totals = {}
        for backend in backends:
            try:
                forward, backward = time_scan(backend, *shape, args.d_state, args.repeats, args.device, args.dtype)
            except (ValueError, RuntimeError) as error:  # e.g. "triton" on a CPU, out of memory, no mamba_ssm
                print(f"{'x'.join(map(str, shape)):>18} {backend:>9}  n/a: {str(error).splitlines()[0]}")
                if cuda:
                    torch.cuda.empty_cache()
                continue
            totals[backend] = forward + backward
            first = totals.get(backends[0])
            speed_up = f"{first / totals[backend]:>9.3g}x" if first else f"{'':>10}"
            print(f"{'x'.join(map(str, shape)):>18} {backend:>9} {1e3 * forward:>11.1f} {1e3 * backward:>12.1f}"
                  f" {1e3 * totals[backend]:>10.1f} {speed_up}", flush=True)
        if "triton" in totals and mamba._INTERPRETED:
            print(f"{'':>18} (triton ran in Triton's interpreter, on the CPU: a correctness tool, not a speed)")
        if not cuda:
            continue
        if "triton" in totals and "mamba_ssm" in totals:
            print(f"{'':>18} triton takes {totals['triton'] / totals['mamba_ssm']:.2f}x the official kernel's time"
                  f" (bar at 8x1536x4096: <= 1.5x)")
        if "triton" in totals and "torch" in totals:
            print(f"{'':>18} triton is {totals['torch'] / totals['triton']:.1f}x faster than torch"
                  f" (bar at 8x1536x4096: >= 10x)")


def time_scan(backend, batch, dim, L, N, repeats, device, dtype="float32"):
    """Median forward and backward seconds of one selective_scan call with D, z, delta_bias and softplus."""
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype)

    def leaf(*shape, scale=1.0, offset=0.0, dtype=dtype):
        return (torch.randn(*shape, generator=g) * scale + offset).to(device, dtype).requires_grad_()
    inputs = dict(u=leaf(batch, dim, L), delta=leaf(batch, dim, L, scale=0.5, offset=-2.0),
                  A=-leaf(dim, N, dtype=torch.float32).detach().abs(), B=leaf(batch, N, L), C=leaf(batch, N, L),
                  D=leaf(dim, dtype=torch.float32), z=leaf(batch, dim, L),
                  delta_bias=leaf(dim, scale=0.1, dtype=torch.float32))
    if backend == "mamba_ssm":
        scan = _official_scan()
        if scan is None:
            raise RuntimeError("mamba_ssm is not importable (pip install mamba-ssm on a CUDA machine)")
    else:
        def scan(**kwargs):
            return mamba.selective_scan(**kwargs, backend=backend)
    warm_up = 1 if str(device).startswith("cuda") else 0  # on a GPU one untimed call compiles the kernels
    forward, backward = [], []
    for _ in range(warm_up + repeats):
        _sync(device)
        start = time.perf_counter()
        y = scan(**inputs, delta_softplus=True)
        _sync(device)
        middle = time.perf_counter()
        y.float().sum().backward()
        _sync(device)
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
        for tensor in inputs.values():
            tensor.grad = None
    return statistics.median(forward[warm_up:]), statistics.median(backward[warm_up:])


def _official_scan():
    """The official CUDA kernel (Gu & Dao's mamba_ssm), when installed: a yardstick, never a dependency."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def bench_rollout(args):
    """Per-step latency of Mamba.step, Transformer.step (KV cache) and Hybrid.step (DM-H) once `context`
    tokens have been consumed, at the env's ENVS sizes, and the memory the context takes. A step's cost does
    not depend on what the state holds, so it is filled at random rather than by a real prefix (a 64k-token
    prefix through the transformer would take hours on a CPU); its size is the real one."""
    torch.set_num_threads(args.threads)
    settings = envs.ENVS[args.env]
    vec = envs.MultiTaskVecEnv(args.env, envs.sample_tasks(args.env, 1, "test"), 1)
    d_in, d_out = ad.model_io(vec.obs_dim, vec.act_dim, "nll")
    print(f"{args.env} sizes, batch {args.batch}, median of {args.steps} steps, device {args.device}, "
          f"{args.threads} thread(s)")
    rows = []
    for context in args.contexts:
        for arch in ad.ARCHS:
            config = ad.arch_config(arch, {**getattr(settings, arch), "d_state": 16}, d_in, d_out,
                                    max_len=context + args.steps + 1, obs_dim=vec.obs_dim)
            model = ad.build_model(config).to(args.device).eval()
            state = filled_state(model, args.batch, context, args.device)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(args.device)
            seconds = time_steps(model, state, args.batch, d_in, args.steps, args.device)
            # CUDA: the peak allocated during these steps; CPU: the process's peak resident memory so far
            peak = (torch.cuda.max_memory_allocated(args.device) if args.device.startswith("cuda")
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
            rows.append({"context": context, "arch": arch, "params": ad.count_params(config),
                         "step_ms": seconds * 1e3, "state_mib": tensor_bytes(state) / 2 ** 20, "peak_mib": peak})
            print(f"  context {context:>6}  {arch:<11}  step {seconds * 1e3:9.2f} ms   state "
                  f"{rows[-1]['state_mib']:9.1f} MiB   peak {peak:9.0f} MiB", flush=True)
            del model, state
    step_ms = {(r["arch"], r["context"]): r["step_ms"] for r in rows}
    short, long = min(args.contexts), max(args.contexts)
    for arch in ad.ARCHS:
        print(f"{arch}: step at {long} tokens / at {short}: {step_ms[arch, long] / step_ms[arch, short]:.2f}x")
    for arch in ("mamba", "hybrid"):
        print(f"at {long} tokens the transformer's step takes "
              f"{step_ms['transformer', long] / step_ms[arch, long]:.1f}x the {arch}'s")
    if os.path.dirname(args.plot):
        os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    plot_rollout(rows, args.plot, f"{args.env} sizes (ENVS), batch {args.batch}, {args.device}, "
                                  f"{args.threads} thread(s); the context filled at random")
    print(f"wrote {args.plot}")
    return rows


def bench_ad(args):
    """AD training updates per second (forward, backward, AdamW step, as ad.train runs them) for both
    architectures at the env's ENVS CPU sizes (or --d-model/--n-layer), fp32 against bf16 autocast, side
    by side in one run: the same random tokens, median of --repeats timings of --updates updates."""
    torch.set_num_threads(args.threads)
    settings = envs.ENVS[args.env]
    vec = envs.MultiTaskVecEnv(args.env, envs.sample_tasks(args.env, 1, "test"), 1)
    d_in, d_out = ad.model_io(vec.obs_dim, vec.act_dim, "nll")
    tokens = torch.randn(args.batch, args.length, d_in, device=args.device)
    targets = {key: torch.rand(args.batch, args.length, vec.act_dim, device=args.device)
               for key in ("act", "act_mean", "act_std")}
    opt_args = argparse.Namespace(lr=1e-3, weight_decay=1e-4)
    print(f"AD training on {args.env} tokens: batch {args.batch} x {args.length} tokens, {args.threads} thread(s), "
          f"device {args.device}; median of {args.repeats} x {args.updates} updates")
    for arch in ("mamba", "transformer"):
        sizes = {**getattr(settings, arch), "d_state": 16}
        config = ad.arch_config(arch, sizes, d_in, d_out, max_len=args.length)
        rates = {}
        for dtype in args.dtypes:
            envs.set_matmul_precision(args.device, dtype)
            torch.manual_seed(0)
            model = ad.build_model(config).to(args.device)
            optimizer = ad.make_optimizer(model, opt_args)

            def update():
                with envs.autocast(args.device, dtype == "bf16"):
                    out = model(tokens)
                loss = ad.action_loss(out.float(), targets, "nll")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            update()  # warm-up
            times = []
            for _ in range(args.repeats):
                _sync(args.device)
                start = time.perf_counter()
                for _ in range(args.updates):
                    update()
                _sync(args.device)
                times.append((time.perf_counter() - start) / args.updates)
            rates[dtype] = 1 / statistics.median(times)
            print(f"  {arch:<11} {config['d_model']}x{config['n_layer']} ({ad.count_params(config):,} params)  "
                  f"{dtype}: {rates[dtype]:7.2f} updates/s", flush=True)
        first = args.dtypes[0]
        for dtype in args.dtypes[1:]:
            print(f"  {arch}: {dtype} / {first} = {rates[dtype] / rates[first]:.2f}x")


def bench_rl2(args):
    """rl2.ppo_update's updates per second for each --packs P: --trials trials (played once per arch, by a
    fresh agent) laid out as trials / P rows of P x K x H steps, minibatches of --minibatch-trials trials,
    each layout timed from the same fresh agent and optimiser. Only the layout differs: a Mamba row is one
    scan over P trials with resets (P times longer, P times fewer rows); a GRU row is cut at the trials."""
    torch.set_num_threads(args.threads)
    if args.trials % math.lcm(*args.packs) or args.minibatch_trials % math.lcm(*args.packs):
        raise SystemExit(f"--trials and --minibatch-trials must be multiples of every --packs {args.packs}")
    vec = envs.MultiTaskVecEnv(args.env, envs.sample_tasks(args.env, args.trials), 1)
    trial_len, d_in = args.episodes * vec.horizon, vec.obs_dim + vec.act_dim + 2
    print(f"RL^2 PPO on {args.env}: {args.trials} trials of {args.episodes} episodes ({trial_len} steps), minibatches "
          f"of {args.minibatch_trials} trials, {args.threads} thread(s), device {args.device}; median of "
          f"{args.repeats} x one PPO iteration's updates")
    for arch in args.archs:
        rates = {}
        for P in args.packs:
            cfg = rl2.parse_args(["--env", args.env, "--arch", arch, "--episodes", str(args.episodes), "--pack", str(P),
                                  "--rows", str(args.trials // P), "--minibatch-rows", str(args.minibatch_trials // P)])
            torch.manual_seed(0)
            model = rl2.build_model(arch, d_in, vec.act_dim + 1, cfg.d_model, cfg.n_layer)
            agent = rl2.Agent(model, vec.act_dim).to(args.device)
            if P == args.packs[0]:
                trials = rl2.play_trials(agent, vec, args.episodes, args.device)
            batch = {key: rl2.pack(value, P) for key, value in trials.items()}
            opt = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)
            rl2.ppo_update(agent, opt, batch, trial_len, cfg)  # warm-up (on a GPU: compiles the kernels)
            times = []
            for _ in range(args.repeats):
                _sync(args.device)
                start = time.perf_counter()
                n_updates = rl2.ppo_update(agent, opt, batch, trial_len, cfg)
                _sync(args.device)
                times.append((time.perf_counter() - start) / n_updates)
            rates[P] = 1 / statistics.median(times)
            print(f"  {arch:<6} ({rl2.count_params(agent):,} params)  {P} trial(s) a row: {args.trials // P:>3} rows x "
                  f"{P * trial_len:>5} steps  {rates[P]:7.2f} updates/s  {rates[P] / rates[args.packs[0]]:5.2f}x",
                  flush=True)


def filled_state(model, batch, context, device):
    """A state as after `context` tokens: a KV cache holding `context` tokens (transformer), or Mamba's
    fixed-size one (DM-H's too: its local cache restarts every segment, whatever the context)."""
    state = model.init_state(batch, device)
    if isinstance(model, transformer.Transformer):  # fill the first `context` slots of every cache
        for cache in state["k"] + state["v"]:
            cache[:, :, :context].normal_()
        state["length"] = context
        return state
    if isinstance(model, hybrid.Hybrid):
        state["mamba"] = filled_state(model.mamba, batch, context, device)
        return state
    return [tuple(torch.randn_like(t) for t in layer) for layer in state]


@torch.no_grad()
def time_steps(model, state, batch, d_in, n_steps, device):
    """Median seconds of one step over n_steps (after one warm-up). DM-H's steps differ within a segment
    (Mamba runs at its first), so each of its samples is a whole segment's mean step: the amortised cost."""
    x = torch.randn(batch, d_in, device=device)
    period = model.segment if isinstance(model, hybrid.Hybrid) else 1
    times = []
    for _ in range(n_steps + 1):
        _sync(device)
        start = time.perf_counter()
        for _ in range(period):
            _, state = model.step(x, state)
        _sync(device)
        times.append((time.perf_counter() - start) / period)
    return statistics.median(times[1:])


def tensor_bytes(state):
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        state = list(state.values())
    return sum(tensor_bytes(s) for s in state) if isinstance(state, (list, tuple)) else 0


def plot_rollout(rows, png, title):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.3))
    fig.suptitle(title, fontsize=10)
    for arch in ad.ARCHS:
        mine = [r for r in rows if r["arch"] == arch]
        x = [r["context"] for r in mine]
        left.plot(x, [r["step_ms"] for r in mine], "o-", label=f"{arch} ({mine[0]['params'] / 1e6:.1f}M params)")
        right.plot(x, [r["state_mib"] for r in mine], "o-", label=arch)
    left.set(xscale="log", yscale="log", xlabel="tokens of context already consumed", ylabel="ms per step",
             title="rollout step latency")
    right.set(xscale="log", yscale="log", xlabel="tokens of context already consumed", ylabel="MiB",
              title="memory of the context (state / KV cache)")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _sync(device):
    """Wait for the device being measured (on a machine with several GPUs, not GPU 0's queue)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    elif torch.device(device).type == "mps":
        torch.mps.synchronize()


def shape_arg(text):
    try:
        return tuple(envs.positive_int(x) for x in text.split("x"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected BATCHxDIMxL, e.g. 8x256x1000, got {text}") from None


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    rl_parser = sub.add_parser("rl", help="multi-task RL throughput")
    rl_parser.add_argument("--algo", default="sac", choices=list(RL_ALGOS))
    rl_parser.add_argument("--env", default="reacher_goal", choices=list(envs.ENVS))
    rl_parser.add_argument("--tasks", type=envs.positive_int, nargs="+", default=[10, 20, 70])
    rl_parser.add_argument("--vector-steps", type=envs.positive_int, default=200)
    rl_parser.add_argument("--n-envs", type=envs.positive_int, default=5)
    rl_parser.add_argument("--gradient-steps", type=envs.positive_int, default=None,
                    help="off-policy updates per vector step (default: the script's)")
    rl_parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="update precisions to time side by side (the scripts' --dtype)")
    rl_parser.add_argument("--threads", type=envs.positive_int, default=torch.get_num_threads())
    rl_parser.add_argument("--device", default="auto")
    scan = sub.add_parser("scan", help="Mamba's selective scan, each backend")
    scan.add_argument("--shapes", type=shape_arg, nargs="+", default=None,
                      help="BATCHxDIMxL (default: a few CPU-sized shapes; on a GPU dim 1536, L 1k to 64k)")
    scan.add_argument("--backends", nargs="+", default=None, choices=mamba.BACKENDS[1:] + ("mamba_ssm",),
                      help="default: ref torch on a CPU; torch triton (and mamba_ssm if importable) on a GPU")
    scan.add_argument("--d-state", type=envs.positive_int, default=16)
    scan.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    scan.add_argument("--repeats", type=envs.positive_int, default=3)
    scan.add_argument("--threads", type=envs.positive_int, default=1)
    scan.add_argument("--device", default="auto")
    rollout = sub.add_parser("rollout", help="Mamba, transformer and DM-H step latency against context length")
    rollout.add_argument("--env", default="reacher_goal", choices=list(envs.ENVS), help="model sizes from ENVS")
    rollout.add_argument("--contexts", type=envs.positive_int, nargs="+", default=[1024, 4096, 16384, 65536])
    rollout.add_argument("--batch", type=envs.positive_int, default=10, help="rollouts stepped together")
    rollout.add_argument("--steps", type=envs.positive_int, default=10,
                         help="timed steps (DM-H: segments) per row (median)")
    rollout.add_argument("--plot", default=os.path.join("figures", "rollout_latency.png"))
    rollout.add_argument("--threads", type=envs.positive_int, default=1)
    rollout.add_argument("--device", default="auto")
    train = sub.add_parser("ad", help="AD training updates per second, both archs, fp32 vs bf16")
    train.add_argument("--env", default="point_goal", choices=list(envs.ENVS), help="token widths and ENVS sizes")
    train.add_argument("--batch", type=envs.positive_int, default=16)
    train.add_argument("--length", type=envs.positive_int, default=200, help="tokens per sample")
    train.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32-strict", "fp32", "bf16"],
                       help="ad.py's --dtype: on CUDA fp32 is TF32 on the tensor cores, fp32-strict IEEE fp32")
    train.add_argument("--updates", type=envs.positive_int, default=5)
    train.add_argument("--repeats", type=envs.positive_int, default=3)
    train.add_argument("--threads", type=envs.positive_int, default=1)
    train.add_argument("--device", default="auto")
    packed = sub.add_parser("rl2", help="RL^2 PPO updates per second, packed trials vs one trial a row")
    packed.add_argument("--env", default="point_goal", choices=list(envs.ENVS), help="rl2.py's settings for it")
    packed.add_argument("--archs", nargs="+", default=["mamba", "gru"], choices=["mamba", "gru"])
    packed.add_argument("--packs", type=envs.positive_int, nargs="+", default=[1, 4],
                        help="trials per training row; the first is the ratios' base")
    packed.add_argument("--episodes", type=envs.positive_int, default=10,
                        help="episodes per trial (rl2.py on point_goal: AD's streams of 10)")
    packed.add_argument("--trials", type=envs.positive_int, default=32, help="trials per PPO iteration (rl2.py: 8 x 4)")
    packed.add_argument("--minibatch-trials", type=envs.positive_int, default=8, help="trials per minibatch (2 x 4)")
    packed.add_argument("--repeats", type=envs.positive_int, default=5)
    packed.add_argument("--threads", type=envs.positive_int, default=1)
    packed.add_argument("--device", default="auto")
    return parser


def main():
    parser = build_parser()
    args = parser.parse_args()
    try:
        args.device = envs.resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    {"rl": bench_rl, "scan": bench_scan, "rollout": bench_rollout, "ad": bench_ad, "rl2": bench_rl2}[args.bench](args)


if __name__ == "__main__":
    main()
