"""The meta-RL tasks of the paper (Section 5.1, Appendix A/B) and the learning-history file format.

A meta-RL task family is a set of MDPs that share dynamics but differ in a hidden task parameter
(a goal position, a target velocity, a running direction). The parameter is *not* in the observation,
so an agent must find it by trial and error: that is what Algorithm Distillation learns to do in context.

    point_goal        2-D point robot, goal on the upper unit half-circle      (CPU demo, tests)
    reacher_goal      Reacher-v5, target hidden, uniform in the disk r <= 0.2
    pusher_goal       Pusher-v5, cylinder start and goal position hidden
    half_cheetah_vel  HalfCheetah-v5, run at a hidden target velocity in [0, 3]
    ant_dir           Ant-v5, run in a hidden direction in [0, 2 pi)

Every env: action space Box(-1, 1) (rescaled inside), fixed-length episodes (truncated at the horizon,
never terminated) so a history reshapes to [episodes, horizon, ...], and info["task"] carries the task.
All are registered with gymnasium (`gymnasium.make("ReacherGoal-v0", task=...)`).

This file also holds `ENVS` (the per-env paper settings every script takes its defaults from, through
`parse_with_env_defaults`), `sample_tasks` (deterministic, disjoint train/val/test tasks),
`MultiTaskVecEnv` (tasks x envs copies stepped in one call) and `save_history` / `load_history` (the
.npz contract between the RL scripts and ad.py).
"""
import argparse
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import gymnasium as gym
import mujoco
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.pusher_v5 import PusherEnv
from gymnasium.envs.mujoco.reacher_v5 import ReacherEnv


# ----------------------------------------------------------------------------- the tasks

def _mujoco_warning(message):
    # MuJoCo would append its warnings to MUJOCO_LOG.TXT in the working directory. The one it gives on
    # every HalfCheetah load (a deprecated XML attribute of gymnasium's model) is harmless: drop it.
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning)


mujoco.set_mju_user_warning(_mujoco_warning)


class MetaTask:
    """Mixin: a hidden task parameter and a fixed horizon (truncation only, no early termination).

    `trace()` returns (where, goal), read from the simulator, for evaluate.py's pictures of behaviour;
    `trace_kind` says how to draw them: "path" (where is a 2-D point, goal the 2-D point to reach),
    "direction" (where is a 2-D point, goal the unit direction to run in) or "speed" (where is a
    velocity, goal the target velocity)."""
    horizon: int
    trace_kind: str

    def _init_task(self, task, default):
        self.task = np.asarray(default if task is None else task, dtype=np.float32).copy()
        self.t = 0

    def _step_result(self, obs, reward):
        self.t += 1
        return obs, float(reward), False, self.t >= self.horizon, {"task": self.task.copy()}

    def expert_view(self, told):
        """What a task-seeing expert (expert.py) is shown beside the observation when told the task `told`
        (the true task or another): the task itself, where nothing it describes moves during an episode."""
        return told


class PointGoal(MetaTask, gym.Env):
    """2-D point robot (PEARL / VariBAD): s <- s + 0.1 a from (0, 0), reward -||s - goal||.
    The goal lies on the upper unit half-circle; the observation is the position only."""
    horizon = 20
    trace_kind = "path"

    def __init__(self, task=None, render_mode=None):
        self._init_task(task, default=(1.0, 0.0))
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.pos = np.zeros(2, dtype=np.float32)
        return self.pos.copy(), {"task": self.task.copy()}

    def step(self, action):
        self.pos = self.pos + 0.1 * np.clip(action, -1.0, 1.0).astype(np.float32)
        return self._step_result(self.pos.copy(), -np.linalg.norm(self.pos - self.task))

    def trace(self):
        return self.pos.copy(), self.task.copy()

    def ctrl_cost_of(self, action):  # as MujocoMetaTask's: point_goal's reward charges no control cost
        return np.zeros(np.shape(action)[:-1])


class MujocoMetaTask(MetaTask):
    """Shared MuJoCo plumbing: Box(-1, 1) actions rescaled to the actuators' range, float32 obs,
    info["task"] at reset. Subclasses define `_reward` and, where the base env's observation shows
    the task, `_get_obs` and `reset_model`."""
    ctrl_cost_weight: float  # the reward's control cost is ctrl_cost_weight * ||ctrl||^2

    def _finish_init(self, task, default):
        self._init_task(task, default)
        low, high = self.model.actuator_ctrlrange.T
        self._act_center, self._act_scale = (high + low) / 2, (high - low) / 2
        self.action_space = spaces.Box(-1.0, 1.0, low.shape, np.float32)
        obs_dim = self._get_obs().shape[0]
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)

    def reset(self, *, seed=None, options=None):
        self.t = 0
        obs, info = super().reset(seed=seed, options=options)
        return obs.astype(np.float32), info

    def ctrl(self, action):
        """The actuator controls a Box(-1, 1) action becomes (what the reward's control cost sees)."""
        return self._act_center + self._act_scale * np.clip(action, -1.0, 1.0)

    @classmethod
    def ctrl_cost(cls, ctrl):
        return cls.ctrl_cost_weight * np.square(ctrl).sum(-1)

    def ctrl_cost_of(self, action):
        """The control cost the reward charges for Box(-1, 1) actions [..., act_dim] -> [...]: the part of the
        reward that the agent's own action alone decides, the same on every task."""
        return self.ctrl_cost(self.ctrl(action))

    def step(self, action):
        ctrl = self.ctrl(action)
        xy_before = self.data.body(self._main_body_name).xpos[:2].copy()
        self.do_simulation(ctrl, self.frame_skip)
        xy_velocity = (self.data.body(self._main_body_name).xpos[:2] - xy_before) / self.dt
        return self._step_result(self._get_obs().astype(np.float32), self._reward(ctrl, xy_velocity))

    def _get_reset_info(self):
        return {"task": self.task.copy()}


class ReacherGoal(MujocoMetaTask, ReacherEnv):
    """Reacher-v5 whose target is hidden: obs = cos/sin of the joint angles, joint velocities and the
    fingertip position (the target and fingertip-target vector of Reacher-v5 are removed).
    Reward -||tip - target|| - ||a||^2. Task: target (x, y)."""
    horizon = 50
    trace_kind = "path"
    _main_body_name = "fingertip"
    ctrl_cost_weight = 1.0

    def __init__(self, task=None, **kwargs):
        ReacherEnv.__init__(self, **kwargs)
        self._finish_init(task, default=(0.1, 0.1))

    def reset_model(self):
        qpos = self.init_qpos + self.np_random.uniform(-0.1, 0.1, self.model.nq)
        qpos[-2:] = self.task
        qvel = self.init_qvel + self.np_random.uniform(-0.005, 0.005, self.model.nv)
        qvel[-2:] = 0
        self.set_state(qpos, qvel)
        return self._get_obs()

    def _get_obs(self):
        theta = self.data.qpos[:2]
        tip = self.get_body_com("fingertip")[:2]
        return np.concatenate([np.cos(theta), np.sin(theta), self.data.qvel[:2], tip])

    def _reward(self, ctrl, xy_velocity):
        dist = np.linalg.norm(self.get_body_com("fingertip")[:2] - self.get_body_com("target")[:2])
        return -dist - self.ctrl_cost(ctrl)

    def trace(self):  # the fingertip and the target
        return self.get_body_com("fingertip")[:2].copy(), self.get_body_com("target")[:2].copy()


class PusherGoal(MujocoMetaTask, PusherEnv):
    """Pusher-v5 whose cylinder start and goal are hidden: obs = 7 joint angles, 7 joint velocities and
    the arm tip position (the object and goal positions of Pusher-v5 are removed). Reward as Pusher-v5:
    -||obj - goal|| - 0.5 ||obj - tip|| - 0.1 ||ctrl||^2. Task: (obj_x, obj_y, goal_x, goal_y), offsets
    from the bodies' positions in the XML."""
    horizon = 100
    trace_kind = "path"
    _main_body_name = "tips_arm"
    ctrl_cost_weight = 0.1

    def __init__(self, task=None, **kwargs):
        PusherEnv.__init__(self, **kwargs)
        self._finish_init(task, default=(0.0, -0.2, 0.0, 0.0))

    def reset_model(self):
        qpos = self.init_qpos.copy()  # (Pusher-v5's own reset_model writes into init_qpos)
        obj_x, obj_y, goal_x, goal_y = self.task
        qpos[-4:] = obj_y, obj_x, goal_y, goal_x  # the XML declares each slide joint pair y before x
        qvel = self.init_qvel + self.np_random.uniform(-0.005, 0.005, self.model.nv)
        qvel[-4:] = 0
        self.set_state(qpos, qvel)
        return self._get_obs()

    def _get_obs(self):
        return np.concatenate([self.data.qpos[:7], self.data.qvel[:7], self.get_body_com("tips_arm")])

    def _reward(self, ctrl, xy_velocity):
        obj, tip, goal = (self.get_body_com(b) for b in ("object", "tips_arm", "goal"))
        return -np.linalg.norm(obj - goal) - 0.5 * np.linalg.norm(obj - tip) - self.ctrl_cost(ctrl)

    def cylinder_moved(self):
        """How far the cylinder has been pushed since the reset, (dx, dy)."""
        return self.data.qpos[-4:-2][::-1] - self.task[:2]  # the slides hold (y, x), as reset_model writes them

    def trace(self):  # the cylinder and where it must go
        return self.get_body_com("object")[:2].copy(), self.get_body_com("goal")[:2].copy()

    def expert_view(self, told):
        # Pushing needs feedback: a task that says only where the cylinder started leaves the expert to push
        # blind. So it is shown the cylinder moved as far as it has really moved since the reset, from where
        # it is told the cylinder started: told the true task, that is where the cylinder is now; told
        # another, the cylinder stays out of sight until the expert happens to move it.
        return np.concatenate([told[:2] + self.cylinder_moved(), told[2:]]).astype(np.float32)


class HalfCheetahVel(MujocoMetaTask, HalfCheetahEnv):
    """HalfCheetah-v5 that must run at a hidden target velocity v* (MAML / PEARL):
    reward -|v_x - v*| - 0.05 ||a||^2. Task: (v*,)."""
    horizon = 200
    trace_kind = "speed"
    _main_body_name = "torso"
    ctrl_cost_weight = 0.05

    def __init__(self, task=None, **kwargs):
        HalfCheetahEnv.__init__(self, **kwargs)
        self._finish_init(task, default=(1.0,))

    def _reward(self, ctrl, xy_velocity):
        return -abs(xy_velocity[0] - self.task[0]) - self.ctrl_cost(ctrl)

    def trace(self):  # the forward velocity at the end of the step (the reward scores the step's mean)
        return self.data.qvel[:1].copy(), self.task.copy()


class AntDir(MujocoMetaTask, AntEnv):
    """Ant-v5 that must run in a hidden direction (MAML / PEARL): reward = velocity . (cos, sin)
    - control cost - contact cost + healthy bonus; it never terminates when unhealthy.
    Task: the unit direction (cos, sin)."""
    horizon = 200
    trace_kind = "direction"
    _main_body_name = "torso"
    ctrl_cost_weight = 0.5  # Ant-v5's

    def __init__(self, task=None, **kwargs):
        kwargs = {"include_cfrc_ext_in_observation": False, "terminate_when_unhealthy": False, **kwargs}
        AntEnv.__init__(self, **kwargs)
        self._finish_init(task, default=(1.0, 0.0))

    def _reward(self, ctrl, xy_velocity):
        return (xy_velocity @ self.task + self.healthy_reward
                - self.ctrl_cost(ctrl) - self.contact_cost)

    def trace(self):  # the torso on the ground plane and the direction to run in
        return self.get_body_com("torso")[:2].copy(), self.task.copy()


# ----------------------------------------------------------------------------- task samplers

def _direction(angle):
    return np.array([np.cos(angle), np.sin(angle)])


def _point_goal(rng):
    return _direction(rng.uniform(0, np.pi))


def _reacher_goal(rng):
    return 0.2 * np.sqrt(rng.uniform()) * _direction(rng.uniform(0, 2 * np.pi))  # uniform in the disk


# pusher_goal's prior: cylinder start as in Pusher-v5; goal in a box around the default goal; not too close
PUSHER_OBJ_BOX, PUSHER_GOAL_BOX, PUSHER_MIN_GAP = ((-0.2, 0.2), (-0.3, 0.0)), ((-0.2, 0.2), (-0.2, 0.2)), 0.17


def _pusher_goal(rng):
    while True:
        obj = np.array([rng.uniform(*PUSHER_OBJ_BOX[0]), rng.uniform(*PUSHER_OBJ_BOX[1])])
        goal = np.array([rng.uniform(*PUSHER_GOAL_BOX[0]), rng.uniform(*PUSHER_GOAL_BOX[1])])
        if np.linalg.norm(obj - goal) > PUSHER_MIN_GAP:
            return np.concatenate([obj, goal])


def _half_cheetah_vel(rng):
    return np.array([rng.uniform(0.0, 3.0)])


def _ant_dir(rng):
    return _direction(rng.uniform(0, 2 * np.pi))


# ----------------------------------------------------------------------------- the settings table

@dataclass(frozen=True)
class EnvSettings:
    """One row of the paper's Appendix A/B tables, plus what our scripts need to run the env."""
    gym_id: str
    env_class: type
    sample_task: callable          # rng -> task vector
    algo: str                      # source RL algorithm (Appendix A)
    train_tasks: int               # number of training tasks (Appendix A)
    steps_per_task: int            # env steps of learning history per task (Appendix A)
    k: int                         # keep every k-th episode for AD (Appendix B)
    weight_decay: float            # AD optimiser weight decay (Appendix B)
    mamba: dict                    # AD-Mamba size (Appendix B)
    transformer: dict              # AD-transformer size (Appendix B; see the note above ENVS)
    hybrid: dict                   # Decision Mamba-Hybrid size (hybrid.py; see the note above ENVS)
    rl: dict = field(default_factory=dict)  # {algo: overrides of that RL script's defaults} for this env
    ad: dict = field(default_factory=dict)  # overrides of ad.py's defaults for this env
    expert: dict = field(default_factory=dict)  # overrides of expert.py's defaults (its task-seeing SAC)

    @property
    def horizon(self):
        return self.env_class.horizon


# Appendix B's transformer table gives "embedding dim" 42 / 64 / 64 / 128 with 4 heads and no model
# width. Read as the width per head (d_model = 4 x 42 = 168, ...), a pre-norm GPT with feed-forward 2048
# has the table's parameter counts: 6.4M for Reacher (table: 6M), 11.8M for Pusher and Cheetah (12M);
# Ant's 512 x 6 layers gives 18.9M against the table's 14M, which no reading of the table matches.
# Decision Mamba-Hybrid (hybrid.py) is not in the AD paper. Its segment length c follows DM-H Appendix B
# (5 steps for its 20-step Grid World episodes, 20 for D4RL's long ones; 10 for Reacher's 50); its Mamba and
# transformer share one width, sized to about the AD-Mamba's parameter count (ad.py --params matches exactly).
ENVS = {
    # Not in the paper: the CPU demo. Rewards are about -1 per step, so an initial entropy weight of 1
    # swamps them; small nets, lr 1e-3 and 4 updates per vector step solve it in the first half of the run.
    # The histories run to 4,000 steps (40 episodes per stream) so that, with k = 4, AD sees 10 episodes of
    # which the later ones are converged: shorter histories, kept whole, distil worse.
    "point_goal": EnvSettings(
        "PointGoal-v0", PointGoal, _point_goal, algo="sac", train_tasks=100, steps_per_task=4000,
        k=4, weight_decay=1e-4, mamba=dict(d_model=64, n_layer=3),
        # about the Mamba's size: 95,044 vs 98,884 parameters with its 200-token streams (ad.py prints both)
        transformer=dict(d_model=48, n_layer=3, n_head=4, d_ff=192),
        hybrid=dict(segment=5, d_model=48, n_layer=2, attn_layers=2, n_head=4, d_ff=168),  # 98,452 params
        rl=dict(sac=dict(lr=1e-3, alpha_init=0.1, hidden=64, gradient_steps=4),
                droq=dict(lr=1e-3, alpha_init=0.1, hidden=64),
                # PPO is on-policy: slow but steady, it needs far more steps than SAC to solve the task
                ppo=dict(steps=100_000)),
        # Appendix B's 450 epochs are for 1e5-step histories; on these short ones 100 epochs (3,000 updates)
        # at a higher lr are enough for the demo, and half as many fall short
        ad=dict(lr=3e-3, epochs=100),
        expert=dict(steps=20_000, hidden=64, gradient_steps=4)),
    "reacher_goal": EnvSettings(
        "ReacherGoal-v0", ReacherGoal, _reacher_goal, algo="sac", train_tasks=70, steps_per_task=100_000,
        k=4, weight_decay=1e-4, mamba=dict(d_model=384, n_layer=6),
        transformer=dict(d_model=168, n_layer=8, n_head=4, d_ff=2048),
        hybrid=dict(segment=10, d_model=288, n_layer=4, attn_layers=3, n_head=4, d_ff=1152),
        # Appendix A's lr 1e-4 with an initial alpha of 1 (SB3's default) lets the entropy bonus swamp
        # rewards of about -0.2 per step for a whole 20k-step run; lr 1e-3 with alpha 0.1 learns within it.
        # DroQ is SAC with other critics: the same reasons hold.
        rl=dict(sac=dict(lr=1e-3, alpha_init=0.1), droq=dict(lr=1e-3, alpha_init=0.1)),
        expert=dict(steps=150_000)),
    # Appendix A's PPO learns Pusher as written, slowly and steadily; SB3's reward scaling (--norm-reward)
    # learns a little faster and ends a little higher.
    "pusher_goal": EnvSettings(
        "PusherGoal-v0", PusherGoal, _pusher_goal, algo="ppo", train_tasks=35, steps_per_task=500_000,
        k=10, weight_decay=2e-4, mamba=dict(d_model=512, n_layer=8),
        transformer=dict(d_model=256, n_layer=9, n_head=4, d_ff=2048),
        hybrid=dict(segment=20, d_model=448, n_layer=4, attn_layers=3, n_head=4, d_ff=1792),
        rl=dict(ppo=dict(norm_reward=True)),
        expert=dict(steps=1_200_000)),
    "half_cheetah_vel": EnvSettings(
        "HalfCheetahVel-v0", HalfCheetahVel, _half_cheetah_vel, algo="sac", train_tasks=15,
        steps_per_task=400_000, k=8, weight_decay=5e-4, mamba=dict(d_model=512, n_layer=8),
        transformer=dict(d_model=256, n_layer=9, n_head=4, d_ff=2048),
        hybrid=dict(segment=20, d_model=448, n_layer=4, attn_layers=3, n_head=4, d_ff=1792),
        # As on Reacher: with lr 1e-4 and alpha 1 the policy stays as wide as at the start and the return
        # flat at the random policy's; with these it rises.
        rl=dict(sac=dict(lr=1e-3, alpha_init=0.1)),
        expert=dict(steps=300_000)),
    "ant_dir": EnvSettings(
        "AntDir-v0", AntDir, _ant_dir, algo="droq", train_tasks=30, steps_per_task=500_000,
        k=10, weight_decay=5e-4, mamba=dict(d_model=512, n_layer=8),
        transformer=dict(d_model=512, n_layer=6, n_head=4, d_ff=2048),
        hybrid=dict(segment=20, d_model=448, n_layer=4, attn_layers=3, n_head=4, d_ff=1792),
        # Appendix A's lr 1e-4 and alpha 1 leave the ant at the random policy's return; with these it
        # learns to stay up, then to walk.
        rl=dict(droq=dict(lr=1e-3, alpha_init=0.1)),
        expert=dict(steps=500_000)),
}

for _name, _settings in ENVS.items():
    if _settings.gym_id not in gym.registry:
        gym.register(id=_settings.gym_id, entry_point=_settings.env_class)


def positive_int(text):
    """argparse type for counts (--tasks, --steps, ...): a one-line error for 0 or less."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def env_settings(name):
    """ENVS[name], or a one-line error that lists the valid names."""
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; choose one of: {', '.join(ENVS)}")
    return ENVS[name]


def parse_with_env_defaults(parser, argv, defaults):
    """Parse a script's command line in two passes: --env alone first, then all of it, with the defaults that
    `defaults(env)` returns (a dict, read from ENVS[env]) set in between. So `--env ant_dir` brings Ant's
    settings (Appendix A/B and our per-env overrides), and a flag given on the command line still wins."""
    env = parser.parse_known_args(argv)[0].env
    parser.set_defaults(**defaults(env))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- processes and precision

def dist_env():
    """(rank, world size) of this process under torchrun (its RANK / WORLD_SIZE variables); (0, 1) for a
    plain run. The RL scripts split their tasks by it, ad.py its batches."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(name):
    """Every script's --device -> a torch device name. 'auto' is CUDA where present, else the CPU (Apple's
    GPU only when asked for: --device mps). Under torchrun 'cuda' is this process's own GPU,
    cuda:LOCAL_RANK. Raises ValueError, one line, for a device this machine does not have."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and device.index is None and dist_env()[1] > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= n_gpus:
            raise ValueError(f"--device cuda: torchrun started more processes on this machine than it has GPUs "
                             f"({n_gpus}): use --nproc_per_node {n_gpus} or fewer")
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and (device.index or 0) >= n_gpus:
        have = f"this machine has {n_gpus} GPU(s), cuda:0 to cuda:{n_gpus - 1}" if n_gpus else "no CUDA GPU here"
        raise ValueError(f"--device {name}: {have}" + ("" if n_gpus else "; use --device cpu"))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS (Apple silicon's GPU) is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):  # any other backend torch knows: ask it
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError, NotImplementedError) as e:
            raise ValueError(f"--device {name}: {str(e).splitlines()[0]}") from None
    return str(device)


def set_matmul_precision(device, dtype):
    """On CUDA, fp32 matmuls run on the tensor cores as TF32 (fp32's range, a 10-bit mantissa: several
    times the throughput of IEEE fp32) unless --dtype fp32-strict. A CPU's fp32 is left as it is."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("highest" if dtype == "fp32-strict" else "high")


def autocast(device, bf16):
    """bf16 matmuls where asked (torch.autocast); a no-op context otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def use_bf16(dtype, device):
    """Whether a script's --dtype asks for bf16 matmuls on `device`: bf16 always, auto where bf16_is_fast."""
    return dtype == "bf16" or (dtype == "auto" and bf16_is_fast(device))


def bf16_is_fast(device):
    """Whether bf16 matmuls have hardware units here: a CUDA GPU that supports them, or a CPU with AMX
    or AVX512-BF16 (on other CPUs autocast to bf16 still runs, emulated and slower than fp32)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: do not guess
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def make_env(name, task=None, seed=None):
    """A bare env (no gymnasium wrappers: the fixed horizon is built in), reset with `seed`."""
    env = env_settings(name).env_class(task=task)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def sample_tasks(name, n, split="train", seed=0):
    """n tasks of env `name` as an array [n, task_dim]. Deterministic in (split, seed); each split
    draws from its own random stream, so train, validation and test tasks never coincide. The first
    m tasks of a call with n >= m are the tasks of the call with m."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(_SPLIT_IDS)}")
    sampler = env_settings(name).sample_task
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], 0x7A5C])
    return np.stack([sampler(rng) for _ in range(n)]).astype(np.float32)


# ----------------------------------------------------------------------------- many envs at once

class MultiTaskVecEnv:
    """n_tasks x n_envs environments stepped in one call, as arrays with a leading [task, env] axis.

    All episodes have the same fixed length, so every env ends its episode on the same step: `step`
    says when (`episode_over`) and the caller resets all of them together. Copies of one task get
    different seeds (different initial states); `task_ids` (default 0, 1, ...) are the tasks' indices in
    their run, so that a task's envs are seeded alike whichever tasks it is stepped beside."""

    def __init__(self, name, tasks, n_envs, seed=0, task_ids=None):
        self.horizon = env_settings(name).horizon
        task_ids = range(len(tasks)) if task_ids is None else task_ids
        self.envs = [[make_env(name, task, seed=seed * 1_000_003 + 1000 * i + j) for j in range(n_envs)]
                     for i, task in zip(task_ids, tasks)]
        self.n_tasks, self.n_envs = len(tasks), n_envs
        first = self.envs[0][0]
        self.obs_dim, self.act_dim = first.observation_space.shape[0], first.action_space.shape[0]
        self.t = 0

    def reset(self):
        self.t = 0
        return np.stack([[env.reset()[0] for env in row] for row in self.envs])

    def step(self, actions):
        """actions [n_tasks, n_envs, act_dim] -> obs [.., obs_dim], reward [n_tasks, n_envs], episode_over."""
        obs = np.empty((self.n_tasks, self.n_envs, self.obs_dim), np.float32)
        rew = np.empty((self.n_tasks, self.n_envs), np.float32)
        for i, row in enumerate(self.envs):
            for j, env in enumerate(row):
                obs[i, j], rew[i, j], *_ = env.step(actions[i, j])
        self.t += 1
        return obs, rew, self.t >= self.horizon

    def expert_views(self, told):
        """Every env's expert_view (MetaTask) of the task it is told, told [n_tasks, n_envs, task_dim]."""
        return np.stack([[env.expert_view(task) for env, task in zip(row, row_told)]
                         for row, row_told in zip(self.envs, told)])

    def trace(self):
        """Every env's trace() (MetaTask): where [n_tasks, n_envs, d], goal [n_tasks, n_envs, g]."""
        where, goal = zip(*(env.trace() for row in self.envs for env in row))
        return (np.stack(where).reshape(self.n_tasks, self.n_envs, -1),
                np.stack(goal).reshape(self.n_tasks, self.n_envs, -1))


def baseline_return(name, tasks, policy, n_envs=4, seed=0):
    """Mean episode return over `tasks` of a fixed policy: "zero" (no action) or "random" (uniform):
    the reference lines that a learning curve must rise above."""
    if policy not in ("zero", "random"):
        raise ValueError(f"unknown baseline policy {policy!r}; choose zero or random")
    vec = MultiTaskVecEnv(name, tasks, n_envs, seed=seed)
    rng = np.random.default_rng(seed)
    vec.reset()
    total, episode_over = 0.0, False
    while not episode_over:
        shape = (vec.n_tasks, vec.n_envs, vec.act_dim)
        actions = np.zeros(shape) if policy == "zero" else rng.uniform(-1, 1, shape)
        _, rew, episode_over = vec.step(actions)
        total += rew.mean()
    return float(total)


# ----------------------------------------------------------------------------- learning histories

class HistoryError(ValueError):
    """A learning-history file is missing, malformed, truncated or holds NaNs."""


def save_history(path, *, obs, act, rew, task, env, algo, seed, steps, act_mean=None, act_std=None, split="train"):
    """Write one task's learning history atomically (temp file + rename: a kill never leaves a
    half-written file under `path`). Arrays: obs [E, n_episodes, H, obs_dim], act (and optional
    act_mean, act_std) [E, n_episodes, H, act_dim] in [-1, 1], rew [E, n_episodes, H]; `split`: whose
    task it is (sample_tasks), so that AD never trains on the tasks it is scored on."""
    arrays = dict(obs=obs, act=act, rew=rew, task=task)
    arrays.update({k: v for k, v in (("act_mean", act_mean), ("act_std", act_std)) if v is not None})
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    arrays.update(env=np.array(env), algo=np.array(algo), split=np.array(split), seed=np.array(seed, np.int64),
                  steps=np.array(steps, np.int64))
    _check_history(arrays, path)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def write_atomic(path, write):
    """Call write(binary file) on a temp file beside `path`, then rename it to `path`: a kill never leaves
    half a file there. Every file a long run must be able to resume from is written this way."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; data and checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path, obj, indent=None):
    """json.dump `obj` to `path`, atomically (write_atomic)."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def load_history(path):
    """Read and validate one history file; a dict of its arrays (metadata as Python scalars).
    Raises HistoryError naming the file when it is missing, unreadable, truncated or inconsistent."""
    if not os.path.isfile(path):
        raise HistoryError(f"{path}: no such history file")
    with open(path, "rb") as f:
        # A .npz is a zip archive. Anything else np.load would take for a pickle, and refuse as one.
        if f.read(4) != b"PK\x03\x04":
            raise HistoryError(f"{path}: not a .npz file written by the RL scripts")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile, zlib, EOF and format errors all mean a corrupted file
        raise HistoryError(f"{path}: not a readable .npz history ({type(e).__name__}: {e})") from None
    _check_history(data, path)
    data.setdefault("split", "train")  # files written before the split was kept: the RL scripts' default
    for k in ("env", "algo", "split"):
        data[k] = str(data[k])
    for k in ("seed", "steps"):
        data[k] = int(data[k])
    return data


HISTORY_BOUNDS = {"act": (-1, 1), "act_mean": (-1, 1), "act_std": (0, 1)}  # a policy in the [-1, 1] action box


def _check_history(d, path):
    required = ("obs", "act", "rew", "task", "env", "algo", "seed", "steps")
    missing = [k for k in required if k not in d]
    if missing:
        raise HistoryError(f"{path}: missing arrays {missing}")
    if d["obs"].ndim != 4 or d["act"].ndim != 4 or d["rew"].ndim != 3:
        raise HistoryError(f"{path}: expected obs/act [E, episodes, H, dim] and rew [E, episodes, H], "
                           f"got {d['obs'].shape}, {d['act'].shape}, {d['rew'].shape}")
    lead = d["obs"].shape[:3]
    names = ["act", "rew"] + [k for k in ("act_mean", "act_std") if k in d]
    for k in names:
        if d[k].shape[:3] != lead:
            raise HistoryError(f"{path}: {k} has leading shape {d[k].shape[:3]}, obs has {lead}")
    for k in ("act_mean", "act_std"):
        if k in d and d[k].shape != d["act"].shape:
            raise HistoryError(f"{path}: {k} shape {d[k].shape} != act shape {d['act'].shape}")
    if ("act_mean" in d) != ("act_std" in d):
        raise HistoryError(f"{path}: act_mean and act_std are stored together or not at all")
    if d["task"].ndim != 1:
        raise HistoryError(f"{path}: task has shape {d['task'].shape}, expected [task_dim]")
    for k in ["obs", "task"] + names:
        if not np.isfinite(d[k]).all():
            raise HistoryError(f"{path}: {k} holds NaN or inf")
    for k, (low, high) in HISTORY_BOUNDS.items():
        if k in d and d[k].size and (d[k].min() < low or d[k].max() > high):
            raise HistoryError(f"{path}: {k} outside [{low}, {high}]")


# ----------------------------------------------------------------------------- running many tasks

def history_path(out_dir, index):
    return os.path.join(out_dir, f"task_{index:03d}.npz")


def prepare_out_dir(out_dir):
    """Create `out_dir` and check it is writable; raise a one-line OSError if not."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise OSError(f"cannot write to {out_dir!r}: {e.strerror or e}") from None


def pending_tasks(out_dir, tasks, **expected):
    """Indices of the tasks whose history file is not yet complete in `out_dir` (resume support).
    A complete file written with other settings (env, algo, seed, steps, task) is an error rather than
    silently mixed into the data set; an unreadable one (never left by save_history) is redone."""
    todo = []
    for i, task in enumerate(tasks):
        path = history_path(out_dir, i)
        if not os.path.exists(path):
            todo.append(i)
            continue
        try:
            data = load_history(path)
        except HistoryError as e:
            print(f"warning: {e}; it will be regenerated")
            todo.append(i)
            continue
        found = {k: data[k] for k in expected}
        if found != expected or not np.allclose(data["task"], task):
            raise HistoryError(f"{path} was written with other settings ({found}, task {data['task']}) than "
                               f"this run ({expected}, task {task}); delete it or choose another --out")
    return todo


def plot_learning_curves(out_dir, png_path, max_tasks=6):
    """Plot the mean episode return against env steps per task for a few tasks of `out_dir`,
    plus the mean over all of them. Returns the final mean return (last 10% of episodes)."""
    import glob
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = sorted(glob.glob(os.path.join(out_dir, "task_*.npz")))
    if not paths:
        raise HistoryError(f"{out_dir}: no task_*.npz history files to plot")
    curves, tasks = [], []
    for path in paths:  # one file at a time: a whole run's histories may not fit in memory
        h = load_history(path)
        curves.append(h["rew"].sum(-1).mean(0))  # [n_episodes]: return averaged over the E streams
        tasks.append(h["task"])
    curves = np.stack(curves)
    x = h["steps"] / curves.shape[1] * np.arange(1, curves.shape[1] + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, c in enumerate(curves[:max_tasks]):
        ax.plot(x, c, lw=0.8, alpha=0.6, label=f"task {i}")
    ax.plot(x, curves.mean(0), "k", lw=2, label=f"mean of {len(curves)} tasks")
    for policy, style in (("zero", ":"), ("random", "--")):
        ax.axhline(baseline_return(h["env"], np.stack(tasks), policy), color="gray", ls=style,
                   label=f"{policy} action")
    ax.set(xlabel="env steps per task", ylabel="episode return",
           title=f"{h['algo'].upper()} learning histories: {h['env']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    last = max(1, curves.shape[1] // 10)
    return float(curves[:, -last:].mean())
