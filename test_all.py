"""The test suite: `pytest test_all.py` (a few minutes on 2 CPU cores; tiny sizes, fixed seeds)."""
import copy
import functools
import glob
import json
import math
import os
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter (numpy, on CPU tensors). Triton reads
    # TRITON_INTERPRET when @triton.jit wraps a function, i.e. when mamba.py is imported just below, so it
    # is set here, before that import, for this process (and the scripts the tests start) only.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ad
import droq
import envs
import evaluate
import expert as experts
import hybrid
import mamba
import mql
import noise
import ppo
import rl
import rl2
import sac
import transformer

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- envs

@pytest.mark.parametrize("name", list(envs.ENVS))
def test_check_env_passes(name):
    env = envs.make_env(name, envs.sample_tasks(name, 1)[0], seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning other than the unbounded obs space fails
        warnings.filterwarnings("ignore", message=".*Box observation space (minimum|maximum)")
        check_env(env, skip_render_check=True)
    assert env.action_space.low.min() == -1 and env.action_space.high.max() == 1


@pytest.mark.parametrize("name", list(envs.ENVS))
def test_registered_with_gymnasium(name):
    task = envs.sample_tasks(name, 1, seed=3)[0]
    env = gym.make(envs.ENVS[name].gym_id, task=task)
    _, info = env.reset(seed=0)
    np.testing.assert_array_equal(info["task"], task)


def _rollout(name, task, actions, seed=0):
    env = envs.make_env(name, task, seed=seed)
    obs, rewards = [env.reset(seed=seed)[0]], []
    for a in actions:
        o, r, terminated, truncated, info = env.step(a)
        obs.append(o)
        rewards.append(r)
        np.testing.assert_array_equal(info["task"], task)
    return np.array(obs), np.array(rewards)


@pytest.mark.parametrize("name", list(envs.ENVS))
def test_task_changes_reward_not_observation(name):
    """Same seed, same actions, two tasks: identical observations, different rewards."""
    task_a, task_b = envs.sample_tasks(name, 2, seed=1)
    if name == "pusher_goal":
        task_b[:2] = task_a[:2]  # the cylinder can touch the arm: vary only the goal here
    env = envs.make_env(name)
    actions = np.random.default_rng(0).uniform(-1, 1, (30, env.action_space.shape[0]))
    obs_a, rew_a = _rollout(name, task_a, actions)
    obs_b, rew_b = _rollout(name, task_b, actions)
    np.testing.assert_array_equal(obs_a, obs_b)
    assert np.abs(rew_a - rew_b).max() > 1e-3


@pytest.mark.parametrize("name", list(envs.ENVS))
def test_fixed_horizon(name):
    env = envs.make_env(name, seed=0)
    for _ in range(2):  # and again after a reset
        env.reset()
        for t in range(1, env.horizon + 1):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            assert not terminated
            assert truncated == (t == env.horizon)


def test_point_goal_dynamics_and_optimal_return():
    goal = np.array([0.0, 1.0], np.float32)
    obs, rew = _rollout("point_goal", goal, [goal] * 10 + [0 * goal] * 10)  # walk to the goal, stay
    np.testing.assert_allclose(obs[10], goal, atol=1e-6)
    np.testing.assert_allclose(rew.sum(), -4.5, atol=1e-4)
    tasks = envs.sample_tasks("point_goal", 4)
    assert envs.baseline_return("point_goal", tasks, "zero") == pytest.approx(-20, abs=1e-4)
    assert envs.baseline_return("point_goal", tasks, "random") < -20  # wanders off, on average


def test_mujoco_tasks_place_their_targets():
    reacher = envs.make_env("reacher_goal", [0.12, -0.05], seed=0)
    np.testing.assert_allclose(reacher.get_body_com("target")[:2], [0.12, -0.05], atol=1e-6)
    pusher = envs.make_env("pusher_goal", [0.1, -0.25, -0.15, 0.05], seed=0)  # offsets from the XML
    np.testing.assert_allclose(pusher.get_body_com("object")[:2], [0.45 + 0.1, -0.05 - 0.25], atol=1e-6)
    np.testing.assert_allclose(pusher.get_body_com("goal")[:2], [0.45 - 0.15, -0.05 + 0.05], atol=1e-6)
    cheetah = envs.make_env("half_cheetah_vel", [2.0], seed=0)
    _, reward, *_ = cheetah.step(np.zeros(6))
    assert -2.5 < reward < -1.5  # standing still costs about the target velocity


@pytest.mark.parametrize("name", list(envs.ENVS))
def test_sample_tasks_deterministic_and_disjoint(name):
    train = envs.sample_tasks(name, 50, "train", seed=0)
    np.testing.assert_array_equal(train, envs.sample_tasks(name, 50, "train", seed=0))
    np.testing.assert_array_equal(train[:7], envs.sample_tasks(name, 7, "train", seed=0))
    splits = [train, envs.sample_tasks(name, 50, "val"), envs.sample_tasks(name, 50, "test"),
              envs.sample_tasks(name, 50, "train", seed=1)]
    everything = np.concatenate(splits)
    assert len(np.unique(everything.round(6), axis=0)) == len(everything)


def test_task_distributions():
    point = envs.sample_tasks("point_goal", 500)
    np.testing.assert_allclose(np.linalg.norm(point, axis=1), 1, atol=1e-6)
    assert point[:, 1].min() >= 0
    reacher = np.linalg.norm(envs.sample_tasks("reacher_goal", 2000), axis=1)
    assert reacher.max() <= 0.2 and 0.45 < (reacher < 0.2 / np.sqrt(2)).mean() < 0.55  # uniform in a disk
    velocity = envs.sample_tasks("half_cheetah_vel", 500)
    assert velocity.min() >= 0 and velocity.max() <= 3
    pusher = envs.sample_tasks("pusher_goal", 200)
    assert np.linalg.norm(pusher[:, :2] - pusher[:, 2:], axis=1).min() > 0.17


def test_unknown_env_and_split():
    with pytest.raises(ValueError, match="unknown env"):
        envs.make_env("nope")
    with pytest.raises(ValueError, match="unknown split"):
        envs.sample_tasks("point_goal", 3, split="dev")


def test_multitask_vec_env_matches_single_envs():
    tasks = envs.sample_tasks("point_goal", 3)
    vec = envs.MultiTaskVecEnv("point_goal", tasks, n_envs=2)
    obs = vec.reset()
    assert obs.shape == (3, 2, 2)
    actions = np.random.default_rng(0).uniform(-1, 1, (20, 3, 2, 2))
    for t, a in enumerate(actions):
        obs, rew, over = vec.step(a)
        assert rew.shape == (3, 2) and over == (t == 19)
    _, rewards = _rollout("point_goal", tasks[2], actions[:, 2, 1])
    np.testing.assert_allclose(rew[2, 1], rewards[-1], rtol=1e-6)


# ----------------------------------------------------------------------------- history files

def _history(E=2, n_ep=3, H=4, obs_dim=5, act_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    act = rng.uniform(-1, 1, (E, n_ep, H, act_dim))
    return dict(obs=rng.normal(size=(E, n_ep, H, obs_dim)), act=act, rew=rng.normal(size=(E, n_ep, H)),
                act_mean=act * 0.5, act_std=np.full_like(act, 0.3), task=np.array([0.1, 0.2]),
                env="point_goal", algo="sac", seed=3, steps=E * n_ep * H)


def test_history_round_trip(tmp_path):
    path = tmp_path / "task_000.npz"
    h = _history()
    envs.save_history(path, **h)
    loaded = envs.load_history(path)
    for k in ("obs", "act", "rew", "act_mean", "act_std", "task"):
        assert loaded[k].dtype == np.float32
        np.testing.assert_allclose(loaded[k], h[k], rtol=1e-6)
    assert (loaded["env"], loaded["algo"], loaded["seed"], loaded["steps"]) == ("point_goal", "sac", 3, 24)
    assert os.listdir(tmp_path) == ["task_000.npz"]  # no temp file left behind
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_ad_refuses_histories_of_held_out_tasks(tmp_path):
    """A history keeps whose task it is (the RL scripts' and noise.py's --split); a file from before that
    reads as training data, and AD refuses test-task histories: it would be scored on the tasks it learnt."""
    old, held_out = tmp_path / "old", tmp_path / "held_out"
    envs.save_history(old / "task_000.npz", **_history())
    with np.load(old / "task_000.npz") as f:
        np.savez(old / "task_000.npz", **{k: f[k] for k in f.files if k != "split"})
    assert envs.load_history(old / "task_000.npz")["split"] == "train"
    envs.save_history(held_out / "task_000.npz", **_history(), split="test")
    assert ad.load_histories(str(held_out), "point_goal", k=1)["split"] == "test"  # MACAW adapts on these
    with pytest.raises(ad.DataError, match="held_out holds histories of the test tasks"):
        ad.prepare(_ad_args(tmp_path, held_out))


def test_history_rejects_bad_files(tmp_path):
    path = str(tmp_path / "task_000.npz")
    envs.save_history(path, **_history())
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])  # truncated, as by a crash in a non-atomic writer
    with pytest.raises(envs.HistoryError, match="task_000.npz"):
        envs.load_history(path)
    with pytest.raises(envs.HistoryError, match="no such"):
        envs.load_history(str(tmp_path / "missing.npz"))
    nan = _history()
    nan["obs"][0, 1, 2, 3] = np.nan
    with pytest.raises(envs.HistoryError, match="NaN"):
        envs.save_history(path, **nan)
    bad = _history()
    np.savez(path, **{**bad, "rew": bad["rew"][:, :2]})  # written by hand, inconsistent shapes
    with pytest.raises(envs.HistoryError, match="rew has leading shape"):
        envs.load_history(path)
    np.savez(path, **{k: v for k, v in bad.items() if k != "act"})
    with pytest.raises(envs.HistoryError, match="missing arrays"):
        envs.load_history(path)


@pytest.mark.parametrize("content", [b"obs, act, rew\n", bytes(range(256)), b""])
def test_a_garbage_history_file_is_named_as_such(tmp_path, content):
    """A file that is no .npz at all (text, random bytes, empty) under a history's name: one line naming it,
    not numpy's complaint about pickled data; ad.py exits with that line (status 1: sys.exit(message))."""
    path = tmp_path / "task_000.npz"
    path.write_bytes(content)
    message = f"{path}: not a .npz file written by the RL scripts"
    with pytest.raises(envs.HistoryError) as e:
        envs.load_history(str(path))
    assert str(e.value) == message
    with pytest.raises(SystemExit) as e:
        ad.main(["--env", "point_goal", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert e.value.code == f"error: {message}"


def _set(key, index, value):
    def corrupt(h):
        h[key][index] = value
    return corrupt


@pytest.mark.parametrize("corrupt, message", [
    *[(_set(key, (0, 1, 2), np.nan), f"{key} holds NaN") for key in ("obs", "act", "rew", "act_mean", "act_std")],
    (_set("task", 1, np.inf), "task holds NaN or inf"),
    (_set("act", (1, 0, 3, 1), 1.01), r"act outside \[-1, 1\]"),
    (_set("act", (1, 0, 3, 1), -1.01), r"act outside \[-1, 1\]"),
    (_set("act_mean", (0, 2, 0, 0), -1.5), r"act_mean outside \[-1, 1\]"),
    (_set("act_std", (0, 2, 0, 0), -0.1), r"act_std outside \[0, 1\]"),
    (_set("act_std", (0, 2, 0, 0), 1.2), r"act_std outside \[0, 1\]"),
    *[(lambda h, key=key: h.update({key: h[key][:, :, :3]}), f"{key} has leading shape")
      for key in ("act", "rew", "act_mean", "act_std")],
    (lambda h: h.update(act_mean=h["act_mean"][..., :1]), "act_mean shape"),
    (lambda h: h.update(act_std=h["act_std"][..., :1]), "act_std shape"),
    (lambda h: h.update(obs=h["obs"][..., 0]), r"expected obs/act \[E, episodes, H, dim\]"),
    (lambda h: h.update(task=h["task"][None]), "task has shape"),
    (lambda h: h.pop("act_std"), "act_mean and act_std are stored together"),
])
def test_history_validation_checks_every_array(tmp_path, corrupt, message):
    """Every array's values (NaN, the [-1, 1] action box, a std's range) and shape, both when writing and
    when reading a file written by other means; the untouched history passes."""
    path = str(tmp_path / "task_000.npz")
    envs.save_history(path, **_history())
    h = _history()
    corrupt(h)
    with pytest.raises(envs.HistoryError, match=message):
        envs.save_history(path, **h)
    np.savez(path, **{k: np.asarray(v, np.float32) if isinstance(v, np.ndarray) else v for k, v in h.items()})
    with pytest.raises(envs.HistoryError, match=message):
        envs.load_history(path)


# ----------------------------------------------------------------------------- SAC

def test_squashed_moments_match_monte_carlo():
    """The actions SAC acts with are draws from the policy whose mean and std it stores in the history."""
    torch.manual_seed(0)
    agent = sac.SAC(2, obs_dim=3, act_dim=2, hidden=16)
    with torch.no_grad():
        agent.actor.net[-1].bias[:, :, 2:] += 0.8  # std around 2: tanh saturates, the mean shrinks
    obs = torch.randn(2, 4, 3)
    repeated = obs[:, None].expand(2, 20000, 4, 3).reshape(2, -1, 3)
    samples, mean, std = (x.view(2, 20000, 4, 2) for x in agent.act(repeated))
    torch.testing.assert_close(mean[:, 0], samples.mean(1), atol=0.02, rtol=0)
    torch.testing.assert_close(std[:, 0], samples.std(1), atol=0.01, rtol=0)
    assert std.mean() > 0.5  # the wide policy this test asks for


def test_log_prob_is_the_squashed_gaussian_density():
    torch.manual_seed(0)
    actor = sac.Actor(1, obs_dim=2, act_dim=1, hidden=8)
    obs = torch.randn(1, 1, 2).expand(1, 5, 2)
    a, log_prob = actor.sample(obs, rl.TaskRandom([0]))
    mu, log_std = actor(obs)
    u = torch.atanh(a)
    expected = torch.distributions.Normal(mu, log_std.exp()).log_prob(u) - torch.log1p(-a.square())
    torch.testing.assert_close(log_prob, expected.sum(-1), atol=1e-4, rtol=1e-4)


def test_history_buffer_next_obs():
    T, E, H, S = 2, 3, 4, 12
    buf = rl.HistoryBuffer(T, E, S, H, obs_dim=1, act_dim=1, device="cpu")

    def value(t):  # obs at step t (an episode's final obs: t + 0.5)
        return torch.full((T, E, 1), float(t))
    for t in range(S):
        next_obs = value(t + 0.5) if (t + 1) % H == 0 else value(t + 1)
        buf.add(value(t), value(t), torch.full((T, E), float(t)), next_obs, value(t), value(t))
    rng = rl.TaskRandom(range(T))
    obs, act, rew, next_obs = buf.sample(500, capacity=10 ** 6, rng=rng)
    ends = (obs[..., 0] + 1) % H == 0
    expected = torch.where(ends, obs[..., 0] + 0.5, obs[..., 0] + 1)
    torch.testing.assert_close(next_obs[..., 0], expected)
    torch.testing.assert_close(rew, obs[..., 0])
    assert ends.any() and (~ends).any()
    recent, *_ = buf.sample(500, capacity=E * 3, rng=rng)  # only the last 3 steps of each task
    assert recent.min() >= S - 3


class _FixedQ(torch.nn.Module):
    """A stand-in critic: Q [T, 2, B] as a function of (obs, act) given by hand, or a free parameter."""

    def __init__(self, q=None, fn=None):
        super().__init__()
        self.q, self.fn, self.seen = (torch.nn.Parameter(q) if q is not None else None), fn, None

    def forward(self, obs, act):
        self.seen = obs, act
        return self.q if self.fn is None else self.fn(obs, act)


def test_sac_critic_regresses_onto_the_soft_twin_minimum_target(monkeypatch):
    """y = r + gamma (min(Q'_1, Q'_2)(s', a') - alpha log pi(a'|s')) with a' ~ pi(.|s'), per task, by hand.
    Episodes are only truncated, so every transition bootstraps (the buffer's next_obs is an ended
    episode's final observation). The critics' gradient vanishes where both predict y, and pushes down
    where they predict more."""
    torch.manual_seed(0)
    agent = sac.SAC(2, obs_dim=2, act_dim=2, hidden=8, gamma=0.9)
    obs, act = torch.randn(2, 2, 2), torch.rand(2, 2, 2)
    rew = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    next_obs = torch.tensor([[[1.0, 2.0], [3.0, -1.0]], [[0.0, 0.0], [2.0, 1.0]]])
    with torch.no_grad():
        agent.log_alpha.copy_(torch.tensor([[math.log(0.5)], [math.log(2.0)]]))
    # the policy at s': a' = s' / 10, log pi(a'|s') = s'_0 - s'_1: -1, 4 (task 0) and 0, 1 (task 1)
    monkeypatch.setattr(agent.actor, "sample", lambda o, rng: (o / 10, o[..., 0] - o[..., 1]))
    # Q'_1 = s'_0 + 10 a'_1, Q'_2 = 3 s'_1 - 10 a'_0: (3, 5) (2, -6) for task 0; (0, 0) (3, 1) for task 1
    agent.critic_target = _FixedQ(fn=lambda o, a: torch.stack([o[..., 0] + 10 * a[..., 1],
                                                                3 * o[..., 1] - 10 * a[..., 0]], 1))
    y = torch.tensor([[1 + 0.9 * (3 + 0.5 * 1), -2 + 0.9 * (-6 - 0.5 * 4)],
                      [0.5 + 0.9 * (0 - 2 * 0), 0 + 0.9 * (1 - 2 * 1)]])
    for offset in (0.0, 1.0):
        agent.critic = _FixedQ(q=(y + offset)[:, None].repeat(1, 2, 1))
        agent.update_critic(obs, act, rew, next_obs)
        torch.testing.assert_close(agent.critic.seen, (obs, act), rtol=0, atol=0)  # Q(s, a) of the batch
        grad = agent.critic.q.grad
        if offset == 0:
            torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)
        else:
            assert (grad > 0).all()


def test_sac_target_critics_follow_by_polyak_averaging():
    """After a critic step, each target weight moves a fraction tau of the way to the updated critic's."""
    torch.manual_seed(0)
    agent = sac.SAC(2, obs_dim=3, act_dim=2, hidden=8, tau=0.1, lr=0.1)
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(torch.randn_like(p))  # targets apart from the critics, as after many updates
    before = [p.clone() for p in agent.critic_target.parameters()]
    agent.update_critic(torch.randn(2, 4, 3), torch.rand(2, 4, 2), torch.randn(2, 4), torch.randn(2, 4, 3))
    for old, new, critic in zip(before, agent.critic_target.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * critic, rtol=1e-5, atol=1e-6)


def test_sac_actor_climbs_q_and_alpha_tracks_the_target_entropy():
    """The actor's action moves to where the (stand-in) critics are highest; the entropy weight rises
    while the policy is narrower than the target entropy, and falls while it is wider."""
    torch.manual_seed(0)
    agent = sac.SAC(1, obs_dim=2, act_dim=2, hidden=16, lr=1e-2, alpha_init=1e-3)
    peak = torch.tensor([0, 1.0])[:, None]  # twin critics 1 apart, both highest at a = (0.5, 0.5)
    agent.critic = _FixedQ(fn=lambda o, a: torch.stack([-(a - 0.5).square().sum(-1)] * 2, 1) + peak)
    obs = torch.randn(1, 64, 2)
    for _ in range(300):
        agent.update_actor_and_alpha(obs)
    mean, _ = agent.actor.squashed_moments(*agent.actor(obs))
    torch.testing.assert_close(mean, torch.full_like(mean, 0.5), rtol=0, atol=0.1)

    for log_std, direction in ((-4.0, 1), (0.0, -1)):  # entropy far below / above the target, -act_dim
        agent = sac.SAC(1, obs_dim=2, act_dim=2, hidden=16)
        with torch.no_grad():
            agent.actor.net[-1].bias[..., 2:] = log_std
            agent.actor.net[-1].weight[..., 2:] = 0
        before = agent.log_alpha.item()
        agent.update_actor_and_alpha(obs)
        assert (agent.log_alpha.item() - before) * direction > 0


def _grads(agent):
    return [p.grad.clone() for p in list(agent.critic.parameters()) + list(agent.actor.parameters())]


@pytest.mark.parametrize("make_agent", [sac.SAC, lambda *a, **k: droq.DroQ(*a, dropout=0.1, **k)],
                         ids=["sac", "droq"])
def test_tasks_trained_together_stay_independent(make_agent):
    """Changing task 1's data changes neither the gradients nor the parameters of tasks 0 and 2
    (DroQ: nor through its dropout masks or layer norms)."""
    def one_update(batch):
        torch.manual_seed(0)
        agent = make_agent(3, obs_dim=4, act_dim=2, hidden=16, lr=1e-2)
        torch.manual_seed(1)
        agent.update_critic(*batch)
        critic_grads = [p.grad.clone() for p in agent.critic.parameters()]
        agent.update_actor_and_alpha(batch[0])
        actor_grads = [p.grad.clone() for p in agent.actor.parameters()]
        params = [p.detach().clone() for p in list(agent.critic.parameters()) + list(agent.actor.parameters())]
        return critic_grads + actor_grads, params + [agent.log_alpha.detach().clone()]

    g = torch.Generator().manual_seed(0)
    batch = [torch.randn(3, 8, 4, generator=g), torch.rand(3, 8, 2, generator=g) * 2 - 1,
             torch.randn(3, 8, generator=g), torch.randn(3, 8, 4, generator=g)]
    changed = [x.clone() for x in batch]
    changed[0][1] += 5.0
    changed[2][1] *= -3.0
    grads_a, params_a = one_update(batch)
    grads_b, params_b = one_update(changed)

    def critic_task_axis(x):  # [2T, ...] twin critics -> [T, 2, ...]
        return x.view(3, 2, *x.shape[1:]) if x.shape[0] == 6 else x
    for a, b in zip(grads_a + params_a, grads_b + params_b):
        a, b = critic_task_axis(a), critic_task_axis(b)
        torch.testing.assert_close(a[[0, 2]], b[[0, 2]], rtol=0, atol=0)
    assert all(not torch.equal(critic_task_axis(a)[1], critic_task_axis(b)[1]) for a, b in zip(grads_a, grads_b))


def _run(out, *extra, script=sac):
    script.main(["--env", "point_goal", "--tasks", "3", "--steps", "1200", "--device", "cpu", "--out", str(out),
                 *extra])


def test_sac_learns_point_goal_and_writes_histories(tmp_path):
    _run(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == ["learning_curves.png", "task_000.npz", "task_001.npz", "task_002.npz"]
    tasks = envs.sample_tasks("point_goal", 3)
    returns = []
    for i in range(3):
        h = envs.load_history(tmp_path / f"task_{i:03d}.npz")
        assert h["obs"].shape == (5, 12, 20, 2) and h["act_std"].shape == (5, 12, 20, 2)
        np.testing.assert_array_equal(h["task"], tasks[i])
        assert h["act_std"].min() >= 0 and np.abs(h["act_mean"]).max() <= 1
        np.testing.assert_allclose(h["act_std"][:, 0], 1 / np.sqrt(3), rtol=1e-6)  # warm-up: U(-1, 1)
        np.testing.assert_allclose(h["obs"][:, :, 0], 0)  # every episode starts from the origin
        returns.append(h["rew"].sum(-1).mean(0))  # [episodes]
    returns = np.mean(returns, axis=0)
    assert returns[:2].mean() < -15  # random at first
    assert returns[-2:].mean() > -8  # walks to its hidden goal at the end (optimum -4.5)


@pytest.mark.parametrize("script", [sac, droq, ppo], ids=["sac", "droq", "ppo"])
def test_resumes_and_skips_finished_tasks(tmp_path, script):
    def run(steps):
        _run(tmp_path, "--parallel", "2", "--steps", steps, script=script)
    run("200")
    kept = (tmp_path / "task_000.npz").read_bytes()
    os.remove(tmp_path / "task_002.npz")  # as if the run had been killed during the second chunk
    run("200")
    assert (tmp_path / "task_000.npz").read_bytes() == kept
    assert envs.load_history(tmp_path / "task_002.npz")["algo"] == script.__name__
    with pytest.raises(SystemExit, match="other settings"):
        run("400")


ALGOS = {"sac": (sac, sac.make_sac), "droq": (droq, droq.make_droq), "ppo": (ppo, ppo.make_ppo)}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_a_tasks_initial_networks_depend_on_its_index_alone(algo):
    script, make = ALGOS[algo]
    parser = script.build_parser() if script is not sac else sac.build_parser("sac", "")
    args = rl.parse_args(parser, ["--env", "point_goal", "--device", "cpu"], algo)
    chunk = [3, 5, 6, 9]
    seeds = [rl.task_seed(0, i) for i in chunk]
    together = make(args, len(chunk), 2, 2)
    rl.init_per_task(together, seeds, lambda: make(args, 1, 2, 2))
    for i, seed in enumerate(seeds):
        alone = make(args, 1, 2, 2)
        rl.init_per_task(alone, [seed], lambda: make(args, 1, 2, 2))
        for name, one in alone.state_dict().items():
            many = together.state_dict()[name]
            if many.dim() and many.shape[0] == len(chunk) * one.shape[0]:
                torch.testing.assert_close(many.view(len(chunk), *one.shape)[i], one, rtol=0, atol=0)
    weights = [p for name, p in together.state_dict().items() if name.endswith("weight")]
    assert not torch.equal(weights[0][0], weights[0][1])  # and tasks do differ


def _histories(out):
    names = sorted(f for f in os.listdir(out) if f.endswith(".npz"))
    return names, [envs.load_history(os.path.join(out, f)) for f in names]


def _assert_same_histories(reference, other):
    names, histories = _histories(other)
    assert names == _histories(reference)[0]
    for a, b in zip(_histories(reference)[1], histories):
        for key in ("obs", "act", "rew", "act_mean", "act_std", "task"):
            np.testing.assert_array_equal(a[key], b[key])


def test_torchrun_splits_tasks_and_histories_do_not_depend_on_the_split(tmp_path):
    """4 Reacher tasks x 250 steps, 100 of them random warm-up, 150 learning (30 updates): every byte of a
    history depends on its task's seed alone, the same with --parallel 1, 4 and 2 processes."""
    common = ["--env", "reacher_goal", "--tasks", "4", "--steps", "250", "--threads", "1", "--hidden", "16",
              "--warmup", "100", "--batch-size", "32", "--device", "cpu"]
    sac.main(common + ["--parallel", "1", "--out", str(tmp_path / "p1")])
    sac.main(common + ["--parallel", "4", "--out", str(tmp_path / "p4")])

    def torchrun():
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "sac.py", *common, "--out", str(tmp_path / "r2")],
                                cwd=HERE, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout
    stdout = torchrun()
    assert "2 of them on rank 0 of 2" in stdout and "2 of them on rank 1 of 2" in stdout
    reference = _histories(tmp_path / "p1")
    assert reference[0] == [f"task_{i:03d}.npz" for i in range(4)]
    assert (reference[1][0]["act_std"][:, 0, 20:] < 0.5).any()  # past the warm-up (std 0.577): the policy acts
    for out in ("p4", "r2"):
        _assert_same_histories(tmp_path / "p1", tmp_path / out)
    assert (tmp_path / "r2" / "learning_curves.png").exists()  # rank 0 plots once every rank is done
    kept = (tmp_path / "r2" / "task_000.npz").read_bytes()
    for i in (1, 2):  # as if a rank had been killed before writing these
        os.remove(tmp_path / "r2" / f"task_{i:03d}.npz")
    assert "2 to do, 1 of them on rank 1 of 2" in torchrun()
    assert (tmp_path / "r2" / "task_000.npz").read_bytes() == kept
    for a, b in zip(reference[1], _histories(tmp_path / "r2")[1]):
        np.testing.assert_array_equal(a["obs"], b["obs"])


@pytest.mark.parametrize("algo, argv", [
    ("droq", ["--env", "reacher_goal", "--steps", "250", "--warmup", "100", "--batch-size", "32", "--hidden", "16"]),
    ("ppo", ["--env", "pusher_goal", "--steps", "500", "--rollout-steps", "50", "--batch-size", "50", "--epochs", "2",
             "--hidden", "16"]),
])
def test_droq_and_ppo_histories_do_not_depend_on_the_split(tmp_path, algo, argv):
    """DroQ's dropout masks and PPO's exploration and minibatch order come from each task's own stream
    too: 3 tasks learning alone or together write the same bytes (Pusher's 7 actions make PPO's action
    head a matmul whose rounding follows where a task's slice sits in memory; rl.py sets MKL so it does not)."""
    script = ALGOS[algo][0]
    for parallel in ("1", "3"):
        script.main(argv + ["--tasks", "3", "--threads", "1", "--device", "cpu", "--parallel", parallel,
                            "--out", str(tmp_path / parallel)])
    _assert_same_histories(tmp_path / "1", tmp_path / "3")


def _cli(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=HERE, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script, args, message", [
    ("sac.py", ["--env", "cartpole"], "invalid choice: 'cartpole'"),
    ("sac.py", ["--tasks", "0"], "must be a positive integer"),
    ("sac.py", ["--env", "point_goal", "--out", "test_all.py/sub"], "cannot write to"),
    ("sac.py", ["--env", "point_goal", "--steps", "50"], "less than one episode"),
    ("sac.py", ["--device", "gpu"], "--device gpu"),
    ("droq.py", ["--env", "point_goal", "--dropout", "1.5"], "--dropout: must be in [0, 1)"),
    ("droq.py", ["--env", "point_goal", "--out", "test_all.py/sub"], "cannot write to"),
    ("ppo.py", ["--env", "point_goal", "--rollout-steps", "0"], "must be a positive integer"),
    ("ppo.py", ["--env", "point_goal", "--steps", "50"], "less than one episode"),
    ("ppo.py", ["--env", "ant"], "invalid choice: 'ant'"),
])
def test_cli_bad_input(script, args, message):
    result = _cli(script, *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 300  # one line, not a dump


# ----------------------------------------------------------------------------- PPO

def test_gae_by_hand():
    rew = torch.tensor([[1.0, 2.0, 3.0]])
    value = torch.tensor([[0.5, 1.0, 1.5]])
    next_value = torch.tensor([[1.0, 1.5, 2.0]])  # bootstraps even at an episode's end (truncation)
    episode_end = torch.tensor([False, True, False])
    adv = ppo.gae(rew, value, next_value, episode_end, gamma=0.5, lam=0.5)
    # deltas r + 0.5 V' - V = 1, 1.75, 2.5; the sum restarts after step 1: 1 + 0.25 * 1.75, 1.75, 2.5
    torch.testing.assert_close(adv, torch.tensor([[1.4375, 1.75, 2.5]]))


def test_gae_is_the_discounted_sum_of_td_errors_inside_each_episode():
    """A_t = sum_k (gamma lambda)^k delta_{t+k} over the steps of t's own episode, by its definition, on a
    trajectory of 3 episodes (2 tasks, 2 envs); gamma and lambda apart so that neither can stand in for the other."""
    g = torch.Generator().manual_seed(0)
    rew, value, next_value = (torch.randn(2, 2, 12, generator=g) for _ in range(3))
    episode_end = torch.tensor([t in (3, 8, 11) for t in range(12)])  # episodes 0-3, 4-8, 9-11
    gamma, lam = 0.9, 0.6
    delta = rew + gamma * next_value - value
    expected = torch.zeros_like(rew)
    for t in range(12):
        end = next(e for e in (3, 8, 11) if e >= t)
        for k in range(end - t + 1):
            expected[..., t] += (gamma * lam) ** k * delta[..., t + k]
    torch.testing.assert_close(ppo.gae(rew, value, next_value, episode_end, gamma, lam), expected)


def test_clipped_surrogate_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    log_prob = ratio.log().requires_grad_()
    loss = ppo.clipped_surrogate(log_prob, torch.zeros(4), adv, clip=0.2)
    # min(rho A, clip(rho) A) = min(1.5, 1.2), min(0.5, 0.8), min(-1.1, -1.1), min(-0.7, -0.8)
    torch.testing.assert_close(loss, torch.tensor(-(1.2 + 0.5 - 1.1 - 0.8) / 4))
    loss.backward()  # no gradient where the clipped term is the minimum (steps 0 and 3)
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -0.5 / 4, 1.1 / 4, 0.0]))


def test_running_norm_matches_batch_statistics():
    x = torch.randn(2, 300, 3) * torch.tensor([1.0, 10.0, 0.1]) + 5
    norm = ppo.RunningNorm(2, 3)
    for chunk in x.split(100, dim=1):
        norm.update(chunk)
    torch.testing.assert_close(norm.mean, x.mean(1, keepdim=True), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norm.var, x.var(1, unbiased=False, keepdim=True), rtol=1e-3, atol=1e-4)


def test_ppo_tasks_stay_independent_and_clip_per_task():
    """A PPO update where task 1's rewards are huge (its gradient gets clipped) leaves tasks 0 and 2
    exactly as with ordinary rewards."""
    def one_update(scale):
        torch.manual_seed(0)
        agent = ppo.PPO(3, obs_dim=2, act_dim=2, hidden=8, epochs=2, batch_size=8, lr=1e-2)
        g = torch.Generator().manual_seed(1)
        obs, act = torch.randn(3, 2, 10, 2, generator=g), torch.randn(3, 2, 10, 2, generator=g)
        rew = torch.randn(3, 2, 10, generator=g) * torch.tensor([1.0, scale, 1.0])[:, None, None]
        old_log_prob = torch.randn(3, 2, 10, generator=g)
        agent.update(obs, act, old_log_prob, rew, torch.randn(3, 2, 10, 2, generator=g), torch.arange(10) % 5 == 4)
        return [p.detach().clone() for p in agent.parameters()]
    for a, b in zip(one_update(1.0), one_update(1e4)):
        torch.testing.assert_close(a[[0, 2]], b[[0, 2]], rtol=0, atol=0)


def test_ppo_ratio_uses_the_behaviour_log_probs(monkeypatch):
    """act() returns log pi(u|s) of the Gaussian that drew u, by hand. update() folds the rollout into the
    observation statistics first, which changes what the same policy net says: the ratio's denominator must
    be the stored density, and its numerator the moved policy's (so the first ratios are not all 1)."""
    def make():
        torch.manual_seed(0)
        agent = ppo.PPO(2, obs_dim=3, act_dim=2, hidden=8, epochs=1, batch_size=10, lr=1e-2)
        with torch.no_grad():
            agent.log_std.copy_(torch.tensor([[[-0.5, 0.3]], [[0.2, 0.0]]]))
            agent.actor[-1].weight.normal_()  # a policy whose mean moves with the normalised observation
        return agent
    agent = make()
    obs = 5 + 3 * torch.randn(2, 10, 3)  # far from the initial statistics (0, 1)
    u, log_prob, mean, std = agent.act(obs)
    mu, sigma = agent.dist(obs).mean, agent.log_std.exp()
    by_hand = (-0.5 * ((u - mu) / sigma).square() - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(log_prob, by_hand)

    def update(agent, old_log_prob):  # the rollout as 2 envs x 5 steps, one episode each
        def per_env(x):
            return x.view(2, 2, 5, *x.shape[2:])
        agent.update(per_env(obs), per_env(u), per_env(old_log_prob), torch.ones(2, 2, 5), per_env(obs + 0.1),
                     torch.arange(5) == 4)
        return torch.cat([p.detach().flatten() for p in agent.parameters()])
    seen = []
    surrogate = ppo.clipped_surrogate
    monkeypatch.setattr(ppo, "clipped_surrogate", lambda new, old, *a: seen.append((new.detach(), old)) or
                        surrogate(new, old, *a))
    update(agent, log_prob)
    (new, old), = seen  # one epoch, one minibatch of the whole rollout, shuffled per task
    torch.testing.assert_close(old.sort(-1).values, log_prob.sort(-1).values, rtol=0, atol=0)
    assert (new - old).abs().max() > 0.1  # the statistics moved: not the density that drew the actions
    assert not torch.equal(update(make(), log_prob), update(make(), log_prob + 0.5))  # the stored ones count


def test_ppo_rollouts_reach_update_aligned_with_their_episodes(monkeypatch):
    """What collect_and_learn hands update, rollouts of 30 steps across 20-step point_goal episodes: each
    step's observation, raw Gaussian action, its density under the acting policy, reward and next observation
    line up (s' = s + 0.1 clip(u), r = -|s' - goal|); at an episode's end the next observation is its final
    one, not the next episode's start, and episode_end marks exactly those steps."""
    args = rl.parse_args(ppo.build_parser(), ["--env", "point_goal", "--rollout-steps", "30", "--hidden", "8",
                                              "--device", "cpu"], "ppo")
    tasks = envs.sample_tasks("point_goal", 2)
    vec = envs.MultiTaskVecEnv("point_goal", tasks, n_envs=2)
    agent = ppo.make_ppo(args, 2, vec.obs_dim, vec.act_dim)
    rollouts, update = [], agent.update

    def spy(obs, raw_act, old_log_prob, rew, next_obs, episode_end):
        # the acting policy's density: update has not run yet (dist takes [T, batch, obs_dim])
        behaviour = agent.dist(obs.flatten(1, 2)).log_prob(raw_act.flatten(1, 2)).sum(-1).view_as(old_log_prob)
        rollouts.append((obs.clone(), raw_act.clone(), old_log_prob.clone(), behaviour, rew.clone(),
                         next_obs.clone(), episode_end.clone()))
        update(obs, raw_act, old_log_prob, rew, next_obs, episode_end)
    monkeypatch.setattr(agent, "update", spy)
    buf = ppo.collect_and_learn(agent, vec, 60, args, desc="test")
    assert len(rollouts) == 2
    goal = torch.as_tensor(tasks)[:, None, None]
    for start, (obs, raw, old_log_prob, behaviour, rew, next_obs, episode_end) in zip((0, 30), rollouts):
        steps = torch.arange(start, start + 30)
        torch.testing.assert_close(episode_end, (steps + 1) % 20 == 0, rtol=0, atol=0)
        assert raw.abs().max() > 1  # the raw sample, which the env clips
        torch.testing.assert_close(buf.act[:, :, steps], raw.clamp(-1, 1), rtol=0, atol=0)
        torch.testing.assert_close(next_obs, obs + 0.1 * raw.clamp(-1, 1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rew, -(next_obs - goal).norm(dim=-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(old_log_prob, behaviour, rtol=1e-5, atol=1e-5)
        after_end = steps[:-1][episode_end[:-1]] - start + 1
        assert len(after_end) and (obs[:, :, after_end] == 0).all()  # a new episode starts at the origin
        assert (next_obs[:, :, after_end - 1] != 0).any(-1).all()    # while the ended one's final obs is not


def test_ppo_step_descends_the_clipped_surrogate_value_error_and_entropy_bonus():
    """One minibatch step's gradient is that of the loss PPO minimises, written out: the clipped surrogate on
    advantages standardised in the minibatch, plus vf_coef x the value MSE, minus ent_coef x the Gaussian's
    entropy sum(log sigma + log(2 pi e) / 2)."""
    torch.manual_seed(0)
    agent = ppo.PPO(2, obs_dim=3, act_dim=2, hidden=8, lr=0.0, clip=0.2, vf_coef=0.7, ent_coef=0.3, max_grad_norm=1e9)
    with torch.no_grad():
        agent.log_std.copy_(torch.tensor([[[-0.5, 0.3]], [[0.2, 0.0]]]))
    g = torch.Generator().manual_seed(1)
    obs, act = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 2, generator=g)
    old_log_prob = agent.dist(obs).log_prob(act).sum(-1).detach() + 0.3 * torch.randn(2, 6, generator=g)
    adv, ret = 1 + 2 * torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    agent.step(obs, act, old_log_prob, adv, ret)  # lr 0 and no clipping: the gradients are the loss's own

    expected = copy.deepcopy(agent)
    expected.zero_grad()
    mu, sigma = expected.actor(expected.obs_norm(obs)), expected.log_std.exp()
    log_prob = (-0.5 * ((act - mu) / sigma).square() - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    ratio = (log_prob - old_log_prob).exp()
    a = (adv - adv.mean(-1, keepdim=True)) / adv.std(-1, correction=0, keepdim=True)
    surrogate = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a).mean(-1)
    value_error = (expected.critic(expected.obs_norm(obs)).squeeze(-1) - ret).square().mean(-1)
    entropy = (expected.log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1).squeeze(-1)
    (surrogate + 0.7 * value_error - 0.3 * entropy).sum().backward()
    for p, q in zip(agent.parameters(), expected.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_ppo_value_target_is_the_lambda_return(monkeypatch):
    """update() regresses V(s_t) on A_t + V(s_t) (the lambda-return), with V as it was before any step."""
    torch.manual_seed(0)
    agent = ppo.PPO(1, obs_dim=2, act_dim=2, hidden=8, epochs=1, batch_size=10)
    obs, raw_act = torch.randn(1, 2, 5, 2), torch.randn(1, 2, 5, 2)
    steps, step = [], agent.step

    def spy(obs, raw_act, old_log_prob, adv, ret):
        steps.append((ret - adv, agent.value(obs).detach()))
        step(obs, raw_act, old_log_prob, adv, ret)
    monkeypatch.setattr(agent, "step", spy)
    agent.update(obs, raw_act, torch.zeros(1, 2, 5), torch.randn(1, 2, 5), torch.randn(1, 2, 5, 2),
                 torch.arange(5) == 4)
    (target_minus_adv, value), = steps
    torch.testing.assert_close(target_minus_adv, value, rtol=1e-5, atol=1e-6)


def test_ppo_reward_scaling_by_the_running_return_std():
    agent = ppo.PPO(2, obs_dim=3, act_dim=2, hidden=8, norm_reward=True)
    rew = torch.ones(2, 3, 10)
    rew[1] *= 100  # task 1's rewards are 100 times larger: after scaling both tasks look alike
    scaled = agent.scale_rewards(rew, torch.arange(10) % 5 == 4)
    torch.testing.assert_close(scaled[0], scaled[1], rtol=1e-4, atol=1e-4)
    returns = torch.tensor([sum(0.99 ** k for k in range(j + 1)) for j in range(5)] * 2)
    torch.testing.assert_close(scaled[0, 0], 1 / returns.std(correction=0).expand(10), rtol=1e-3, atol=1e-3)


def test_ppo_learns_point_goal_and_writes_histories(tmp_path):
    ppo.main(["--env", "point_goal", "--tasks", "2", "--steps", "8000", "--rollout-steps", "100",
              "--device", "cpu", "--out", str(tmp_path)])
    returns = []
    for i in range(2):
        h = envs.load_history(tmp_path / f"task_{i:03d}.npz")
        assert h["algo"] == "ppo" and h["obs"].shape == (5, 80, 20, 2) and h["act_mean"].shape == (5, 80, 20, 2)
        assert np.abs(h["act_mean"]).max() <= 1 and h["act_std"].min() >= 0
        # the first policy is N(~0, 1), clipped to [-1, 1]: std sqrt(E[clip(u)^2]) = 0.718
        np.testing.assert_allclose(h["act_std"][:, 0, 0], 0.718, atol=0.01)
        returns.append(h["rew"].sum(-1).mean(0))
    returns = np.mean(returns, axis=0)
    assert returns[:8].mean() < -15 and returns[-8:].mean() > -10


# ----------------------------------------------------------------------------- DroQ

def test_droq_q_network_has_dropout_and_layer_norm():
    agent = droq.DroQ(2, obs_dim=3, act_dim=2, hidden=16, dropout=0.2)
    kinds = [type(m).__name__ for m in agent.critic.net]
    assert kinds == ["TaskLinear", "TaskDropout", "TaskLayerNorm", "ReLU"] * 2 + ["TaskLinear"]
    assert agent.critic_target.net[1].p == 0.2
    dropped = agent.critic.net[1](torch.ones(4, 500, 16))  # 2 tasks x twin critics = 4 networks
    assert set(dropped.unique().tolist()) == {0.0, 1.25}  # what is kept is scaled by 1 / (1 - p)
    assert (dropped == 0).float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[0], dropped[2])  # fresh masks
    x = torch.randn(4, 5, 16) * 3 + 1
    torch.testing.assert_close(agent.critic.net[2](x), torch.nn.functional.layer_norm(x, (16,)))


def test_droq_layer_norm_stays_in_bf16_under_autocast():
    """Its affine runs in the activations' dtype (no mixed-dtype kernels), and its fp32 weights still learn."""
    norm = droq.TaskLayerNorm(2, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x), atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and norm.weight.grad.abs().sum() > 0


def _one_update(algo, bf16):
    """An agent of 2 tasks after one update on a fixed batch (PPO: one minibatch holding the whole rollout)."""
    torch.manual_seed(0)
    kwargs = dict(hidden=16, bf16=bf16)
    agent = {"sac": sac.SAC, "droq": droq.DroQ, "ppo": functools.partial(ppo.PPO, epochs=1, batch_size=24)}[algo](
        2, 3, 2, **kwargs)
    g = torch.Generator().manual_seed(1)
    if algo == "ppo":
        obs, act = torch.randn(2, 2, 12, 3, generator=g), torch.randn(2, 2, 12, 2, generator=g)
        agent.update(obs, act, torch.randn(2, 2, 12, generator=g), torch.randn(2, 2, 12, generator=g),
                     torch.randn(2, 2, 12, 3, generator=g), torch.arange(12) % 6 == 5)
    else:
        for _ in range(3):  # DroQ: the actor's update comes with the third critic update
            agent.update(torch.randn(2, 8, 3, generator=g), torch.rand(2, 8, 2, generator=g) * 2 - 1,
                         torch.randn(2, 8, generator=g), torch.randn(2, 8, 3, generator=g))
    return agent


@pytest.mark.parametrize("algo", ["sac", "droq", "ppo"])
def test_bf16_updates_run_on_any_cpu_and_follow_fp32(algo):
    """--dtype bf16 (autocast) runs on a CPU without bf16 units too, only slower: the gradients of an update
    are fp32, differ from fp32's by bf16 rounding and no more, and weights and Adam's state stay fp32."""
    fp32, bf16 = _one_update(algo, bf16=False), _one_update(algo, bf16=True)
    grads = [(p.grad, q.grad) for p, q in zip(fp32.parameters(), bf16.parameters()) if p.grad is not None]
    assert len(grads) >= 12
    for exact, rounded in grads:
        assert rounded.dtype == torch.float32
        scale = exact.abs().max()
        # bf16 keeps 8 significant bits: every gradient within 5% of its largest entry (DroQ, whose layer
        # norms also run in bf16, comes closest: about 3%)
        torch.testing.assert_close(rounded, exact, rtol=0, atol=0.05 * scale.item() + 1e-7)
    assert any(not torch.equal(exact, rounded) for exact, rounded in grads)  # the matmuls did run in bf16
    optimizers = [bf16.opt] if algo == "ppo" else [bf16.critic_opt, bf16.actor_opt, bf16.alpha_opt]
    for p in bf16.parameters():
        assert p.dtype == torch.float32
    assert all(v.dtype == torch.float32 for opt in optimizers for state in opt.state.values()
               for v in state.values() if v.dim())


def test_droq_actor_climbs_the_mean_q_sac_the_minimum():
    q = torch.tensor([[[1.0, 5.0], [3.0, -1.0]]])  # [task, critic, batch]
    torch.testing.assert_close(droq.DroQ(1, 2, 2, hidden=4).policy_q(q), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(sac.SAC(1, 2, 2, hidden=4).policy_q(q), torch.tensor([[1.0, -1.0]]))


def test_droq_takes_the_configured_gradient_steps():
    args = rl.parse_args(droq.build_parser(), ["--env", "point_goal", "--warmup", "0", "--batch-size", "8",
                                                 "--hidden", "8", "--device", "cpu"], "droq")
    vec = envs.MultiTaskVecEnv("point_goal", envs.sample_tasks("point_goal", 2), n_envs=2)
    agent = droq.make_droq(args, 2, vec.obs_dim, vec.act_dim)
    sac.collect_and_learn(agent, vec, 20, args, desc="test")

    def steps(opt):  # Adam counts its steps per parameter
        return int(opt.state[opt.param_groups[0]["params"][0]]["step"])
    assert steps(agent.critic_opt) == 3 * 20 and steps(agent.actor_opt) == 20  # 3 critic, 1 actor per step


# ----------------------------------------------------------------------------- mamba.py

def _scan_inputs(batch, dim, L, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, z = torch.randn(batch, dim, L, generator=g), torch.randn(batch, dim, L, generator=g)
    delta = 0.5 * torch.randn(batch, dim, L, generator=g)
    A = -(0.5 + torch.rand(dim, N, generator=g))
    B, C = torch.randn(batch, N, L, generator=g), torch.randn(batch, N, L, generator=g)
    D, delta_bias = torch.randn(dim, generator=g), 0.3 * torch.randn(dim, generator=g)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


# Tolerances in units of each tensor's own largest entry (_assert_close_to_scale), set from the errors measured
# on every comparison of this file: the fp32 paths (PyTorch scan, step, Triton in its interpreter) agree with
# the oracle to under 1e-6 of that scale, so 1e-5 on a CPU; a GPU's Triton rounds its exp and fused multiply-adds
# its own way, so 1e-4 for Triton; bf16 inputs and outputs agree to 1.4e-2, so 4e-2. Each is far below what a
# wrong formula gives (an error of the tensor's own size).
CPU_TOL, TRITON_TOL, BF16_TOL = 1e-5, 1e-4, 4e-2


def _assert_close_to_scale(actual, expected, tol):
    """Entrywise |actual - expected| <= tol x max |expected|. A fixed atol would pass any gradient smaller than
    itself (dt_proj's are about 1e-6 at initialisation), even a zero one; this checks each as strictly as the
    largest. An expected zero tensor must come out exactly zero."""
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("shape, options", [
    ((2, 3, 1, 4), {}),
    ((2, 5, 37, 4), {"D", "z", "delta_bias", "softplus"}),
    ((1, 4, 64, 16), {"softplus"}),
    ((3, 2, 17, 1), {"D", "z"}),
])
def test_selective_scan_torch_equals_ref(shape, options):
    """The fast CPU path and the sequential oracle agree on outputs and every input gradient."""
    results = _scan_outputs_and_grads(shape, options, ("ref", "torch"))
    for ref, fast in zip(results["ref"], results["torch"]):
        _assert_close_to_scale(fast, ref, CPU_TOL)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_selective_scan_torch_chunks_equal_ref(chunk, monkeypatch):
    """The CPU path walks time in chunks (its forward keeps the state before each chunk, its backward recomputes
    the chunk from it): any chunk length, a partial last chunk, L = 1, and resets on a chunk's first and last
    steps give the oracle's output, last state and every input gradient."""
    monkeypatch.setattr(mamba, "_chunk_len", lambda u, N: min(chunk, u.shape[0]))
    for L in (1, 23):
        inputs = _scan_inputs(3, 4, L, 3)
        reset = torch.zeros(3, L, dtype=torch.bool)
        reset[0, ::5], reset[1, 4::5] = True, True        # row 0: each 5-chunk's first step, row 1: its last
        results = {}
        for backend in ("ref", "torch"):
            leaves = {key: value.clone().requires_grad_() for key, value in inputs.items()}
            y, h = mamba.selective_scan(**leaves, delta_softplus=True, backend=backend, reset=reset,
                                        return_last_state=True)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            results[backend] = [y.detach(), h.detach()] + [leaves[key].grad for key in sorted(leaves)]
        for fast, ref in zip(results["torch"], results["ref"]):
            _assert_close_to_scale(fast, ref, CPU_TOL)


def _scan_outputs_and_grads(shape, options, backends, device="cpu", dtype=torch.float32):
    """{backend: [y, then the gradient of every input in name order]} for a fixed non-uniform loss.
    options picks the optional inputs (D, z, delta_bias) and softplus (without it delta is made positive)."""
    inputs = _scan_inputs(*shape)
    kwargs = {key: inputs.pop(key) if key in options else (inputs.pop(key), None)[1]
              for key in ("D", "z", "delta_bias")}
    kwargs["delta"] = inputs["delta"] if "softplus" in options else inputs["delta"].abs()
    results = {}
    for backend in backends:
        leaves = {key: value.to(device, dtype if value.dim() == 3 else torch.float32).clone().requires_grad_()
                  for key, value in {**inputs, **kwargs}.items() if value is not None}
        y = mamba.selective_scan(**leaves, delta_softplus="softplus" in options, backend=backend)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
        results[backend] = [y.detach()] + [leaves[key].grad for key in sorted(leaves)]
    return results


def test_selective_scan_rejects_bad_shapes():
    inputs = _scan_inputs(2, 3, 5, 4)
    with pytest.raises(ValueError, match="B must have shape"):
        mamba.selective_scan(**{**inputs, "B": inputs["B"][:, :, :4]})
    with pytest.raises(ValueError, match="unknown selective_scan backend"):
        mamba.selective_scan(**inputs, backend="cuda")
    with pytest.raises(ValueError, match="reset must have shape"):
        mamba.selective_scan(**inputs, reset=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="reset must be a bool tensor"):
        mamba.selective_scan(**inputs, reset=torch.zeros(2, 5))


def test_mamba_step_reproduces_forward():
    torch.manual_seed(0)
    model = mamba.Mamba(d_in=5, d_out=3, d_model=16, n_layer=2, d_state=4).eval()
    x = torch.randn(2, 23, 5)
    with torch.no_grad():
        full = model(x)
        state, steps = model.init_state(2), []
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state)
            steps.append(y)
    _assert_close_to_scale(torch.stack(steps, 1), full, CPU_TOL)


# ----------------------------------------------------------------------------- ad.py

def _write_point_histories(directory, n_tasks=3, E=2, n_ep=6, seed=0, env="point_goal"):
    """Small random-action histories in the real file format."""
    rng = np.random.default_rng(seed)
    H = envs.ENVS[env].horizon
    for i, task in enumerate(envs.sample_tasks(env, n_tasks, "train", seed=seed)):
        vec = envs.MultiTaskVecEnv(env, task[None], E, seed=i)
        obs_dim, act_dim = vec.obs_dim, vec.act_dim
        obs, act = np.zeros((E, n_ep, H, obs_dim), np.float32), np.zeros((E, n_ep, H, act_dim), np.float32)
        rew = np.zeros((E, n_ep, H), np.float32)
        for ep in range(n_ep):
            o = vec.reset()[0]
            for t in range(H):
                a = rng.uniform(-1, 1, (E, act_dim)).astype(np.float32)
                obs[:, ep, t], act[:, ep, t] = o, a
                o, r, _ = vec.step(a[None])
                o, rew[:, ep, t] = o[0], r[0]
        envs.save_history(envs.history_path(str(directory), i), obs=obs, act=act, rew=rew, task=task, env=env,
                          algo="sac", seed=seed, steps=E * n_ep * H, act_mean=0.5 * act,
                          act_std=np.full_like(act, 0.3))


def test_tokens_and_downsampling_follow_the_layout():
    """x_t = [obs_t, act_{t-1}, rew_{t-1}, first_t], every k-th episode, zeros before the first step."""
    E, n_ep, H = 1, 4, 3
    obs = np.arange(E * n_ep * H, dtype=np.float32).reshape(1, E, n_ep, H, 1)       # obs = global step
    act = -obs / 100
    rew = obs[..., 0] * 10
    history = {"obs": obs[0], "act": act[0], "rew": rew[0], "act_mean": act[0], "act_std": 0 * act[0]}
    data = {key: value[None] for key, value in ad.downsample(history, k=2).items()}  # keeps episodes 0 and 2
    identity = {"obs_mean": torch.zeros(1), "obs_std": torch.ones(1), "rew_mean": torch.tensor(0.),
                "rew_std": torch.tensor(1.)}
    tokens, targets = ad.build_streams(data, identity)
    kept = [0, 1, 2, 6, 7, 8]
    expected = [[s, 0 if i == 0 else -kept[i - 1] / 100, 0 if i == 0 else 10 * kept[i - 1], float(i % H == 0)]
                for i, s in enumerate(kept)]
    np.testing.assert_allclose(tokens[0, 0].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(targets["act"][0, 0, :, 0].numpy(), [-s / 100 for s in kept], rtol=1e-6)


def test_offsets_read_each_history_from_later_start_episodes(tmp_path):
    """--offsets N: N streams per history, every k-th episode from N start episodes; refused where a start
    would keep fewer episodes than start 0; prepare() then holds N x the streams."""
    episode = np.arange(10, dtype=np.float32)[None, :, None].repeat(2, 0)       # [E=2, episodes=10, H=1]
    history = {key: episode[..., None] for key in ad.HISTORY_ARRAYS} | {"rew": episode}
    kept = ad.downsample(history, k=4, offsets=2)["rew"][..., 0]                 # starts 0 and 1 keep 3 each
    np.testing.assert_array_equal(kept, [[0, 4, 8], [0, 4, 8], [1, 5, 9], [1, 5, 9]])
    with pytest.raises(ad.DataError, match="--offsets 2 or fewer"):              # start 2 keeps only 2, 6
        ad.downsample(history, k=4, offsets=3)
    _write_point_histories(tmp_path / "data")                                    # 6 episodes: k = 2, starts 0, 1
    one, two = (ad.prepare(_ad_args(tmp_path, tmp_path / "data", "--offsets", n))[0][1]["act"] for n in "12")
    assert two.shape == (2 * one.shape[0], *one.shape[1:])                       # 2 training tasks x E = 2
    torch.testing.assert_close(two.unflatten(0, (2, 2, 2))[:, 0], one.unflatten(0, (2, 2)), rtol=0, atol=0)


def _ad_argv(tmp_path, data_dir, *extra):
    return ["--env", "point_goal", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--d-model", "8",
            "--n-layer", "1", "--d-state", "4", "--k", "2", "--batch-size", "4", "--val-tasks", "2",
            "--val-seeds", "1", "--warmup-iters", "2", "--threads", "1", "--device", "cpu", *extra]


def _ad_args(tmp_path, data_dir, *extra):
    return ad.parse_args(_ad_argv(tmp_path, data_dir, *extra))


def test_ad_training_reduces_the_loss(tmp_path):
    _write_point_histories(tmp_path / "data")
    args = _ad_args(tmp_path, tmp_path / "data", "--noise", "0")
    train_set, _, config, meta = ad.prepare(args)
    torch.manual_seed(0)
    model = ad.build_model(config)
    optimizer = ad.make_optimizer(model, args)
    tokens, targets = train_set
    losses = []
    for _ in range(30):
        loss = ad.action_loss(model(tokens), targets, "nll")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


class _ScriptedModel:
    """A stand-in sequence model for ad.rollout: it records every token it is fed and answers with the
    outputs given by hand, one [batch, d_out] row per step (with the mse loss, the action before clamping)."""

    def __init__(self, outputs):
        self.outputs, self.tokens = outputs, []

    def init_state(self, batch, device=None):
        return 0

    def step(self, x, t):
        self.tokens.append(x)
        return self.outputs[t], t + 1


@pytest.mark.parametrize("env, reward_input, task_dim", [("point_goal", "reward", 0), ("reacher_goal", "task", 0),
                                                         ("point_goal", "reward", 2)])
def test_rollout_feeds_the_model_the_training_tokens(env, reward_input, task_dim):
    """The tokens a rollout builds step by step are the tokens training builds from the same trajectory
    stored as a history (ad.prepare's reward_input, then ad.build_streams): standardised observations and
    rewards (with --reward-input task, the reward less its control cost), the previous executed action and
    reward carried across episode boundaries, first-step flags, zeros before the first step. A model with
    --task-loss's task guess (its last task_dim outputs) acts on its action outputs alone."""
    tasks, n_seeds, n_episodes, H = envs.sample_tasks(env, 2, "test"), 2, 3, envs.ENVS[env].horizon
    vec = envs.MultiTaskVecEnv(env, tasks, n_seeds, seed=0)                   # the same envs, replayed
    obs_dim, act_dim = vec.obs_dim, vec.act_dim
    outputs = 3 * torch.rand(n_episodes * H, 2 * n_seeds, act_dim + task_dim,
                             generator=torch.Generator().manual_seed(0)) - 1.5
    stats = {"obs_mean": torch.linspace(-0.2, 0.1, obs_dim), "obs_std": torch.linspace(0.5, 2.0, obs_dim),
             "rew_mean": torch.tensor(-0.7), "rew_std": torch.tensor(0.3)}
    meta = {"env": env, "loss": "mse", "stats": stats, "reward_input": reward_input, "task_dim": task_dim}
    model = _ScriptedModel(outputs)
    returns = ad.rollout(model, meta, tasks, n_episodes, n_seeds=n_seeds, action_mode="sample", seed=0)

    # [episode, step, task, seed, act]
    executed = outputs[..., :act_dim].clamp(-1, 1).view(n_episodes, H, 2, n_seeds, act_dim)
    history = {"obs": np.zeros((2, n_seeds, n_episodes, H, obs_dim), np.float32),
               "act": np.zeros((2, n_seeds, n_episodes, H, act_dim), np.float32),
               "rew": np.zeros((2, n_seeds, n_episodes, H), np.float32)}
    for e in range(n_episodes):
        obs = vec.reset()
        for t in range(H):
            history["obs"][:, :, e, t], history["act"][:, :, e, t] = obs, executed[e, t].numpy()
            obs, history["rew"][:, :, e, t], _ = vec.step(executed[e, t].numpy())
    np.testing.assert_allclose(returns, history["rew"].sum(-1), rtol=1e-6)
    history.update(act_mean=history["act"], act_std=np.zeros_like(history["act"]),
                   rew=ad.reward_input(history["rew"], history["act"], envs.make_env(env), reward_input))
    trained_on, _ = ad.build_streams(history, stats)                           # [task, seed, step, d_in]
    rolled_out = torch.stack(model.tokens, 1).view(2, n_seeds, n_episodes * H, -1)
    torch.testing.assert_close(rolled_out, trained_on, rtol=1e-6, atol=1e-6)


def test_task_guesses_read_the_guess_at_each_episodes_end_in_the_tasks_units():
    """evaluate.TaskGuesses: the guess at the last step of each episode, de-standardised, against the task of
    its own (task, seed) row; a guess right at the end of episode 2 alone is off by 0 there only."""
    tasks, n_seeds, H = envs.sample_tasks("point_goal", 2, "test"), 2, envs.ENVS["point_goal"].horizon
    task_stats = {"mean": torch.tensor([0.1, 0.5]), "std": torch.tensor([0.5, 0.25])}
    truth = torch.as_tensor(tasks, dtype=torch.float32).repeat_interleave(n_seeds, 0)
    outputs = torch.rand(3 * H, 2 * n_seeds, 4, generator=torch.Generator().manual_seed(0))
    outputs[2 * H - 1, :, 2:] = (truth - task_stats["mean"]) / task_stats["std"]
    meta = {"env": "point_goal", "loss": "mse", "horizon": H, "task_dim": 2, "task_stats": task_stats,
            "stats": {"obs_mean": torch.zeros(2), "obs_std": torch.ones(2), "rew_mean": torch.tensor(0.0),
                      "rew_std": torch.tensor(1.0)}}
    guesser = evaluate.TaskGuesses(_ScriptedModel(outputs), 2)
    ad.rollout(guesser, meta, tasks, 3, n_seeds=n_seeds)
    errors, mean_error = guesser.errors(meta, tasks, n_seeds)
    assert len(errors) == 3 and errors[1] < 1e-6 and min(errors[0], errors[2]) > 0.05
    assert mean_error == pytest.approx(float((truth - task_stats["mean"]).square().sum(-1).mean().sqrt()))


@pytest.mark.parametrize("env", ["reacher_goal", "pusher_goal", "half_cheetah_vel", "ant_dir"])
def test_ctrl_cost_of_is_what_the_reward_charges_for_the_action(env):
    """ctrl_cost_of(a) is exactly the reward's control-cost term (the reward less it is the task part that
    --reward-input task feeds the model), for actions the actuators clip too; point_goal charges none."""
    e = envs.make_env(env, seed=0)
    e.step(e.action_space.sample())                                            # a state with some velocity
    actions = np.random.default_rng(0).uniform(-1.5, 1.5, (4, e.action_space.shape[0]))
    charged = [e._reward(e.ctrl(np.zeros_like(a)), np.array([0.3, -0.2])) - e._reward(e.ctrl(a), np.array([0.3, -0.2]))
               for a in actions]
    np.testing.assert_allclose(e.ctrl_cost_of(actions), charged, rtol=1e-5, atol=1e-6)
    assert (e.ctrl_cost_of(actions) > 0).all()
    np.testing.assert_array_equal(envs.make_env("point_goal").ctrl_cost_of(actions), np.zeros(4))


def test_reward_input_task_trains_and_resumes_on_the_reward_less_its_control_cost(tmp_path):
    """--reward-input task: the training tokens' reward slot is the standardised reward plus the control cost
    of the action taken, the checkpoint keeps the setting for evaluate.py, and --resume refuses another."""
    _write_point_histories(tmp_path / "data", env="reacher_goal", n_ep=2)
    argv = ["--env", "reacher_goal", "--k", "1", "--epochs", "1", "--eval-every", "1000"]
    (train_set, _, _, meta), (plain_set, _, _, plain_meta) = (
        ad.prepare(ad.parse_args(_ad_argv(tmp_path, tmp_path / "data", *argv, "--reward-input", kind)))
        for kind in ("task", "reward"))
    data = ad.load_histories(str(tmp_path / "data"), "reacher_goal", 1)
    n_train = data["rew"].shape[0] - meta["holdout_tasks"]
    env, act, rew = envs.make_env("reacher_goal"), data["act"][:n_train], data["rew"][:n_train]
    task_part = torch.as_tensor(rew + env.ctrl_cost_of(act), dtype=torch.float32).flatten(0, 1).flatten(-2)
    seen = train_set[0][:, 1:, -2] * meta["stats"]["rew_std"] + meta["stats"]["rew_mean"]
    torch.testing.assert_close(seen, task_part[:, :-1], rtol=1e-5, atol=1e-5)
    assert meta["reward_input"] == "task" and plain_meta["reward_input"] == "reward"
    assert not torch.allclose(train_set[0][..., -2], plain_set[0][..., -2])
    ad.train(ad.parse_args(_ad_argv(tmp_path, tmp_path / "data", *argv, "--reward-input", "task")))
    assert ad.load_checkpoint(str(tmp_path / "run"))[1]["meta"]["reward_input"] == "task"
    with pytest.raises(ad.DataError, match="reward_input='task'"):
        ad.train(ad.parse_args(_ad_argv(tmp_path, tmp_path / "data", *argv, "--epochs", "2", "--resume")))


def test_task_loss_trains_a_task_guess_beside_the_action_head(tmp_path):
    """--task-loss W: the model has task_dim more outputs, trained towards each stream's hidden task (the
    history's, standardised over the training tasks) at every token with weight W on top of the action loss;
    the held-out loss stays the action loss alone; the checkpoint keeps the setting and --resume refuses
    another."""
    _write_point_histories(tmp_path / "data", n_tasks=4)
    (train_set, held_set, config, meta), (_, _, plain_config, _) = (
        ad.prepare(_ad_args(tmp_path, tmp_path / "data", *extra)) for extra in (["--task-loss", "0.5"], []))
    assert meta["task_dim"] == 2 and config["d_out"] == plain_config["d_out"] + 2
    data = ad.load_histories(str(tmp_path / "data"), "point_goal", 2)
    n_train = 4 - meta["holdout_tasks"]
    task = torch.as_tensor(data["task"])
    standardised = (task - task[:n_train].mean(0)) / task[:n_train].std(0)
    tokens, targets = train_set
    L = tokens.shape[1]
    per_stream = standardised[:n_train].repeat_interleave(2, 0)                  # 2 streams a task
    torch.testing.assert_close(targets["task"], per_stream[:, None].expand(-1, L, -1))
    torch.testing.assert_close(held_set[1]["task"][:, 0], standardised[n_train:].repeat_interleave(2, 0))

    torch.manual_seed(0)
    model = ad.build_model(config)
    out = model(tokens)
    guess_error = torch.nn.functional.mse_loss(out[..., -2:], targets["task"])
    torch.testing.assert_close(ad.training_loss(model, tokens, targets, "nll", 0.5),
                               ad.action_loss(out[..., :-2], targets, "nll") + 0.5 * guess_error)
    torch.testing.assert_close(torch.tensor(ad.validation_loss(model, *held_set, "nll")),
                               ad.action_loss(model(held_set[0])[..., :-2], held_set[1], "nll"))

    argv = ["--epochs", "1", "--eval-every", "1000"]
    ad.train(_ad_args(tmp_path, tmp_path / "data", *argv, "--task-loss", "0.5"))
    meta = ad.load_checkpoint(str(tmp_path / "run"))[1]["meta"]
    assert (meta["task_loss"], meta["task_dim"]) == (0.5, 2)
    run = {"arch": "mamba", "model_config": config, "params": 846, "context": "full", "stream_tokens": 60,
           "rollout_window": None}                                   # evaluate.py keeps such runs apart
    assert evaluate.label({**run, "task_loss": 0.5}) != evaluate.label({**run, "task_loss": 0.0})
    with pytest.raises(ad.DataError, match="task_loss=0.5"):
        ad.train(_ad_args(tmp_path, tmp_path / "data", *argv, "--epochs", "2", "--task-loss", "1", "--resume"))


def test_ad_checkpoint_resume_and_evaluation(tmp_path, monkeypatch):
    """A killed run resumed from last.pt ends bit-identical to an uninterrupted one; evaluate.py reads the
    checkpoint and writes a well-formed eval.json and a PNG."""
    _write_point_histories(tmp_path / "data")
    whole = _ad_args(tmp_path, tmp_path / "data", "--epochs", "8", "--eval-every", "3", "--out",
                     str(tmp_path / "whole"))
    ad.train(whole)
    killed = _ad_args(tmp_path, tmp_path / "data", "--epochs", "8", "--eval-every", "3")
    lr_at = ad.lr_at

    def crash_at_update_4(it, total, args):
        if it == 4:
            raise KeyboardInterrupt
        return lr_at(it, total, args)
    monkeypatch.setattr(ad, "lr_at", crash_at_update_4)
    with pytest.raises(KeyboardInterrupt):
        ad.train(killed)
    monkeypatch.setattr(ad, "lr_at", lr_at)
    killed.resume = True
    ad.train(killed)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)  # tensors and plain types only
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 8
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    assert [e["val_score"] for e in a["log"]] == [e["val_score"] for e in b["log"]]

    model, ckpt = ad.load_checkpoint(str(tmp_path / "run"), arch="mamba")
    assert ckpt["meta"]["episodes"] == 3 and ckpt["meta"]["stats"]["obs_std"].shape == (2,)
    evaluate.main([str(tmp_path / "run"), "--tasks", "2", "--seeds", "2", "--episodes", "4", "--device", "cpu",
                   "--out", str(tmp_path / "eval")])
    result = json.load(open(tmp_path / "eval" / "eval.json"))
    assert np.asarray(result["returns"]).shape == (2, 2, 4)
    assert np.all(np.asarray(result["returns"]) < 0)                  # point_goal rewards are -distance
    np.testing.assert_allclose(result["tasks"], envs.sample_tasks("point_goal", 2, "test"))  # test split only
    s = result["summary"]
    assert set(s) >= {"first_episode", "all_episodes", "last5", "score_last5", "score_last5_vs_random",
                      "zero_action", "random_policy"}
    floor = max(s["zero_action"], s["random_policy"])  # the strict score's 0: the better baseline
    assert s["score_last5"] == pytest.approx((s["last5"] - floor) / (s["source_final"] - floor))
    assert s["score_last5_vs_random"] == pytest.approx((s["last5"] - s["random_policy"])
                                                       / (s["source_final"] - s["random_policy"]))
    assert (tmp_path / "eval" / "incontext.png").stat().st_size > 10_000
    assert s["goal_distance_start"] == pytest.approx(1.0, abs=1e-6)  # from (0, 0) to a goal on the unit circle
    # which axes are episodes and steps: 6 episodes of 3 steps that end episode e at distance e from the goal
    where = np.zeros((1, 1, 6, 3, 2))
    where[0, 0, :, -1, 0] = np.arange(6)
    d = evaluate.goal_distances(where, np.zeros((1, 1, 2)))
    assert (d["goal_distance_start"], d["goal_distance_end_first"], d["goal_distance_end_last5"]) == (0, 0, 3)


def test_validation_scores_the_last_5_episodes_and_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    """Validation rollouts returning 7 known episodes per task: the log holds the first and the last-5 mean
    and the strict score of the last 5; ckpt.pt is the best-scoring update's model, last.pt the latest."""
    _write_point_histories(tmp_path / "data")
    args = _ad_args(tmp_path, tmp_path / "data", "--epochs", "5", "--eval-every", "1")
    # Whichever side of the floor the (random-action) source ends, hence whichever way scores follow returns,
    # the best comes before the last validation and is followed by a dip and a partial recovery.
    levels = iter([-10.0, -4.0, -16.0, -8.0, -12.0])

    def scripted_rollout(model, meta, tasks, n_episodes, **kwargs):
        assert n_episodes == meta["episodes"] and len(tasks) == 2
        episode = np.arange(7.0)                   # returns level - 6, ..., level: last 5 mean = level - 2
        return np.broadcast_to(next(levels) - 6 + episode, (2, 1, 7)).copy()
    monkeypatch.setattr(ad, "rollout", scripted_rollout)
    saved, save = {}, ad.save_atomic

    def save_and_keep(obj, path):  # every model ever written, by file and update
        saved[os.path.basename(path), obj["iter"]] = copy.deepcopy(obj["model"])
        save(obj, path)
    monkeypatch.setattr(ad, "save_atomic", save_and_keep)
    ad.train(args)
    log = json.load(open(tmp_path / "run" / "log.json"))
    assert [e["iter"] for e in log] == [1, 2, 3, 4, 5]
    assert [e["val_first_episode"] for e in log] == [-16.0, -10.0, -22.0, -14.0, -18.0]
    assert [e["val_last5"] for e in log] == [-12.0, -6.0, -18.0, -10.0, -14.0]
    meta = ad.load_checkpoint(str(tmp_path / "run"))[1]["meta"]
    floor = ad.strict_floor(*(envs.baseline_return("point_goal", envs.sample_tasks("point_goal", 2, "val"), p)
                              for p in ("zero", "random")))
    scores = [(entry["val_last5"] - floor) / (meta["source_final"] - floor) for entry in log]
    assert [entry["val_score"] for entry in log] == pytest.approx(scores)
    best = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert best["iter"] == 1 + int(np.argmax(scores)) < 5 and best["best_score"] == pytest.approx(max(scores))
    for key, value in best["model"].items():
        torch.testing.assert_close(value, saved[("ckpt.pt", best["iter"])][key], rtol=0, atol=0)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["iter"] == 5
    assert not all(torch.equal(v, saved[("last.pt", 5)][k]) for k, v in best["model"].items())


def test_a_nan_loss_stops_training_before_it_reaches_a_checkpoint(tmp_path, monkeypatch):
    """The loss turning NaN at the third update: one line naming the update, and the checkpoints written so far
    (after updates 1 and 2) keep their finite weights."""
    _write_point_histories(tmp_path / "data")
    loss, calls = ad.training_loss, []

    def poisoned(*args):
        calls.append(1)
        return loss(*args) * (math.nan if len(calls) == 3 else 1)
    monkeypatch.setattr(ad, "training_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        ad.main(_ad_argv(tmp_path, tmp_path / "data", "--epochs", "5", "--eval-every", "1"))
    message = str(e.value.code)
    assert message.startswith("error: the loss became nan") and " 2" in message and "\n" not in message
    for name in ("ckpt.pt", "last.pt"):
        ckpt = torch.load(tmp_path / "run" / name, weights_only=True)
        assert ckpt["iter"] <= 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_mse_loss_trains_on_the_executed_action_and_rolls_out_its_mean(tmp_path):
    """--loss mse (the paper's eq. 6): the model outputs one value per action dimension, its loss is the
    squared error to the executed action (not the policy's mean), and rollouts act with it as it is."""
    out = torch.tensor([[[0.5, -0.5], [0.0, 1.0]]])
    targets = {"act": torch.tensor([[[1.0, -1.0], [0.5, 0.5]]]), "act_mean": torch.zeros(1, 2, 2),
               "act_std": torch.ones(1, 2, 2)}
    assert ad.action_loss(out, targets, "mse").item() == pytest.approx((0.25 + 0.25 + 0.25 + 0.25) / 4)
    _write_point_histories(tmp_path / "data")
    ad.train(_ad_args(tmp_path, tmp_path / "data", "--loss", "mse", "--epochs", "2", "--eval-every", "2"))
    model, ckpt = ad.load_checkpoint(str(tmp_path / "run"))
    assert ckpt["model_config"]["d_out"] == 2 and ckpt["meta"]["loss"] == "mse"
    tasks = envs.sample_tasks("point_goal", 2, "test")
    sampled, mean = (ad.rollout(model, ckpt["meta"], tasks, 2, action_mode=mode, seed=s)
                     for mode, s in (("sample", 1), ("mean", 0)))
    np.testing.assert_array_equal(sampled, mean)  # no Gaussian head: nothing to sample, whatever the seed


def test_sampled_rollout_actions_follow_the_gaussian_head():
    """action_mode sample: mean + exp(log_std) x N(0, 1) per dimension, clamped to [-1, 1]; mean: the mean."""
    out = torch.tensor([0.3, -0.2, math.log(0.1), math.log(0.3)]).expand(20000, 4)
    sampled = ad.choose_action(out, "nll", "sample", torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampled.mean(0), torch.tensor([0.3, -0.2]), rtol=0, atol=0.01)
    torch.testing.assert_close(sampled.std(0), torch.tensor([0.1, 0.3]), rtol=0.03, atol=0)
    wide = ad.choose_action(torch.tensor([[0.9, 0.0]]).expand(1000, 2), "nll", "sample", torch.Generator())
    assert wide.max() == 1 and wide.min() >= -1  # std 1 around 0.9: clamped into the action box
    torch.testing.assert_close(ad.choose_action(out[:1], "nll", "mean"), torch.tensor([[0.3, -0.2]]))


@pytest.mark.parametrize("arch", ["mamba", "transformer"])
def test_ad_trains_in_bf16_on_any_cpu(tmp_path, monkeypatch, arch):
    """--dtype bf16 runs on a CPU without bf16 units too: ad.train computes its loss under bf16 autocast, in
    fp32; the gradients are within bf16 rounding of fp32's; the run checkpoints finite weights."""
    _write_point_histories(tmp_path / "data")
    args = _ad_args(tmp_path, tmp_path / "data", "--arch", arch, "--n-head", "2", "--d-ff", "16", "--dtype", "bf16",
                    "--epochs", "2", "--eval-every", "2")
    assert args.bf16
    (tokens, targets), _, config, _ = ad.prepare(args)
    grads = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = ad.build_model(config)
        with envs.autocast("cpu", bf16):
            loss = ad.training_loss(model, tokens, targets, "nll")
        assert loss.dtype == torch.float32
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for exact, rounded in zip(*grads):
        # bf16 keeps 8 significant bits: every gradient within 5% of its largest entry
        torch.testing.assert_close(rounded, exact, rtol=0, atol=0.05 * exact.abs().max().item() + 1e-7)
    assert any(not torch.equal(exact, rounded) for exact, rounded in zip(*grads))
    autocast, loss = [], ad.training_loss
    monkeypatch.setattr(ad, "training_loss", lambda *a: autocast.append(torch.is_autocast_enabled("cpu")) or loss(*a))
    ad.train(args)
    assert autocast and all(autocast)
    model, _ = ad.load_checkpoint(str(tmp_path / "run"))
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


def test_evaluate_scores_a_baseline_results_file(tmp_path, capsys):
    """7 episodes of known returns, e - 10 - 3 task - seed for episode e: the summary's means by hand (the
    last 5 are episodes 2-6), both scores, and the strict floor as the better baseline on the test tasks."""
    tasks = envs.sample_tasks("point_goal", 2, "test")
    task, seed, episode = np.meshgrid(np.arange(2), np.arange(3), np.arange(7), indexing="ij")
    returns = episode - 10.0 - 3 * task - seed
    result = dict(env="point_goal", method="MQL (test)", train_seed=0, tasks=tasks.tolist(), seeds=3,
                  returns=returns.tolist(), source_final=-4.5, source_curve=[-20.0, -4.5], algo="sac", k=4,
                  adaptation="none")
    (tmp_path / "mql").mkdir()
    (tmp_path / "mql" / "results.json").write_text(json.dumps(result))
    evaluate.main([str(tmp_path / "mql"), "--tasks", "2", "--device", "cpu"])
    s = json.load(open(tmp_path / "mql" / "eval.json"))["summary"]
    zero, random = (envs.baseline_return("point_goal", tasks, policy) for policy in ("zero", "random"))
    assert (s["zero_action"], s["random_policy"]) == (pytest.approx(zero), pytest.approx(random))
    floor = max(zero, random)
    assert (s["first_episode"], s["all_episodes"], s["last5"]) == (-12.5, -9.5, -8.5)
    assert s["score_last5"] == pytest.approx((-8.5 - floor) / (-4.5 - floor))
    assert s["score_last5_vs_random"] == pytest.approx((-8.5 - random) / (-4.5 - random))
    assert s["score_last5_per_task"] == pytest.approx([(-7 - floor) / (-4.5 - floor), (-10 - floor) / (-4.5 - floor)])
    result["tasks"] = envs.sample_tasks("point_goal", 2, "val").tolist()  # not the test split: refused
    (tmp_path / "mql" / "results.json").write_text(json.dumps(result))
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path / "mql"), "--device", "cpu"])
    assert "not run on the test tasks" in str(e.value.code)


def _baseline_results(directory, method="MQL", n_tasks=2, n_episodes=8, **extra):
    """A baseline's results.json on the first n_tasks test tasks, 2 seeds: returns -10 in every episode,
    the source's training-task final -4.5 (its curve: 8 episodes downsampled 4-fold)."""
    result = dict(env="point_goal", method=method, train_seed=0,
                  tasks=envs.sample_tasks("point_goal", n_tasks, "test").tolist(), seeds=2,
                  returns=np.full((n_tasks, 2, n_episodes), -10.0).tolist(), source_final=-4.5,
                  source_curve=[-20.0, -4.5], algo="sac", k=4, adaptation="none", **extra)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "results.json"), "w") as f:
        json.dump(result, f)
    return result


def test_evaluate_refuses_runs_scored_on_different_tasks_or_episodes(tmp_path, capsys):
    """Two tasks beside three, or 8 episodes beside 6, make no comparison: a one-line error unless
    --allow-mixed. A baseline row prints its own seed count (2, not --seeds' 3), and scores.md says how
    each row was made: budget, scored weights, actions, the strict score's 1."""
    _baseline_results(tmp_path / "mql", budget="120 TD3 updates")
    _baseline_results(tmp_path / "macaw", method="MACAW", n_tasks=3)
    _baseline_results(tmp_path / "short", method="MACAW", n_episodes=6)
    for other in ("macaw", "short"):
        argv = [str(tmp_path / "mql"), str(tmp_path / other), "--device", "cpu", "--out", str(tmp_path / "cmp")]
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        message = str(e.value.code)
        assert "different test tasks or episode counts" in message and "--allow-mixed" in message
        assert "\n" not in message
    evaluate.main(argv + ["--allow-mixed"])
    printed = capsys.readouterr().out
    assert "on 2 test tasks x 2 seeds, actions deterministic" in printed and "x 3 seeds" not in printed
    scores = (tmp_path / "cmp" / "scores.md").read_text()
    assert "| MQL | 120 TD3 updates | final weights | deterministic | -4.50, sac on the training tasks |" in scores


def test_strict_score_uses_the_source_run_on_the_test_tasks(tmp_path):
    """With the source's own run on the test tasks beside the training data (DATA_test), its final return
    (the last 10% of its episodes: here -2 each) is the strict score's 1, and eval.json says so; without
    one, the training-task final (-4.5), flagged; a run on other tasks is not taken for it."""
    tasks = envs.sample_tasks("point_goal", 2, "test")

    def source_run(directory, tasks):
        for i, task in enumerate(tasks):
            envs.save_history(envs.history_path(directory, i), obs=np.zeros((1, 8, 20, 2)), act=np.zeros((1, 8, 20, 2)),
                              rew=np.full((1, 8, 20), -0.1), task=task, env="point_goal", algo="sac", seed=0,
                              steps=160)

    _baseline_results(tmp_path / "mql", data=str(tmp_path / "data" / "sac"))
    floor = max(envs.baseline_return("point_goal", tasks, policy) for policy in ("zero", "random"))

    def summary(*flags):
        evaluate.main([str(tmp_path / "mql"), "--tasks", "2", "--device", "cpu", *flags])
        return json.load(open(tmp_path / "mql" / "eval.json"))["summary"]
    s = summary()
    assert (s["source_final"], s["source_final_on"]) == (-4.5, "training tasks")
    source_run(tmp_path / "data" / "sac_test", envs.sample_tasks("point_goal", 2, "train"))   # not the test tasks
    assert summary()["source_final_on"] == "training tasks"
    source_run(tmp_path / "data" / "sac_test", tasks)
    s = summary()
    assert s["source_final"] == pytest.approx(-2.0) and s["source_final_on"] == "test tasks"
    assert str(tmp_path / "data" / "sac_test") in s["source_final_from"]
    assert s["score_last5"] == pytest.approx((-10 - floor) / (-2 - floor))
    source_run(tmp_path / "elsewhere", envs.sample_tasks("point_goal", 2, "val"))
    with pytest.raises(SystemExit) as e:
        summary("--source-test-data", str(tmp_path / "elsewhere"))
    assert "does not hold sac histories of the first 2 test tasks" in str(e.value.code)


SHIPPED = sorted(os.path.relpath(os.path.dirname(p), HERE)  # checkpoints/ENV/ARCH and checkpoints/ENV/noise/ARCH
                 for pattern in (("*", "*"), ("*", "noise", "*"))
                 for p in glob.glob(os.path.join(HERE, "checkpoints", *pattern, "ckpt.pt")))


@pytest.mark.parametrize("directory", SHIPPED)
def test_shipped_checkpoints_load_safely_and_evaluate(directory, tmp_path):
    """Every checkpoint under checkpoints/ loads with weights_only=True (tensors and plain types only) and
    plays a couple of unseen test tasks in context, with no data and no training."""
    assert os.path.getsize(os.path.join(HERE, directory, "ckpt.pt")) < 2 * 2 ** 20
    evaluate.main([os.path.join(HERE, directory), "--tasks", "2", "--seeds", "1", "--episodes", "3", "--device", "cpu",
                   "--out", str(tmp_path)])
    result = json.load(open(tmp_path / "eval.json"))
    returns = np.asarray(result["returns"])
    assert returns.shape == (2, 1, 3) and np.isfinite(returns).all()
    parts = directory.split(os.sep)
    assert result["env"] == parts[1] and result["arch"] == parts[-1]
    if "noise" in parts:  # scored against its expert, shipped beside it
        assert result["summary"]["source_final_from"] == "the expert, noise-free, on these test tasks"


def test_evaluate_reports_the_runs_updates_beside_the_scored_ones(tmp_path):
    """The budget column states all the updates a run trained, and separately the update of the weights it
    scores (ckpt.pt: the best on validation, often earlier), not the latter as the former."""
    _write_point_histories(tmp_path / "data")
    ad.train(_ad_args(tmp_path, tmp_path / "data", "--epochs", "3", "--eval-every", "1"))
    total = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["iter"]
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["total_updates"] == total >= 3
    evaluate.main([str(tmp_path / "run"), "--tasks", "2", "--seeds", "1", "--episodes", "2", "--no-blind",
                   "--device", "cpu", "--out", str(tmp_path / "eval")])
    result = json.load(open(tmp_path / "eval" / "eval.json"))
    assert result["budget"] == f"{total:,} updates, best at {ckpt['iter']:,}"
    assert (result["total_updates"], result["best_at_update"]) == (total, ckpt["iter"])
    del ckpt["total_updates"]  # a checkpoint from before the total was recorded
    assert evaluate.training_budget(ckpt) == f"best at {ckpt['iter']:,} (the run's total is not recorded)"


def test_evaluate_scores_a_runs_final_weights_from_its_last_pt(tmp_path):
    """`evaluate.py RUN/last.pt` rolls out the final weights, says so (budget, scored weights, label) and
    writes to RUN/final, leaving ckpt.pt's eval.json alone; scored beside ckpt.pt they are two rows."""
    _write_point_histories(tmp_path / "data")
    ad.train(_ad_args(tmp_path, tmp_path / "data", "--epochs", "3", "--eval-every", "1"))
    run = tmp_path / "run"
    total = torch.load(run / "last.pt", weights_only=True)["iter"]
    flags = ["--tasks", "2", "--seeds", "1", "--episodes", "2", "--no-blind", "--device", "cpu"]
    evaluate.main([str(run), *flags])
    evaluate.main([str(run / "last.pt"), *flags])
    best, final = (json.load(open(run / where / "eval.json")) for where in (".", "final"))
    assert best["best_at_update"] < total  # else the two files hold the same weights and nothing tells them apart
    assert final["budget"] == f"{total:,} updates, final weights" and final["best_at_update"] == total
    assert (best["selection"], final["selection"]) == (
        "best on validation tasks (checked every 1 updates)", "final weights (last.pt)")
    model, ckpt = ad.load_checkpoint(str(run / "last.pt"))
    tasks = envs.sample_tasks("point_goal", 2, "test")
    expected = ad.rollout(model, ckpt["meta"], tasks, 2, action_mode="sample", window=ad.rollout_window(ckpt["meta"]))
    np.testing.assert_array_equal(final["returns"], expected)
    evaluate.main([str(run), str(run / "last.pt"), *flags, "--out", str(tmp_path / "both")])
    rows = json.load(open(tmp_path / "both" / "eval.json"))
    assert [evaluate.label(r).endswith(", final weights") for r in rows] == [False, True]


def test_evaluate_rolls_a_windowed_model_out_within_its_window(tmp_path):
    """A Mamba trained on 25-token windows, rolled out for 3 episodes (60 tokens): evaluate.py's returns are
    those of a rollout bounded to the training window, and with --unbounded-context those of the model's own
    unbounded state, which differ once the context outgrows the window."""
    _write_point_histories(tmp_path / "data")
    ad.train(_ad_args(tmp_path, tmp_path / "data", "--context", "25", "--epochs", "1", "--eval-every", "1"))
    model, ckpt = ad.load_checkpoint(str(tmp_path / "run"))
    tasks = envs.sample_tasks("point_goal", 2, "test")
    expected = {window: ad.rollout(model, ckpt["meta"], tasks, 3, action_mode="mean", window=window)
                for window in (25, None)}
    assert not np.array_equal(expected[25], expected[None])
    for flags, window in (([], 25), (["--unbounded-context"], None)):
        evaluate.main([str(tmp_path / "run"), "--tasks", "2", "--seeds", "1", "--episodes", "3", "--action-mode",
                       "mean", "--device", "cpu", "--out", str(tmp_path / "eval"), *flags])
        result = json.load(open(tmp_path / "eval" / "eval.json"))
        assert result["rollout_window"] == window
        np.testing.assert_array_equal(result["returns"], expected[window])  # the windows differ by about 1e-4


def test_ad_errors_are_one_line(tmp_path, capsys):
    def error_of(argv):
        with pytest.raises(SystemExit) as e:
            ad.main(argv)
        return str(e.value.code)

    assert "python sac.py --env point_goal" in error_of(["--env", "point_goal", "--data", str(tmp_path / "none")])
    (tmp_path / "empty").mkdir()
    assert "no task_*.npz" in error_of(["--env", "point_goal", "--data", str(tmp_path / "empty")])
    _write_point_histories(tmp_path / "data", n_tasks=2)
    assert "not reacher_goal" in error_of(["--env", "reacher_goal", "--data", str(tmp_path / "data")])
    assert "--resume: no" in error_of(["--env", "point_goal", "--data", str(tmp_path / "data"), "--out",
                                       str(tmp_path / "fresh"), "--resume"])
    assert "longer than a downsampled stream" in error_of(["--env", "point_goal", "--data", str(tmp_path / "data"),
                                                           "--context", "1000"])
    with pytest.raises(SystemExit):                                        # argparse: unknown arch
        ad.main(["--arch", "rnn"])
    # a checkpoint of another arch, or not a checkpoint at all
    args = _ad_args(tmp_path, tmp_path / "data", "--epochs", "1")
    ad.train(args)
    with pytest.raises(ad.DataError, match="already holds a run: pass --resume"):
        ad.train(args)
    with pytest.raises(ad.DataError, match="holds a mamba model, not transformer"):
        ad.load_checkpoint(str(tmp_path / "run"), arch="transformer")
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path / "bad.pt")])
    assert "not a checkpoint written by ad.py" in str(e.value.code)


# ----------------------------------------------------------------------------- transformer.py and the comparison

def _tiny_transformer(max_len=12):
    torch.manual_seed(0)
    return transformer.Transformer(d_in=5, d_out=3, d_model=16, n_layer=2, n_head=4, max_len=max_len, d_ff=32).eval()


def test_transformer_step_reproduces_forward_and_slides_past_max_len():
    """The KV cache gives forward's outputs; past max_len each step equals forward over the window that
    the slide keeps: after the cache fills at 12 tokens, tokens 6.. are re-encoded from position 0."""
    model, x = _tiny_transformer(max_len=12), torch.randn(2, 30, 5)
    with torch.no_grad():
        state, steps = model.init_state(2), []
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state)
            steps.append(y)
        steps = torch.stack(steps, 1)
        torch.testing.assert_close(steps[:, :12], model(x[:, :12]), rtol=1e-5, atol=1e-6)
        for t in range(12, 30):
            start = 6 * ((t - 6) // 6)          # windows 6..17, 12..23, 18..29: 6 kept + up to 6 new
            torch.testing.assert_close(steps[:, t], model(x[:, start:t + 1])[:, -1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="longer than this transformer's max_len 12"):
        model(x[:, :13])


def test_sliding_context_bounds_any_model_to_its_training_window():
    """ad.SlidingContext: past `window` tokens, each step of a Mamba equals its forward over the newest
    tokens the slide keeps (window // 2 kept + the new ones), exactly as the transformer's own slide;
    on a transformer with max_len = window the wrapper changes nothing."""
    torch.manual_seed(0)
    x = torch.randn(2, 30, 5)
    for model in (mamba.Mamba(5, 3, 16, 2, d_state=4).eval(), _tiny_transformer(max_len=12)):
        with torch.no_grad():
            bounded, own = ad.SlidingContext(model, 12), model
            outputs = {}
            for name, m in (("bounded", bounded), ("own", own)):
                state, ys = m.init_state(2), []
                for t in range(30):
                    y, state = m.step(x[:, t], state)
                    ys.append(y)
                outputs[name] = torch.stack(ys, 1)
            for t in range(30):
                start = 0 if t < 12 else 6 * ((t - 6) // 6)
                torch.testing.assert_close(outputs["bounded"][:, t], model(x[:, start:t + 1])[:, -1],
                                           rtol=1e-4, atol=1e-5)
        if isinstance(model, transformer.Transformer):
            torch.testing.assert_close(outputs["bounded"], outputs["own"], rtol=1e-5, atol=1e-6)
        else:  # unbounded, Mamba's state keeps every token: its late outputs differ
            assert not torch.allclose(outputs["bounded"][:, 20:], outputs["own"][:, 20:])


@pytest.mark.parametrize("arch", ["mamba", "hybrid"])
def test_ddp_two_processes_equal_one_process_with_the_global_batch(tmp_path, arch):
    """torchrun, 2 processes (gloo) with 2 samples each vs one process with 4: after a few updates the
    parameters agree to float tolerance (the global batch and its noise are the same draws), and the
    checkpoint records the world size, which --resume then requires. DM-H with valuable sub-goals calls
    the DDP module twice before one backward: its gradient must still be the one process's."""
    _write_point_histories(tmp_path / "data")
    common = ["--env", "point_goal", "--data", str(tmp_path / "data"), "--arch", arch, "--d-model", "8",
              "--n-layer", "1", "--d-state", "4", "--k", "2", "--val-tasks", "2", "--val-seeds", "1",
              "--warmup-iters", "2", "--threads", "1", "--device", "cpu", "--epochs", "4", "--eval-every", "100"]
    if arch == "hybrid":
        common += ["--segment", "3", "--attn-layers", "1", "--n-head", "2", "--d-ff", "16", "--valuable-subgoals"]
    ad.main(common + ["--batch-size", "4", "--out", str(tmp_path / "one")])
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "ad.py", *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                            cwd=HERE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "of 4 samples (2 per process x 2)" in result.stdout
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert one["iter"] == two["iter"] > 3 and (one["world_size"], two["world_size"]) == (1, 2)
    for key in one["model"]:
        torch.testing.assert_close(one["model"][key], two["model"][key], rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)  # ad.train's initialisation: every trained weight moved from it, frozen buffers did not
    initial = ad.build_model(one["model_config"])
    trained = dict(initial.named_parameters())
    for name, value in initial.state_dict().items():
        assert torch.equal(one["model"][name], value) != (name in trained), name
    with pytest.raises(SystemExit, match="trained by 2 process"):
        ad.main(common + ["--batch-size", "2", "--out", str(tmp_path / "two"), "--resume"])


@pytest.mark.parametrize("arch", ["mamba", "transformer"])
def test_changing_a_future_token_never_changes_an_earlier_output(arch):
    torch.manual_seed(0)
    model = (mamba.Mamba(5, 3, 16, 2, d_state=4) if arch == "mamba" else _tiny_transformer(max_len=20)).eval()
    x = torch.randn(2, 20, 5)
    changed = x.clone()
    changed[:, 9] += 1.0
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=1e-6)
    assert (after[:, 9:] - before[:, 9:]).abs().max() > 1e-3


def test_match_params_finds_the_closest_width():
    mamba_config = ad.arch_config("mamba", dict(d_model=64, n_layer=3, d_state=16), d_in=6, d_out=4, max_len=200)
    target = ad.count_params(mamba_config)
    assert target == sum(p.numel() for p in ad.build_model(mamba_config).parameters())
    config = ad.arch_config("transformer", dict(d_model=8, n_layer=3, n_head=4, d_ff=192), d_in=6, d_out=4,
                            max_len=200)
    matched = ad.match_params(config, target)
    assert matched["d_model"] % 4 == 0
    gaps = {w: abs(ad.count_params({**config, "d_model": w}) - target) for w in range(4, 200, 4)}
    assert gaps[matched["d_model"]] == min(gaps.values())
    assert ad.match_params(mamba_config, target)["d_model"] == 64


def test_ad_trains_and_evaluates_a_transformer(tmp_path):
    """ad.py --arch transformer end to end; two seeds form one group in evaluate.py's table and plot."""
    _write_point_histories(tmp_path / "data")
    for seed in (0, 1):
        ad.train(_ad_args(tmp_path, tmp_path / "data", "--arch", "transformer", "--n-head", "2", "--d-ff", "16",
                          "--epochs", "3", "--eval-every", "3", "--seed", str(seed), "--out",
                          str(tmp_path / f"run{seed}")))
    model, ckpt = ad.load_checkpoint(str(tmp_path / "run0"), arch="transformer")
    assert isinstance(model, transformer.Transformer) and ckpt["model_config"]["max_len"] == 3 * 20
    evaluate.main([str(tmp_path / "run0"), str(tmp_path / "run1"), "--tasks", "2", "--seeds", "1",
                   "--episodes", "5", "--device", "cpu", "--out", str(tmp_path / "eval")])   # 100 tokens: slides
    results = json.load(open(tmp_path / "eval" / "eval.json"))
    assert [r["arch"] for r in results] == ["transformer"] * 2 and [r["train_seed"] for r in results] == [0, 1]
    assert np.asarray(results[0]["returns"]).shape == (2, 1, 5)
    table, protocol = (tmp_path / "eval" / "scores.md").read_text().split("\n\n")   # scores; how rows were made
    assert table.count("AD-transformer 8x1") == protocol.count("AD-transformer 8x1") == 1
    assert "| 2 (0, 1) |" in table
    with pytest.raises(SystemExit, match="share training seed"):
        evaluate.main([str(tmp_path / "run0"), str(tmp_path / "run0"), "--tasks", "1", "--seeds", "1",
                       "--episodes", "1", "--device", "cpu", "--out", str(tmp_path / "eval")])


def test_windowed_transformer_validates_on_windows(tmp_path):
    """A transformer trained on N-token windows cannot take a whole held-out stream: its held-out loss is
    the mean over the streams' consecutive windows, and equals the loss of those windows fed by hand."""
    _write_point_histories(tmp_path / "data")
    args = _ad_args(tmp_path, tmp_path / "data", "--arch", "transformer", "--n-head", "2", "--d-ff", "16",
                    "--context", "25", "--epochs", "2", "--eval-every", "2")
    ad.train(args)
    log = json.load(open(tmp_path / "run" / "log.json"))
    assert log and all(np.isfinite(entry["val_loss"]) for entry in log)
    model, ckpt = ad.load_checkpoint(str(tmp_path / "run"), arch="transformer")
    _, (tokens, targets), _, _ = ad.prepare(args)
    assert tokens.shape[1] == 60 and ckpt["model_config"]["max_len"] == 25   # 2 windows a stream, 10 tokens left
    by_hand = [ad.action_loss(model(tokens[:, start:start + 25]),
                              {key: v[:, start:start + 25] for key, v in targets.items()}, "nll").item()
               for start in (0, 25)]
    assert ad.validation_loss(model, tokens, targets, "nll", window=25) == pytest.approx(np.mean(by_hand), rel=1e-5)
    # 2 streams = 4 windows, in batches of 3 and 1: the mean over windows, not the mean of the 2 batch means
    assert ad.validation_loss(model, tokens, targets, "nll", window=25, batch_size=3) == pytest.approx(
        np.mean(by_hand), rel=1e-5)


# ----------------------------------------------------------------------------- mamba.py: the Triton kernels
# On a CPU these run in Triton's interpreter (TRITON_INTERPRET=1, set at the top of this file), which is
# slow (the generic associative scan calls the combine function once per element): tiny shapes only.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton has wheels for Linux only (requirements.txt): elsewhere these tests skip, and only then.
needs_triton = pytest.mark.skipif(mamba.triton is None, reason="triton is not installed (no wheel for this "
                                                               "platform): mamba.py's scan runs its torch path")


@pytest.mark.parametrize("shape, options, chunk", [
    ((2, 5, 37, 4), {"D", "z", "delta_bias", "softplus"}, 16),  # 3 chunks, the last one partial; dim < block
    ((1, 3, 70, 16), {"softplus"}, 32),                          # the default chunk: 3 chunks; N = 16
    ((2, 17, 20, 1), {"D", "z"}, 16),                            # dim 17: a second channel block, 1 row used
    ((1, 4, 23, 5), {"delta_bias"}, 8),                          # N = 5 padded to 8; 3 chunks
    ((2, 3, 1, 2), {"z", "softplus"}, 64),                       # L = 1
])
@needs_triton
def test_triton_scan_equals_ref(shape, options, chunk, monkeypatch):
    """The Triton kernels and the sequential oracle agree on the output and all eight gradients."""
    monkeypatch.setattr(mamba, "CHUNK", chunk)
    results = _scan_outputs_and_grads(shape, options, ("ref", "triton"), device=DEVICE)
    for fast, ref in zip(results["triton"], results["ref"]):
        _assert_close_to_scale(fast, ref, TRITON_TOL)


@needs_triton
def test_triton_scan_last_state(monkeypatch):
    """Every backend hands over the same final state h_{L-1} [batch, dim, N], across chunk boundaries."""
    monkeypatch.setattr(mamba, "CHUNK", 16)
    inputs = {key: value.to(DEVICE) for key, value in _scan_inputs(2, 5, 41, 3).items()}
    y_ref, h_ref = mamba.selective_scan(**inputs, delta_softplus=True, backend="ref", return_last_state=True)
    for backend in ("torch", "triton"):
        y, h = mamba.selective_scan(**inputs, delta_softplus=True, backend=backend, return_last_state=True)
        assert h.shape == (2, 5, 3) and h.dtype == torch.float32
        _assert_close_to_scale(y, y_ref, TRITON_TOL)
        _assert_close_to_scale(h, h_ref, TRITON_TOL)


@needs_triton
def test_triton_scan_bf16_inputs():
    """bf16 in, bf16 out (and bf16 gradients), fp32 inside: as close to the fp32 oracle as bf16 rounding allows."""
    shape, options = (2, 5, 19, 4), {"D", "z", "delta_bias", "softplus"}
    triton_bf16 = _scan_outputs_and_grads(shape, options, ("triton",), device=DEVICE, dtype=torch.bfloat16)
    ref_fp32 = _scan_outputs_and_grads(shape, options, ("ref",), device=DEVICE)
    assert triton_bf16["triton"][0].dtype == torch.bfloat16
    for fast, ref in zip(triton_bf16["triton"], ref_fp32["ref"]):
        assert fast.dtype == (torch.bfloat16 if fast.dim() == 3 else torch.float32)
        _assert_close_to_scale(fast, ref, BF16_TOL)


@needs_triton
def test_triton_mamba_model_matches_torch():
    """A whole (tiny) Mamba gives the same loss and parameter gradients on either scan path."""
    torch.manual_seed(0)
    model = mamba.Mamba(d_in=3, d_out=2, d_model=8, n_layer=2, d_state=4).to(DEVICE)
    x = torch.randn(2, 19, 3, device=DEVICE)
    grads = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        loss = model(x, backend=backend).pow(2).mean()
        loss.backward()
        grads[backend] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for fast, ref in zip(grads["triton"], grads["torch"]):
        _assert_close_to_scale(fast, ref, TRITON_TOL)


@needs_triton
def test_triton_backend_choice_and_errors(monkeypatch):
    inputs = _scan_inputs(1, 2, 3, 2)
    monkeypatch.setattr(mamba, "_INTERPRETED", False)          # as on a CPU machine without the interpreter
    with pytest.raises(ValueError, match="runs on CUDA tensors .* use backend='torch'"):
        mamba.selective_scan(**inputs, backend="triton")
    monkeypatch.setattr(mamba, "_scan_triton", None)           # "auto" must not touch it for CPU tensors
    torch.testing.assert_close(mamba.selective_scan(**inputs), mamba.selective_scan(**inputs, backend="ref"))


# ----------------------------------------------------------------------------- mamba.py: resets (rl2.py)
# Rows of a batch with the steps where a new sequence starts: at the first step (a no-op), mid-chunk, on a
# chunk boundary (16, with chunks of 16 steps in Triton and on the CPU), right after another reset, at the last
# step; and a row without any, whose packed scan runs the reset code against the plain reset=None one.
RESET_AT = ([0, 5, 16, 17, 36], [], [1, 30])


def _reset_mask(L):
    reset = torch.zeros(len(RESET_AT), L, dtype=torch.bool)
    for row, starts in enumerate(RESET_AT):
        reset[row, starts] = True
    return reset


def _segments(L, starts):
    """[(s, e)]: the segments [s, e) of a row of length L that resets at starts."""
    bounds = sorted({0, L, *starts})
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("backend", ["ref", "torch", pytest.param("triton", marks=needs_triton)])
def test_scan_with_resets_equals_independent_scans_of_the_segments(backend, monkeypatch):
    """One scan over packed sequences, h_t = a_t (1 - r_t) h_{t-1} + delta_t B_t u_t, gives each segment's
    output and every input gradient exactly as if it were scanned alone."""
    monkeypatch.setattr(mamba, "CHUNK", 16)
    monkeypatch.setattr(mamba, "_chunk_len", lambda u, N: 16)      # the CPU path's chunks too
    L, inputs = 37, _scan_inputs(len(RESET_AT), 3, 37, 2)
    reset = _reset_mask(L)
    results = []
    for packed in (True, False):
        leaves = {key: value.to(DEVICE).clone().requires_grad_() for key, value in inputs.items()}
        if packed:
            y = mamba.selective_scan(**leaves, delta_softplus=True, backend=backend, reset=reset.to(DEVICE))
        else:  # u, delta, z, B, C sliced to one row's segment [s, e); A, D, delta_bias shared
            y = torch.cat([torch.cat([mamba.selective_scan(
                **{key: value[row:row + 1, :, s:e] if value.dim() == 3 else value for key, value in leaves.items()},
                delta_softplus=True, backend=backend) for s, e in _segments(L, starts)], dim=-1)
                for row, starts in enumerate(RESET_AT)])
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        results.append([y.detach()] + [leaves[key].grad for key in sorted(leaves)])
    for with_resets, by_segments in zip(*results):
        _assert_close_to_scale(with_resets, by_segments, CPU_TOL if backend != "triton" else TRITON_TOL)


def test_mamba_with_resets_equals_its_segments_and_step_across_a_reset_equals_forward():
    """Mamba.forward with resets (conv windows and scan states cut at each reset) equals running each segment
    alone, in outputs and parameter gradients; step(reset=r_t) reproduces it token by token."""
    torch.manual_seed(0)
    model = mamba.Mamba(d_in=5, d_out=3, d_model=16, n_layer=2, d_state=4)
    L = 37
    x, reset = torch.randn(len(RESET_AT), L, 5), _reset_mask(L)
    results = []
    for packed in (True, False):
        model.zero_grad()
        if packed:
            y = model(x, reset=reset)
        else:
            y = torch.cat([torch.cat([model(x[row:row + 1, s:e]) for s, e in _segments(L, starts)], dim=1)
                           for row, starts in enumerate(RESET_AT)])
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in model.parameters()])
    for with_resets, by_segments in zip(*results):
        _assert_close_to_scale(with_resets, by_segments, CPU_TOL)
    with torch.no_grad():
        state, steps = model.init_state(len(RESET_AT)), []
        for t in range(L):
            y, state = model.step(x[:, t], state, reset=reset[:, t])
            steps.append(y)
    _assert_close_to_scale(torch.stack(steps, 1), results[0][0], CPU_TOL)


# ----------------------------------------------------------------------------- rl2.py

def test_trial_gae_by_hand_runs_across_episodes_and_stops_at_trial_ends():
    """Two packed trials of 2 steps (think: 2 one-step episodes each); gamma = lambda = 0.5. The TD error
    bootstraps from the next step inside a trial and from 0 at its end: delta = [1 + 0.5 - 0.5, 2 - 1,
    3 + 1 - 1.5, 4 - 2] = [1, 1, 2.5, 2]; A_t = delta_t + 0.25 A_{t+1} within a trial: [1.25, 1, 3, 2]."""
    rew, value = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.5, 1.0, 1.5, 2.0]])
    trial_end = torch.tensor([False, True, False, True])
    torch.testing.assert_close(rl2.trial_gae(rew, value, trial_end, gamma=0.5, lam=0.5),
                               torch.tensor([[1.25, 1.0, 3.0, 2.0]]))


@pytest.mark.parametrize("arch", ["mamba", "gru"])
def test_packed_trials_read_as_if_each_ran_alone_and_as_played(arch):
    """run_packed (training: P trials per row, one Mamba scan with resets, or the GRU cut at the trials)
    gives each trial's outputs as step() gave them while it played from a fresh state."""
    torch.manual_seed(0)
    model = rl2.build_model(arch, d_in=6, d_out=3, d_model=16, n_layer=2)
    x = torch.randn(4, 7, 6)                                            # 4 trials of 7 steps
    with torch.no_grad():
        state, steps = model.init_state(4), []
        for t in range(7):
            y, state = model.step(x[:, t], state)
            steps.append(y)
        packed = rl2.run_packed(model, rl2.pack(x, 2), trial_len=7)     # 2 rows of 2 trials
    _assert_close_to_scale(packed.reshape(4, 7, 3), torch.stack(steps, 1), CPU_TOL)


def test_rl2_gru_is_matched_in_parameters():
    models = [rl2.build_model(arch, d_in=6, d_out=3, d_model=32, n_layer=2) for arch in ("mamba", "gru")]
    counts = [rl2.count_params(model) for model in models]
    assert abs(counts[1] - counts[0]) < 0.02 * counts[0]


@pytest.mark.parametrize("arch", ["mamba", "gru"])
def test_rl2_blind_trials_zero_every_reward_input(arch):
    """rl2's reward-blind control: every token the model steps on has 0 in its reward slot, while the trial
    still returns the env's rewards; the ordinary trial feeds them (fails if any reward reaches the model)."""
    torch.manual_seed(0)
    agent = rl2.Agent(rl2.build_model(arch, d_in=6, d_out=3, d_model=8, n_layer=1), act_dim=2)
    seen, step = [], agent.model.step

    def recording_step(x, state):
        seen.append(x[:, 2 + 2].clone())                                # [obs, prev act, prev rew, first]
        return step(x, state)
    agent.model.step = recording_step
    vec = envs.MultiTaskVecEnv("point_goal", envs.sample_tasks("point_goal", 2, "test"), 2)
    for blind in (True, False):
        seen.clear()
        trials = rl2.play_trials(agent, vec, 3, "cpu", blind=blind)
        rewards = torch.cat(seen)
        assert len(seen) == 3 * vec.horizon and (trials["rew"] < 0).all()
        assert (rewards == 0).all() if blind else (rewards != 0).float().mean() > 0.9


def test_rl2_learns_point_goal_and_writes_an_evaluable_result(tmp_path):
    """A short RL^2-Mamba run: the trials' return rises over training, and results.json is scored by evaluate.py,
    its reward-blind control included."""
    _write_point_histories(tmp_path / "data", n_tasks=3)
    out = tmp_path / "rl2"
    rl2.main(["--data", str(tmp_path / "data"), "--out", str(out), "--steps", "12800", "--rows", "8", "--pack", "2",
              "--tasks", "20", "--test-tasks", "2", "--test-seeds", "1", "--threads", "1"])
    log = torch.load(out / "rl2.pt", weights_only=False)["log"]
    first, last = (np.mean([entry["returns"] for entry in part]) for part in (log[:3], log[-3:]))
    assert last > first + 2, (first, last)  # measured: -19.8 -> -16.0
    evaluate.main([str(out), "--device", "cpu"])
    result = json.loads((out / "eval.json").read_text())
    assert np.asarray(result["returns"]).shape == (2, 1, 2) and result["method"] == "RL2-mamba"
    blind = np.asarray(result["blind_returns"])
    assert blind.shape == (2, 1, 2) and blind[:, :, 0].mean() == pytest.approx(result["summary"]["blind_first_episode"])
    row = next(line for line in (out / "scores.md").read_text().splitlines() if line.startswith("| RL2-mamba"))
    assert row.split(" | ")[8] != "—"                                   # the reward-blind score column


_COMPILE_FOR_SM90 = """
import triton, mamba
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=mamba.BLOCK_D, BLOCK_N=16, CHUNK=mamba.CHUNK)
like_input = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr"}
for dtype, has_reset in (("fp32", False), ("bf16", False), ("fp32", True)):
    flags["HAS_RESET"] = has_reset
    for kernel in (mamba._scan_fwd_kernel, mamba._scan_bwd_kernel):
        signature = {name: "constexpr" if name in flags else "i32" if not name.endswith("_ptr")
                     else "*i1" if name == "reset_ptr"  # a torch.bool tensor
                     else "*" + (dtype if name in like_input else "fp32") for name in kernel.arg_names}
        constexprs = {(kernel.arg_names.index(name),): value for name, value in flags.items()}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=mamba.NUM_WARPS))
        assert compiled.asm["cubin"], kernel
"""


@needs_triton
def test_triton_kernels_compile_for_a_gpu():
    """The interpreter runs code that the compiler may reject: compile both kernels, fp32 and bf16, and fp32
    with resets, down to an H100 (sm_90) binary with Triton's own compiler and ptxas; no GPU is needed for that."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], cwd=HERE, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------- behaviour pictures

def test_each_env_traces_what_the_behaviour_figure_draws():
    """trace() reads (where, goal) from the simulator state: known states give known points."""
    point = envs.make_env("point_goal", task=(0.6, 0.8), seed=0)
    point.step(np.array([1.0, 0.0]))
    where, goal = point.trace()
    np.testing.assert_allclose(where, [0.1, 0.0], atol=1e-7)
    np.testing.assert_allclose(goal, [0.6, 0.8])

    reacher = envs.make_env("reacher_goal", task=(0.05, -0.1), seed=0)
    qpos = np.zeros(reacher.model.nq)
    qpos[-2:] = reacher.task                                # both joints at 0: the arm lies along x
    reacher.set_state(qpos, np.zeros(reacher.model.nv))
    where, goal = reacher.trace()
    np.testing.assert_allclose(where, [0.21, 0.0], atol=1e-6)  # links of 0.1 and 0.11
    np.testing.assert_allclose(goal, [0.05, -0.1], atol=1e-6)

    pusher = envs.make_env("pusher_goal", task=(0.2, 0.1, -0.1, 0.15), seed=0)
    where, goal = pusher.trace()                             # the XML puts both bodies at (0.45, -0.05)
    np.testing.assert_allclose(where, [0.65, 0.05], atol=1e-6)
    np.testing.assert_allclose(goal, [0.35, 0.10], atol=1e-6)

    cheetah = envs.make_env("half_cheetah_vel", task=(2.5,), seed=0)
    qvel = np.zeros(cheetah.model.nv)
    qvel[0] = 1.5
    cheetah.set_state(cheetah.data.qpos.copy(), qvel)
    where, goal = cheetah.trace()
    np.testing.assert_allclose(where, [1.5])
    np.testing.assert_allclose(goal, [2.5])

    ant = envs.make_env("ant_dir", task=(0.0, -1.0), seed=0)
    qpos = ant.data.qpos.copy()
    qpos[:2] = 1.0, -2.0
    ant.set_state(qpos, np.zeros(ant.model.nv))
    where, goal = ant.trace()
    np.testing.assert_allclose(where, [1.0, -2.0], atol=1e-6)
    np.testing.assert_allclose(goal, [0.0, -1.0])
    assert [envs.ENVS[e].env_class.trace_kind for e in envs.ENVS] == ["path", "path", "path", "speed", "direction"]


def _tiny_checkpoint(tmp_path):
    _write_point_histories(tmp_path / "data")
    ad.train(_ad_args(tmp_path, tmp_path / "data", "--epochs", "2"))
    return tmp_path / "run"


def test_rollout_records_the_paths_that_earned_its_returns(tmp_path):
    model, ckpt = ad.load_checkpoint(str(_tiny_checkpoint(tmp_path)))
    tasks = envs.sample_tasks("point_goal", 2, "test")
    kwargs = dict(n_episodes=3, n_seeds=2, action_mode="sample", seed=1)
    returns, where, goal = ad.rollout(model, ckpt["meta"], tasks, record=True, **kwargs)
    assert where.shape == (2, 2, 3, 21, 2) and goal.shape == (2, 2, 2)
    np.testing.assert_array_equal(returns, ad.rollout(model, ckpt["meta"], tasks, **kwargs))  # unchanged by it
    np.testing.assert_allclose(goal, np.broadcast_to(tasks[:, None], (2, 2, 2)))
    np.testing.assert_array_equal(where[:, :, :, 0], 0)                  # every episode starts at the origin
    steps = np.linalg.norm(np.diff(where, axis=3), axis=-1)
    assert steps.max() <= 0.1 * np.sqrt(2) + 1e-6 and steps.min() > 0       # s <- s + 0.1 a, a in the box
    distance = np.linalg.norm(where[:, :, :, 1:] - goal[:, :, None, None], axis=-1)  # reward: -||s - goal||
    np.testing.assert_allclose(returns, -distance.sum(-1), rtol=1e-5)


def test_evaluate_draws_behaviour_and_animates(tmp_path):
    run = _tiny_checkpoint(tmp_path)
    evaluate.main([str(run), "--tasks", "4", "--seeds", "2", "--episodes", "3", "--device", "cpu", "--animate"])
    assert (run / "behaviour.png").stat().st_size > 10_000
    from PIL import Image
    gif = Image.open(run / "behaviour.gif")
    assert gif.n_frames == 3 * 20                                        # 3 episodes x 20 steps


def test_behaviour_panel_keeps_the_goal_marks_in_view():
    """Ant-Dir's arrow is as long as the longest path; its tip must lie inside the panel (matplotlib drops an
    annotation whose tip is outside the axes, which once left Ant's figure without its goal)."""
    import matplotlib.pyplot as plt
    where = np.array([[[0.0, 0.0], [0.3, 0.1], [0.2, -0.4]]])            # [episodes, steps, 2]
    for kind, goal in (("direction", np.array([0.6, -0.8])), ("path", np.array([-2.0, 1.5]))):
        fig, ax = plt.subplots()
        marks = evaluate.draw_goal(ax, kind, goal, where[0, 0], length=5.0)
        evaluate.frame_panel(ax, kind, where, marks)
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        far = marks[-1]                                                  # the arrow's tip, or the goal
        assert x0 < far[0] < x1 and y0 < far[1] < y1, (kind, far, (x0, x1, y0, y1))
        plt.close(fig)


# ----------------------------------------------------------------------------- experts, noise histories, blind control

def _saved_expert(directory, env="point_goal", hidden=16, seed=0):
    """An untrained task-conditioned expert, saved as expert.py saves one: enough for the plumbing."""
    vec = experts.TaskVisibleVecEnv(env, 1)
    torch.manual_seed(seed)
    model = experts.Expert(env, vec.vec.obs_dim, vec.task_dim, vec.act_dim, hidden).eval()
    experts.save(model, {"env": env}, str(directory))
    return str(directory)


def test_task_visible_envs_show_the_task_they_reward_and_draw_new_ones():
    """obs = [position, task]; point_goal's reward -||s - g|| is for the task shown; every reset draws new
    tasks from the task distribution (the goal on the upper unit half-circle)."""
    vec = experts.TaskVisibleVecEnv("point_goal", 3, seed=0)
    first = vec.reset()
    assert first.shape == (1, 3, 4) and vec.obs_dim == 4
    goal = first[0, :, 2:]
    np.testing.assert_allclose(np.linalg.norm(goal, axis=-1), 1, rtol=1e-5)
    assert (goal[:, 1] >= 0).all()
    action = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]]], np.float32)
    obs, rew, _ = vec.step(action)
    np.testing.assert_allclose(obs[0, :, :2], 0.1 * action[0], rtol=1e-6)
    np.testing.assert_allclose(rew[0], -np.linalg.norm(0.1 * action[0] - goal, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(obs[0, :, 2:], goal)                   # the task stays for the episode
    assert not np.allclose(vec.reset()[0, :, 2:], goal)                  # and is drawn anew at the reset


def test_the_pusher_expert_sees_the_cylinder_where_it_is_now(monkeypatch):
    """A task says where Pusher's cylinder starts; once pushed, the expert must see where it went (told
    another task: moved as far from that task's start). Every other env shows the task unchanged. The
    training envs, the scoring and noise.py all show the expert this view, not the bare task."""
    task = np.array([0.1, -0.2, 0.05, 0.1], np.float32)
    vec = envs.MultiTaskVecEnv("pusher_goal", task[None], 1)
    vec.reset()
    env = vec.envs[0][0]
    np.testing.assert_allclose(env.expert_view(task), task, atol=1e-7)
    qpos, qvel = env.data.qpos.copy(), env.data.qvel.copy()
    qpos[-4:-2] += (-0.02, 0.05)                                         # the XML's slides: y, then x
    env.set_state(qpos, qvel)
    np.testing.assert_allclose(env.expert_view(task), [0.15, -0.22, 0.05, 0.1], atol=1e-6)
    np.testing.assert_allclose(env.get_body_com("object")[:2] - env.get_body_com("goal")[:2],
                               [0.15 - 0.05, -0.22 - 0.1], atol=1e-6)    # the view is where the body is
    other = np.zeros(4, np.float32)
    np.testing.assert_allclose(vec.expert_views(other[None, None])[0, 0], [0.05, -0.02, 0, 0], atol=1e-6)
    reacher = envs.make_env("reacher_goal", np.array([0.1, 0.1], np.float32), seed=0)
    reacher.reset()
    assert reacher.expert_view(other) is other

    # every path must show the expert the view, not the task: a view that differs from the task tells them apart
    monkeypatch.setattr(envs.MultiTaskVecEnv, "expert_views", lambda self, told: told + 1)
    training = experts.TaskVisibleVecEnv("pusher_goal", 2, seed=0)
    obs = training.reset()
    drawn = np.stack([row[0].task for row in training.vec.envs])
    np.testing.assert_allclose(obs[0, :, -4:], drawn + 1)

    seen = []
    def spy(obs, shown):                                                 # an expert that records its inputs
        seen.append(np.array(shown))
        return torch.zeros(*np.shape(obs)[:-1], 7)
    spy.config = {"env": "pusher_goal"}
    experts.expert_returns(spy, task[None], n_envs=1)
    noise.noise_histories(spy, "pusher_goal", task[None], [0], np.zeros(1), 1, "expert", 0.1, 0)
    assert len(seen) == 2 * vec.horizon
    for shown in seen:
        np.testing.assert_array_equal(np.reshape(shown, 4), task + 1)


def test_expert_learns_from_seeing_the_task(tmp_path):
    """A short expert.py run on point_goal: on test tasks it must beat what it gets when told only the
    mean goal (about -14.6) by far: the task it sees is what it acts on. It ships small and loads with
    weights_only, and a checkpoint of the wrong env or kind is refused in one line."""
    out = tmp_path / "expert"
    experts.main(["--env", "point_goal", "--steps", "4000", "--test-tasks", "4", "--threads", "1", "--device", "cpu",
                  "--out", str(out)])
    info = json.loads((out / "expert.json").read_text())
    assert info["test_return"] > -8 and info["told_mean_task_return"] < -12, info
    assert (out / "expert.pt").stat().st_size < 2_000_000
    model = experts.load_expert(str(out), env="point_goal")
    tasks = envs.sample_tasks("point_goal", 4, "test")
    np.testing.assert_allclose(experts.expert_returns(model, tasks).mean(), info["test_return"], rtol=1e-5)
    with pytest.raises(ValueError, match="an expert for point_goal, not reacher_goal"):
        experts.load_expert(str(out), env="reacher_goal")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not an expert written by expert.py"):
        experts.load_expert(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError, match="python expert.py --env ant_dir"):
        experts.load_expert(str(tmp_path / "none"), env="ant_dir")


def _expert_run(out, *extra):
    """A tiny expert.py run: 5 Reacher episodes of 4 envs (50 vector steps each), the first 2 of them warm-up,
    then one update a step of 32-unit nets. Reacher's resets draw from each env's np_random, point_goal's do not."""
    experts.main(["--env", "reacher_goal", "--steps", "1000", "--n-envs", "4", "--warmup", "400", "--hidden", "32",
                  "--batch-size", "32", "--gradient-steps", "1", "--test-tasks", "2", "--threads", "1", "--device",
                  "cpu", "--out", str(out), *extra])


def _killed_expert_run(out, monkeypatch, kill_at, *extra):
    """_expert_run with a resume file at every episode's end, killed at the kill_at-th one before it is written."""
    save_resume, calls = experts.save_resume, []

    def save_or_die(*args):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        save_resume(*args)
    monkeypatch.setattr(experts, "save_resume", save_or_die)
    with pytest.raises(KeyboardInterrupt):
        _expert_run(out, "--checkpoint-every", "0", *extra)
    monkeypatch.setattr(experts, "save_resume", save_resume)


def test_a_killed_expert_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed in the warm-up (so resumed from its first episode's end), then past it (resumed from its third),
    the run ends with the actor and training curve of an unbroken one: the resume file carries the networks,
    Adam's moments, every random stream (the agent's, the task draws', each env's) and the buffer. A finished
    run leaves none behind."""
    _expert_run(tmp_path / "whole")
    _killed_expert_run(tmp_path / "run", monkeypatch, 2)
    _killed_expert_run(tmp_path / "run", monkeypatch, 3, "--resume")
    assert torch.load(tmp_path / "run" / "resume.pt", weights_only=True)["t"] == 150  # past the 100-step warm-up
    _expert_run(tmp_path / "run", "--resume")
    whole, resumed = (experts.load_expert(str(tmp_path / out)).actor.state_dict() for out in ("whole", "run"))
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    info = [json.loads((tmp_path / out / "expert.json").read_text()) for out in ("whole", "run")]
    assert info[0]["train_return_last10pct"] == info[1]["train_return_last10pct"]
    assert not (tmp_path / "run" / "resume.pt").exists() and not (tmp_path / "whole" / "resume.pt").exists()


def test_expert_resume_refuses_other_settings_and_a_silent_restart(tmp_path, monkeypatch):
    def error_of(*extra):
        with pytest.raises(SystemExit) as e:
            _expert_run(tmp_path, *extra)
        return str(e.value.code)
    assert "--resume: no" in error_of("--resume")
    _killed_expert_run(tmp_path, monkeypatch, 2)
    assert "pass --resume to continue it, or another --out" in error_of()
    assert "lr=0.001, this run has 0.002: resume with its --lr" in error_of("--resume", "--lr", "2e-3")
    assert "--n-envs" in error_of("--resume", "--n-envs", "2")


@pytest.mark.parametrize("n, clean, noisy", [(10, 0.2, 8), (40, 0.2, 32), (5, 0.0, 4), (1, 0.2, 0), (10, 1.0, 0)])
def test_epsilon_schedule_starts_at_one_and_ends_at_zero(n, clean, noisy):
    eps = noise.epsilon_schedule(n, clean=clean, power=1.5)
    assert len(eps) == n and eps[-1] == 0 and (eps[noisy:] == 0).all()
    if noisy:
        assert eps[0] == 1 and (eps[:noisy] > 0).all() and (np.diff(eps) <= 0).all()
        np.testing.assert_allclose(eps[1], (1 - 1 / noisy) ** 1.5, rtol=1e-6)


def test_epsilon_schedule_clean_first_puts_noise_free_episodes_before_the_schedule():
    eps = noise.epsilon_schedule(6, clean=0.25, clean_first=2)
    np.testing.assert_array_equal(eps, np.concatenate([np.zeros(2), noise.epsilon_schedule(4, clean=0.25)]))
    assert eps[2] == 1 and eps[-1] == 0


def _noise(tmp_path, expert_dir, out, *extra):
    noise.main(["--env", "point_goal", "--expert", expert_dir, "--tasks", "3", "--streams", "2", "--episodes", "6",
                "--out", str(out), *extra])
    return [envs.load_history(envs.history_path(str(out), i)) for i in range(3)]


def test_noise_histories_mix_the_expert_with_annealed_noise(tmp_path):
    """Every action is (1 - eps) a* + eps u with |u| <= 1; the target is the expert's action (relabelled) or
    the behaviour's mean and std; the files pass load_history; a task's history does not depend on how
    many tasks are rolled out together; a re-run resumes, and other settings in the same --out are refused."""
    expert_dir = _saved_expert(tmp_path / "expert")
    model = experts.load_expert(expert_dir)
    eps = noise.epsilon_schedule(6)[None, :, None, None]
    relabelled = _noise(tmp_path, expert_dir, tmp_path / "rel")
    behaviour = _noise(tmp_path, expert_dir, tmp_path / "beh", "--target", "behaviour")
    for h_rel, h_beh in zip(relabelled, behaviour):
        assert h_rel["algo"] == "noise" and h_rel["obs"].shape == (2, 6, 20, 2)
        best = model(h_rel["obs"], np.broadcast_to(h_rel["task"], (2, 6, 20, 2)).copy()).numpy()
        np.testing.assert_allclose(h_rel["act_mean"], best, atol=1e-6)
        np.testing.assert_allclose(h_rel["act_std"], 0.05)
        u = (h_rel["act"] - (1 - eps) * best)[:, :5] / eps[:, :5]       # the noise of the 5 noisy episodes
        assert np.abs(u).max() <= 1 + 1e-4 and np.abs(u).max() > 0.9
        np.testing.assert_allclose(h_rel["act"][:, 5], best[:, 5], atol=1e-6)       # the clean one
        np.testing.assert_array_equal(h_rel["act"], h_beh["act"])        # the same behaviour, other targets
        np.testing.assert_allclose(h_beh["act_mean"], (1 - eps) * best, atol=1e-6)
        np.testing.assert_allclose(h_beh["act_std"], np.broadcast_to(np.maximum(eps / np.sqrt(3), 0.05),
                                                                      h_beh["act"].shape), rtol=1e-6)
    one_by_one = _noise(tmp_path, expert_dir, tmp_path / "one", "--parallel", "1")
    for a, b in zip(relabelled, one_by_one):
        np.testing.assert_array_equal(a["act"], b["act"])
    stamp = os.path.getmtime(envs.history_path(str(tmp_path / "rel"), 0))
    _noise(tmp_path, expert_dir, tmp_path / "rel")                       # nothing left to do
    settings_path = tmp_path / "rel" / "noise.json"                      # as written before --wrong-near
    settings = json.load(open(settings_path))
    del settings["wrong_near"]
    settings_path.write_text(json.dumps(settings))
    _noise(tmp_path, expert_dir, tmp_path / "rel")                       # read as its default: resumes
    assert os.path.getmtime(envs.history_path(str(tmp_path / "rel"), 0)) == stamp
    with pytest.raises(SystemExit, match="other settings \\(target\\)"):
        _noise(tmp_path, expert_dir, tmp_path / "rel", "--target", "behaviour")


def test_wrong_task_episodes_act_for_another_task_but_keep_the_true_target(tmp_path):
    """--wrong-task 1: every noisy episode's actions come from the expert shown another task (so they differ
    from the true task's mix), while the relabelled target is still the true task's a*; the noise-free
    episode acts for the true task; 0 reproduces the published AD-eps histories bit for bit."""
    expert_dir = _saved_expert(tmp_path / "expert")
    model = experts.load_expert(expert_dir)
    eps = noise.epsilon_schedule(6)[None, :, None, None]
    plain = _noise(tmp_path, expert_dir, tmp_path / "plain")
    zero = _noise(tmp_path, expert_dir, tmp_path / "zero", "--wrong-task", "0")
    wrong = _noise(tmp_path, expert_dir, tmp_path / "wrong", "--wrong-task", "1")
    for h_plain, h_zero, h in zip(plain, zero, wrong):
        np.testing.assert_array_equal(h_plain["act"], h_zero["act"])
        best = model(h["obs"], np.broadcast_to(h["task"], (2, 6, 20, 2)).copy()).numpy()
        np.testing.assert_allclose(h["act_mean"], best, atol=1e-6)
        np.testing.assert_allclose(h["act"][:, 5], best[:, 5], atol=1e-6)
        u = (h["act"] - (1 - eps) * best)[:, 1:5] / eps[:, 1:5]          # not the noise alone any more
        assert np.abs(u).max() > 1.05
    with pytest.raises(SystemExit, match="--wrong-task 1.5 must be in"):
        noise.parse_args(["--wrong-task", "1.5"])


def test_near_miss_wrong_tasks_sit_closer_to_the_true_task():
    """--wrong-near K: a wrong task is the nearest of k draws (k in 1..K), so wrong tasks sit closer to the
    true one than plain draws while staying the env's tasks; K = 1 is the plain draw, as before the flag
    (the histories made earlier are made again); a noise-free episode shows the truth; and the flag
    without wrong-task episodes is refused."""
    tasks = envs.sample_tasks("half_cheetah_vel", 20, "train", seed=0)

    def shown(near, epsilon=0.5):
        rngs = [np.random.default_rng([0, i]) for i in range(20)]
        return noise.shown_tasks("half_cheetah_vel", np.repeat(tasks[:, None], 50, 1), epsilon, 1.0, rngs, near)

    plain, near = shown(1), shown(8)
    expected = np.zeros_like(plain)
    for i in range(20):
        rng = np.random.default_rng([0, i])
        rng.random(50)                                    # which streams go wrong: all, at probability 1
        expected[i] = [envs.env_settings("half_cheetah_vel").sample_task(rng) for _ in range(50)]
    np.testing.assert_array_equal(plain, expected)
    gap = lambda s: np.abs(s[..., 0] - tasks[:, None, 0])
    assert np.median(gap(near)) < 0.5 * np.median(gap(plain))
    assert (near >= 0).all() and (near <= 3).all() and (gap(near) > 0).all()
    np.testing.assert_array_equal(shown(8, epsilon=0.0), np.repeat(tasks[:, None], 50, 1))
    with pytest.raises(SystemExit, match="--wrong-near 4 needs wrong-task episodes"):
        noise.parse_args(["--wrong-near", "4"])


def test_pusher_posterior_finds_the_task_from_rewards_alone(tmp_path):
    """The searcher's guess comes from the rewards: one episode of the expert shown the mean task puts its
    guess of the cylinder's start within 2 cm of the truth; the same tip path scored by another task's
    rewards moves the guess to that task; it never guesses a goal the prior rules out. Its histories
    (--eps-start 0.3 --target shown) mix its clean action, the target, with that much noise; with
    --wrong-task 1 the noisy episode's behaviour is steered by another task while the target stays the
    searcher's action for its guess; and --shown posterior is refused where it does not apply."""
    model = experts.load_expert(os.path.join("checkpoints", "experts", "pusher_goal"), env="pusher_goal")
    tasks = envs.sample_tasks("pusher_goal", 2, "test", seed=0)
    env, other = (envs.make_env("pusher_goal", task, seed=0) for task in tasks)
    searcher, fooled = noise.PusherPosterior(), noise.PusherPosterior()
    np.testing.assert_allclose(searcher.guess(), experts.mean_task("pusher_goal"), atol=1e-6)
    obs, _ = env.reset()
    other.reset()
    for _ in range(env.horizon):
        act = model(obs, env.expert_view(noise.PusherPosterior.mean_task)).numpy()
        obs, reward, *_ = env.step(act)
        qpos = env.data.qpos.copy()                                       # the same arm, another task's rewards
        qpos[-4:] = tasks[1][[1, 0, 3, 2]]
        other.set_state(qpos, env.data.qvel.copy())
        searcher.record(obs, reward, env.ctrl_cost_of(act), env.cylinder_moved())
        if np.allclose(env.cylinder_moved(), 0):
            fooled.record(obs, other._reward(env.ctrl(act), None), env.ctrl_cost_of(act), np.zeros(2))
    for guesser, task in ((searcher, tasks[0]), (fooled, tasks[1])):
        guess = guesser.guess()
        assert np.linalg.norm(guess[:2] - task[:2]) < 0.02, (guess, task)
        assert np.linalg.norm(guess[2:] - guess[:2]) > envs.PUSHER_MIN_GAP
    out = str(tmp_path / "post")                                         # the histories: the searcher's own
    noise.main(["--env", "pusher_goal", "--tasks", "1", "--streams", "1", "--episodes", "2", "--clean", "0",
                "--shown", "posterior", "--eps-start", "0.3", "--target", "shown", "--out", out])
    h = envs.load_history(envs.history_path(out, 0))
    assert json.load(open(os.path.join(out, "noise.json")))["eps"] == pytest.approx([0.3, 0.0])  # the last: clean
    u = (h["act"][0, 0] - 0.7 * h["act_mean"][0, 0]) / 0.3                # the target is its clean action
    assert np.abs(u).max() <= 1 + 1e-4 and np.abs(u).max() > 0.9
    told_truth = model(h["obs"][0, 0, :5], np.broadcast_to(h["task"], (5, 4)).copy()).numpy()
    assert np.abs(h["act_mean"][0, 0, :5] - told_truth).max() > 0.1      # shown the mean task, not the truth
    noise.main(["--env", "pusher_goal", "--tasks", "1", "--streams", "1", "--episodes", "2", "--clean", "0",
                "--shown", "posterior", "--eps-start", "0.3", "--target", "shown", "--wrong-task", "1",
                "--out", out + "_wrong"])
    wrong = envs.load_history(envs.history_path(out + "_wrong", 0))
    guessed = np.broadcast_to(noise.PusherPosterior.mean_task, (50, 4)).copy()  # episode 1's guess, while the
    np.testing.assert_allclose(wrong["act_mean"][0, 0, :50], model(wrong["obs"][0, 0, :50], guessed).numpy(),
                               atol=1e-6)                                # cylinder still stands (views it)
    assert np.abs((wrong["act"][0, 0] - 0.7 * wrong["act_mean"][0, 0]) / 0.3).max() > 1.2  # steered elsewhere
    with pytest.raises(SystemExit, match="--shown posterior is pusher_goal's searcher"):
        noise.parse_args(["--env", "reacher_goal", "--shown", "posterior"])
    with pytest.raises(SystemExit, match="--eps-start 0.0 must be in"):
        noise.parse_args(["--eps-start", "0"])


def test_ad_on_noise_histories_is_scored_against_the_expert(tmp_path):
    """ad.py trains on noise.py's files and keeps noise.json, and refuses those of the test tasks; evaluate.py's
    1 is then the expert's own return on the same test tasks, and it reports the expert told the mean task
    and the blind control."""
    expert_dir = _saved_expert(tmp_path / "expert")
    _noise(tmp_path, expert_dir, tmp_path / "test_data", "--split", "test")
    with pytest.raises(ad.DataError, match="histories of the test tasks"):
        ad.prepare(_ad_args(tmp_path, tmp_path / "test_data"))
    _noise(tmp_path, expert_dir, tmp_path / "data")
    ad.train(_ad_args(tmp_path, tmp_path / "data", "--epochs", "2"))
    _, ckpt = ad.load_checkpoint(str(tmp_path / "run"))
    assert ckpt["meta"]["noise"]["target"] == "expert" and ckpt["meta"]["algo"] == "noise"
    evaluate.main([str(tmp_path / "run"), "--tasks", "3", "--seeds", "2", "--episodes", "3", "--device", "cpu"])
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    s, tasks = result["summary"], envs.sample_tasks("point_goal", 3, "test")
    model = experts.load_expert(expert_dir)
    assert s["source_final"] == pytest.approx(experts.expert_returns(model, tasks, n_envs=2).mean())
    told = experts.expert_returns(model, tasks, n_envs=2, told=experts.mean_task("point_goal"))
    np.testing.assert_allclose(s["told_mean_task_per_task"], told)
    assert "expert, noise-free, on these test tasks" in s["source_final_from"]
    assert np.asarray(result["blind_returns"]).shape == (3, 2, 3)
    assert "reward-blind score" in (tmp_path / "run" / "scores.md").read_text()


def test_player_checkpoints_play_their_own_streams_in_context(tmp_path):
    """noise.py --player RUN0 RUN1 (DAgger): the played streams are dealt to the players in turn; each played
    stream's actions are its player's own mean actions, noise-free, with that stream as its context
    (replaying the stored stream through that model gives them back); the other streams are the expert's
    noisy ones as before; every target stays the expert's; and a checkpoint of another env, --player-streams
    without --player, beyond --streams or short of one stream a player, and a player trained on its own
    actions are refused."""
    expert_dir = _saved_expert(tmp_path / "expert")
    data = _noise(tmp_path, expert_dir, tmp_path / "data", "--streams", "3")
    runs = [str(tmp_path / "run"), str(tmp_path / "run2")]
    for run, epochs in zip(runs, ("2", "1")):
        ad.train(_ad_args(tmp_path, tmp_path / "data", "--epochs", epochs, "--out", run))
    played = _noise(tmp_path, expert_dir, tmp_path / "played", "--streams", "3", "--player", *runs,
                    "--player-streams", "2")
    expert = experts.load_expert(expert_dir)
    players = [ad.load_checkpoint(run) for run in runs]
    for h_expert, h in zip(data, played):
        np.testing.assert_allclose(h["act"][0], h_expert["act"][0], atol=1e-6)      # stream 0: the expert's
        best = expert(h["obs"], np.broadcast_to(h["task"], (3, 6, 20, 2)).copy()).numpy()
        np.testing.assert_allclose(h["act_mean"], best, atol=1e-6)
        for stream, (model, ckpt) in zip((1, 2), players):
            tokens = ad.stream_tokens(*(torch.as_tensor(h[key][stream]) for key in ("obs", "act", "rew")),
                                      ckpt["meta"]["stats"])
            with torch.no_grad():
                replayed = ad.choose_action(model(tokens[None])[0], "nll", "mean").numpy()
            np.testing.assert_allclose(h["act"][stream].reshape(-1, 2), replayed, atol=1e-5)
            assert np.abs(h["act"][stream] - h_expert["act"][stream]).max() > 0.1
        assert np.abs(h["act"][1] - h["act"][2]).max() > 1e-3                      # two players, two paths
    settings = json.load(open(tmp_path / "played" / "noise.json"))
    assert settings["player"] == runs and settings["player_streams"] == 2
    with pytest.raises(ValueError, match="acts in point_goal"):
        noise.load_player(runs[0], "reacher_goal")
    for argv, message in ((["--player-streams", "1"], "needs --player"),
                          (["--player", runs[0], "--player-streams", "6"], "must be in \\[0, --streams 5\\]"),
                          (["--player", *runs, "--player-streams", "1"], "without a stream"),
                          (["--player", runs[0], "--target", "behaviour"], "its own actions")):
        with pytest.raises(SystemExit, match=message):
            noise.parse_args(argv)


@pytest.mark.parametrize("arch, window", [("mamba", None), ("transformer", 30), ("hybrid", None)])
def test_blind_rollout_zeroes_every_reward_input(arch, window):
    """The reward-blind control: every token the model sees, including those a windowed rollout replays into
    a fresh state, has 0 in its reward slot; the ordinary rollout does not (a test that fails if any path
    still carries the reward)."""
    d_in, d_out = ad.model_io(2, 2, "nll")
    sizes = dict(d_model=8, n_layer=1, d_state=4, n_head=2, d_ff=16, segment=5, attn_layers=1)
    torch.manual_seed(0)
    model = ad.build_model(ad.arch_config(arch, sizes, d_in, d_out, max_len=window or 100, obs_dim=2)).eval()
    stats = {"obs_mean": torch.zeros(2), "obs_std": torch.ones(2), "rew_mean": torch.tensor(-1.0),
             "rew_std": torch.tensor(0.5)}
    meta = {"env": "point_goal", "stats": stats, "loss": "nll"}
    seen, step = [], model.step

    def recording_step(x, state):
        seen.append(x[:, 2 + 2].clone())
        return step(x, state)
    model.step = recording_step
    tasks = envs.sample_tasks("point_goal", 2, "test")
    for blind in (True, False):
        seen.clear()
        ad.rollout(model, meta, tasks, 3, n_seeds=2, action_mode="sample", window=window, blind=blind)
        rewards = torch.cat(seen)
        assert len(seen) >= 60 + (30 if window else 0)                    # a windowed rollout re-primed
        assert (rewards == 0).all() if blind else (rewards != 0).float().mean() > 0.9


# ----------------------------------------------------------------------------- Decision Mamba-Hybrid
def _tiny_hybrid(segment=5):
    torch.manual_seed(0)
    return hybrid.Hybrid(5, 3, 16, 2, 2, segment, d_goal=2, d_state=4, n_head=2, d_ff=32).eval()


def test_hybrid_step_reproduces_forward_across_segments():
    """23 tokens = 4 segments of 5 and a partial one: each step equals forward; the local cache restarts every
    segment, so the state's size never grows."""
    model, x = _tiny_hybrid(), torch.randn(2, 23, 5)
    with torch.no_grad():
        state, steps = model.init_state(2), []
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state)
            steps.append(y)
            assert state["local"]["length"] == t % 5 + 2           # z and the segment's tokens so far
        torch.testing.assert_close(torch.stack(steps, 1), model(x), rtol=1e-5, atol=1e-6)
    assert state["local"]["k"][0].shape[2] == 6                    # at most c + 1 tokens, ever


def test_hybrid_is_causal_and_recalls_earlier_segments():
    """Changing token 11 (segment 2) changes no earlier output, and changes the later segments' outputs
    although their local context never holds token 11: the sub-goal z carries it (Mamba's recall)."""
    model, x = _tiny_hybrid(), torch.randn(2, 23, 5)
    changed = x.clone()
    changed[:, 11] += 1.0
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(after[:, :11], before[:, :11], rtol=0, atol=0)
    assert (after[:, 11] - before[:, 11]).abs().max() > 1e-3
    assert (after[:, 15:] - before[:, 15:]).abs().max() > 1e-5


def test_valuable_subgoal_steps_by_hand():
    """(r_t + .. + r_t') / (t' - t) on the episode's rewards shifted to a minimum of 0, maximised over t' > t;
    the last step keeps itself; ties go to the nearest. [1, 0, 3, -1] -> [2, 1, 4, 0]: t=0: 3, 7/2, 7/3 -> 2;
    t=1: 5, 5/2 -> 2; t=2: 4 -> 3. [-1, -1, -1, 0] -> [0, 0, 0, 1]: only the last step is worth anything -> 3.
    [0, 1, 0, 1]: t=0: 1, 1/2, 2/3 -> 1; t=1: 1, 2/2 -> 2 (tie, nearest)."""
    rew = torch.tensor([[[1., 0, 3, -1], [-1, -1, -1, 0]], [[0, 1, 0, 1], [0, 0, 0, 0]]])
    expected = [[[2, 2, 3, 3], [3, 3, 3, 3]], [[1, 2, 3, 3], [1, 2, 3, 3]]]
    assert hybrid.valuable_subgoal_steps(rew).tolist() == expected


def test_valuable_subgoals_on_negative_rewards_do_not_favour_the_last_state():
    """On all-negative rewards (this project's -distance) the raw rule favours far states (on these, a third
    of its picks would be the episode's last state); on rewards shifted to >= 0 within the episode the
    picks stay near, and adding a constant to an episode's rewards changes none of them."""
    generator = torch.Generator().manual_seed(0)
    rew = -2 * torch.rand(500, 20, generator=generator)
    picks = hybrid.valuable_subgoal_steps(rew)
    assert (picks[:, :-2] == 19).float().mean() < 0.1                 # steps with a choice beyond the next
    assert ((picks - torch.arange(20)).float()[:, :-1].mean()) < 4
    offsets = 10 * torch.randn(500, 1, generator=generator)
    assert torch.equal(hybrid.valuable_subgoal_steps(rew + offsets), picks)


def test_streams_carry_each_steps_valuable_subgoal():
    """ad.build_streams(subgoals=True): the standardised observation of the chosen step of the same episode."""
    obs = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4, 1)                # obs = global step
    rew = np.array([[[[1., 0, 3, -1], [-1, -1, -1, 0]]]], np.float32)
    data = {"obs": obs, "act": 0 * obs, "rew": rew, "act_mean": 0 * obs, "act_std": 0 * obs}
    stats = {"obs_mean": torch.ones(1), "obs_std": 2 * torch.ones(1), "rew_mean": torch.tensor(0.),
             "rew_std": torch.tensor(1.)}
    _, targets = ad.build_streams(data, stats, subgoals=True)
    expected = (np.array([2, 2, 3, 3, 7, 7, 7, 7]) - 1) / 2
    np.testing.assert_allclose(targets["subgoal"][0, 0, :, 0].numpy(), expected)
    assert "subgoal" not in ad.build_streams(data, stats)[1]


def test_match_params_for_the_hybrid():
    """--params matches DM-H by its shared width (a multiple of n_head); the frozen sub-goal layer is no
    parameter, so the count is what the optimiser trains."""
    config = ad.arch_config("hybrid", dict(d_model=8, n_layer=2, attn_layers=2, n_head=4, d_ff=168, segment=5,
                                           d_state=16), d_in=6, d_out=4, max_len=200, obs_dim=2)
    matched = ad.match_params(config, 98884)
    gaps = {w: abs(ad.count_params({**config, "d_model": w}) - 98884) for w in range(4, 200, 4)}
    assert matched["d_model"] % 4 == 0 and gaps[matched["d_model"]] == min(gaps.values())
    model = ad.build_model(matched)
    assert ad.count_params(matched) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "goal_weight" in model.state_dict()


def test_ad_trains_and_evaluates_a_hybrid(tmp_path):
    """ad.py --arch hybrid end to end, with and without valuable sub-goals: the loss averages the two passes,
    the frozen layer stays as it was, the checkpoint loads with weights_only=True, evaluate.py rolls it out."""
    _write_point_histories(tmp_path / "data")
    common = ("--arch", "hybrid", "--segment", "3", "--attn-layers", "1", "--n-head", "2", "--d-ff", "16",
              "--epochs", "3", "--eval-every", "3")
    args = _ad_args(tmp_path, tmp_path / "data", *common)
    train_set, _, config, _ = ad.prepare(args)
    assert config["valuable_subgoals"] and train_set[1]["subgoal"].shape == (*train_set[0].shape[:2], 2)
    torch.manual_seed(0)  # unseeded, the model (and the check below) would depend on the tests run before
    model = ad.build_model(config)
    tokens, targets = train_set
    both = ad.training_loss(model, tokens, targets, "nll")
    plain = ad.action_loss(model(tokens), targets, "nll")
    guided = ad.action_loss(model(tokens, subgoals=targets["subgoal"]), targets, "nll")
    torch.testing.assert_close(both, 0.5 * (plain + guided))
    assert (guided - plain).abs() > 1e-4

    ad.train(args)
    ablation = _ad_args(tmp_path, tmp_path / "data", *common, "--no-valuable-subgoals", "--out", str(tmp_path / "abl"))
    assert "subgoal" not in ad.prepare(ablation)[0][1]
    ad.train(ablation)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["arch"] == "hybrid" and ckpt["model_config"]["segment"] == 3
    trained, _ = ad.load_checkpoint(str(tmp_path / "run"), arch="hybrid")
    torch.manual_seed(0)                          # ad.train builds its model right after seeding with --seed
    fresh = ad.build_model(ckpt["model_config"])
    torch.testing.assert_close(trained.goal_weight, fresh.goal_weight, rtol=0, atol=0)   # frozen
    assert not torch.equal(trained.transformer.embed.weight, fresh.transformer.embed.weight)  # trained
    assert not torch.load(tmp_path / "abl" / "ckpt.pt", weights_only=True)["model_config"]["valuable_subgoals"]
    evaluate.main([str(tmp_path / "run"), str(tmp_path / "abl"), "--tasks", "2", "--seeds", "1", "--episodes", "4",
                   "--device", "cpu", "--out", str(tmp_path / "eval")])  # same seed: two groups, not two seeds
    results = json.load(open(tmp_path / "eval" / "eval.json"))
    assert [r["arch"] for r in results] == ["hybrid", "hybrid"]
    assert np.asarray(results[0]["returns"]).shape == (2, 1, 4)
    assert "no valuable sub-goals" in (tmp_path / "eval" / "scores.md").read_text()


# ----------------------------------------------------------------------------- MQL

def _mql_args(**overrides):
    args = mql.parse_args(["--env", "point_goal", "--hidden", "16", "--context-hidden", "4", "--history", "3",
                           "--device", "cpu"])
    args.device = "cpu"
    vars(args).update(overrides)
    return args


def test_mql_propensity_weights_on_separable_data():
    """Two streams with opposite new tasks: replay points unlike the new task get weight 0, points like it
    the clipped maximum exp(beta_clip); a half-half replay batch has ESS 1/2, hence lambda = 1/2."""
    torch.manual_seed(0)
    left, right = torch.randn(60, 2) * 0.3 - torch.tensor([2.0, 0]), torch.randn(60, 2) * 0.3 + torch.tensor([2.0, 0])
    w, b = mql.fit_logistic(torch.stack([right, left]), torch.stack([left, right]), C=0.5)
    replay = torch.cat([torch.randn(40, 2) * 0.3 - torch.tensor([2.0, 0]), torch.randn(40, 2) * 0.3 + torch.tensor([2.0, 0])])
    beta = mql.propensity(replay.expand(2, -1, -1), w, b, beta_clip=1.0)
    assert (beta[0, :40] == 0).all() and (beta[1, 40:] == 0).all()  # unlike the stream's new task
    torch.testing.assert_close(beta[0, 40:], torch.full((40,), math.e))  # like it: clipped at exp(1)
    torch.testing.assert_close(beta[1, :40], torch.full((40,), math.e))
    torch.testing.assert_close(mql.effective_sample_size(beta), torch.tensor([0.5, 0.5]))
    unclipped = mql.propensity(replay.expand(2, -1, -1), w, b, beta_clip=50.0)
    assert unclipped[0, 40:].min() > 10  # the odds p(new|x) / p(replay|x) of a clearly separable point
    assert mql.effective_sample_size(torch.ones(1, 8)).item() == pytest.approx(1.0)


def test_mql_context_window_is_zero_padded_inside_the_episode():
    buf = rl.HistoryBuffer(1, 1, 8, 4, 1, 1, "cpu")
    for t in range(8):  # obs = t, act = -t, rew = 10 t
        buf.add(torch.full((1, 1, 1), float(t)), torch.full((1, 1, 1), -float(t)), torch.full((1, 1), 10.0 * t),
                torch.full((1, 1, 1), t + 1.0), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
    obs, act, rew, next_obs, context, next_context = mql.transitions(
        buf, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.tensor([4, 6]), history=3)
    assert (context[0] == 0).all()  # step 4 starts the second episode: nothing before it counts
    torch.testing.assert_close(next_context[0], torch.tensor([[0.0, 0, 0], [0, 0, 0], [4, -4, 40]]))
    torch.testing.assert_close(context[1], torch.tensor([[0.0, 0, 0], [4, -4, 40], [5, -5, 50]]))
    torch.testing.assert_close(next_context[1], torch.tensor([[4.0, -4, 40], [5, -5, 50], [6, -6, 60]]))
    assert next_obs[1].item() == 7 and rew[1].item() == 60


def test_td3_target_policy_smoothing_clips_the_noise_and_the_action():
    torch.manual_seed(0)
    agent = mql.TD3(3, 2, 2, _mql_args(policy_noise=1e6, noise_clip=0.5))  # noise far beyond its clip
    state = torch.randn(3, 500, 2 + 4) * 3
    clean = agent.actor_target(state).detach()
    smoothed = agent.target_action(state)
    noise = smoothed - clean
    assert smoothed.abs().max() <= 1 and noise.abs().max() <= 0.5 + 1e-6
    inside = clean.abs() < 0.5  # there the action bounds cannot bite: the noise is exactly +-clip
    torch.testing.assert_close(noise[inside].abs(), torch.full_like(noise[inside], 0.5))
    assert 0.3 < (noise[inside] > 0).float().mean() < 0.7  # both signs
    gentle = mql.TD3(1, 2, 2, _mql_args(policy_noise=0.01, noise_clip=0.5))
    d = gentle.target_action(state[:1]) - gentle.actor_target(state[:1])
    assert 0 < d.abs().max() < 0.1


def test_td3_updates_the_actor_and_targets_only_every_dth_step():
    torch.manual_seed(0)
    agent = mql.TD3(1, 2, 2, _mql_args(policy_freq=3, batch_size=8))
    buf = rl.HistoryBuffer(2, 1, 8, 4, 2, 2, "cpu")
    for _ in range(8):
        mql.add(buf, torch.randn(2, 1, 2), torch.rand(2, 1, 2) * 2 - 1, torch.randn(2, 1), torch.randn(2, 1, 2))

    def flat(net):
        return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()
    changed = []
    for _ in range(7):
        before = [flat(n) for n in (agent.actor, agent.critic, agent.encoder, agent.actor_target, agent.critic_target)]
        agent.update(mql.sample(buf, 1, 8, history=3))
        after = [flat(n) for n in (agent.actor, agent.critic, agent.encoder, agent.actor_target, agent.critic_target)]
        changed.append([not torch.equal(x, y) for x, y in zip(before, after)])
    assert [c[0] for c in changed] == [True, False, False, True, False, False, True]  # actor: updates 0, 3, 6
    assert all(c[1] and c[2] for c in changed)                                        # critic and GRU: always
    assert [c[3] for c in changed] == [c[0] for c in changed] == [c[4] for c in changed]  # targets with the actor


def test_mql_adaptation_moves_each_copy_from_theta_meta():
    torch.manual_seed(0)
    args = _mql_args(batch_size=8, snap_updates=2, replay_updates=2, sample_mult=1)
    meta = mql.TD3(1, 2, 2, args)
    replay, new = rl.HistoryBuffer(3, 1, 8, 4, 2, 2, "cpu"), rl.HistoryBuffer(2, 1, 8, 4, 2, 2, "cpu")
    for buf in (replay, new):
        for _ in range(4):
            n = buf.obs.shape[0]
            mql.add(buf, torch.randn(n, 1, 2), torch.rand(n, 1, 2) * 2 - 1, torch.randn(n, 1), torch.randn(n, 1, 2))
    theta_meta = [p.detach().clone() for p in meta.actor.parameters()]
    adapted = mql.adapt(meta, new, replay, args)
    for p, p0 in zip(adapted.actor.parameters(), theta_meta):
        assert p.shape[0] == 2 * p0.shape[0]
        assert not torch.equal(p[:1], p0) and not torch.equal(p[:1], p[1:])  # moved, and each its own way
    for p, p0 in zip(meta.actor.parameters(), theta_meta):
        assert torch.equal(p, p0)  # theta_meta itself is left alone


def _fake_histories(directory, n_tasks=3):
    rng = np.random.default_rng(0)
    tasks = envs.sample_tasks("point_goal", n_tasks)
    for i in range(n_tasks):
        envs.save_history(envs.history_path(directory, i), obs=rng.normal(size=(2, 8, 20, 2)),
                          act=rng.uniform(-1, 1, (2, 8, 20, 2)), rew=-rng.uniform(0, 2, (2, 8, 20)),
                          task=tasks[i], env="point_goal", algo="sac", seed=0, steps=2 * 8 * 20)


def test_mql_tiny_run_writes_results_that_evaluate_scores(tmp_path, capsys):
    """3 tasks x 60 steps, 20 vector steps of burn-in: 40 x 3 = 120 transitions at 0.1 updates each = 12
    updates, printed beside the env steps; the CPU reductions not overridden (lr) are announced."""
    _fake_histories(tmp_path / "data")
    out = tmp_path / "mql"
    mql.main(["--env", "point_goal", "--data", str(tmp_path / "data"), "--k", "2", "--tasks", "3", "--steps", "60",
              "--burn-in", "60", "--updates-per-transition", "0.1", "--batch-size", "16", "--hidden", "8",
              "--context-hidden", "4", "--history", "3", "--snap-updates", "2", "--replay-updates", "2",
              "--sample-mult", "1", "--test-tasks", "2", "--test-seeds", "2", "--episodes", "3", "--threads", "1",
              "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "meta-training: 180 online env steps (3 tasks x 60), 12 TD3 updates (0.1 per transition" in printed
    announced = next(line for line in printed.splitlines() if line.startswith("CPU scale for point_goal"))
    assert "lr 0.001" in announced and "hidden" not in announced and "updates_per_transition" not in announced
    result = json.load(open(out / "results.json"))
    assert set(evaluate.BASELINE_KEYS) <= set(result) and result["method"] == "MQL"
    assert np.asarray(result["returns"]).shape == (2, 2, 3) and result["k"] == 2
    assert result["meta_train_env_steps"] == 180 and result["meta_train_updates"] == 12
    assert "12 TD3 updates" in result["budget"] and result["selection"] == "final weights"
    assert "12 TD3 updates" not in result["adaptation"] and "4 TD3 updates" in result["adaptation"]
    assert set(torch.load(out / "meta.pt", weights_only=True)) >= {"encoder", "actor", "critic"}
    evaluate.main([str(out), "--tasks", "2", "--seeds", "2", "--device", "cpu"])
    s = json.load(open(out / "eval.json"))["summary"]
    assert s["last5"] == pytest.approx(np.mean(result["returns"]))
    assert np.isfinite(s["score_last5"])


def test_mql_updates_keep_pace_with_env_transitions():
    """floor(n x ratio) updates after n post-burn-in transitions: MQL's 0.5 on 3 tasks x 2 envs is 3 per
    vector step; 0.1 updates every other vector step or so; nothing before the burn-in ends."""
    assert [mql.updates_due(6 * n, 0.5) for n in range(4)] == [0, 3, 6, 9]
    assert [mql.updates_due(6 * n, 0.1) for n in range(1, 6)] == [0, 1, 1, 2, 3]
    assert mql.updates_due(-6, 0.5) == 0


def test_mql_adapts_with_fresh_adams_at_adapt_lr():
    torch.manual_seed(0)
    meta = mql.TD3(1, 2, 2, _mql_args(lr=3e-4, adapt_lr=1e-3))
    adapted = meta.copies(2)
    for opt in (adapted.actor_opt, adapted.critic_opt):
        assert opt.param_groups[0]["lr"] == 1e-3 and not opt.state   # fresh: no moments carried over
    assert meta.actor_opt.param_groups[0]["lr"] == meta.critic_opt.param_groups[0]["lr"] == 3e-4


def test_mql_cpu_scale_only_on_a_cpu_and_never_over_a_given_flag():
    argv = ["--env", "point_goal", "--history", "7"]
    args = mql.parse_args(argv)
    args.device = "cuda"                                              # the reference's sizes elsewhere
    assert mql.scale_for_device(args, argv) == {}
    assert (args.hidden, args.lr, args.updates_per_transition, args.sample_mult, args.history) == (300, 3e-4, 0.5, 5, 7)
    args.device = "cpu"
    reductions = mql.scale_for_device(args, argv)
    assert reductions == {key: value for key, value in mql.CPU_SCALE["point_goal"].items() if key != "history"}
    assert (args.hidden, args.lr, args.history) == (64, 1e-3, 7)


def test_mql_errors_are_one_line(tmp_path, capsys):
    def error_of(argv):
        with pytest.raises(SystemExit) as e:
            mql.main(argv)
        return str(e.value.code) + capsys.readouterr().err
    missing = error_of(["--env", "point_goal", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert missing.startswith("error: no learning histories") and "python sac.py --env point_goal" in missing
    assert "\n" not in missing.strip()
    assert "invalid choice" in error_of(["--env", "moon_goal"])
    assert "must be a positive integer" in error_of(["--steps", "0"])
    _fake_histories(tmp_path / "data", 1)
    short = error_of(["--data", str(tmp_path / "data"), "--k", "2", "--steps", "5", "--out", str(tmp_path / "o")])
    assert short.startswith("error: --steps 5 is less than one episode")
    absent = f"cuda:{torch.cuda.device_count()}"                         # one past this machine's GPUs
    assert error_of(["--device", absent]).startswith(f"error: --device {absent}")


# ----------------------------------------------------------------------------- MACAW

import macaw  # noqa: E402  (this section's own import, kept beside its tests)


def _tiny_macaw_args(*extra):
    return macaw.build_parser().parse_args(["--env", "point_goal", "--hidden", "8", "--depth", "1", "--latent", "4",
                                            "--inner-lr", "0.1", *extra])


def _tiny_macaw_batch(generator, T=2, B=16):
    return {"obs": torch.randn(T, B, 2, generator=generator), "act": torch.rand(T, B, 2, generator=generator) * 2 - 1,
            "ret": torch.randn(T, B, generator=generator)}


def test_macaw_weight_transform_layer():
    """[W | b] = reshape(z W_wt + b_wt); parameters with a leading task axis give one layer per task; the
    gradient w.r.t. W_wt is z (x) dL/db_wt (why the inner loop need not adapt W_wt)."""
    torch.manual_seed(0)
    layer = macaw.WeightTransformLinear(3, 5, latent=4)
    x = torch.randn(7, 3)
    theta = layer.z @ layer.W_wt + layer.b_wt
    assert layer(x).shape == (7, 5)
    torch.testing.assert_close(layer(x), x @ theta[:15].view(3, 5) + theta[15:])
    params = {name: p.detach() + torch.randn(2, *p.shape) for name, p in layer.named_parameters()}  # 2 "tasks"
    y = torch.func.functional_call(layer, params, (x.expand(2, 7, 3),))
    assert y.shape == (2, 7, 5)
    for i in range(2):
        torch.testing.assert_close(y[i], torch.func.functional_call(layer, {n: p[i] for n, p in params.items()}, (x,)))
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.W_wt.grad, torch.outer(layer.z.detach(), layer.b_wt.grad))


def test_macaw_monte_carlo_returns():
    rew = np.array([[1.0, 2.0, 4.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(macaw.monte_carlo_returns(rew, 0.5), [[1 + 1 + 1, 2 + 2, 4], [0.25, 0.5, 1]])


def test_macaw_inner_loop_adapts_and_the_outer_loss_is_second_order():
    """The inner step changes each task's weights differently, as if each task were adapted alone; the outer
    gradient differs from first-order MAML's, and the advantage head (weights and lambda) gets one only
    through the second-order path."""
    args = _tiny_macaw_args()
    torch.manual_seed(0)
    model = macaw.MACAW(2, 2, args)
    generator = torch.Generator().manual_seed(0)
    support, query = _tiny_macaw_batch(generator), _tiny_macaw_batch(generator)
    phi, theta = macaw.adapt(model, support, args)
    for adapted, net in ((phi, model.value), (theta, model.policy)):
        for name, p in macaw.adapted_parameters(net).items():
            assert adapted[name].shape == (2, *p.shape)
            assert not torch.allclose(adapted[name][0], p) and not torch.allclose(adapted[name][0], adapted[name][1])
    alone = macaw.adapt(model, {key: value[1:] for key, value in support.items()}, args)  # task 1 by itself
    for batched, single in zip((phi, theta), alone):
        for name in batched:
            torch.testing.assert_close(batched[name][1], single[name][0])

    def outer_gradients(create_graph):
        v_loss, pi_loss = macaw.outer_losses(model, support, query, args, create_graph)
        params = [model.policy.mean.W_wt, model.policy.advantage[0].b_wt, model.head_weight, model.policy_eta,
                  model.value.net[0].z]
        return torch.autograd.grad(v_loss + pi_loss, params, allow_unused=True, materialize_grads=True)
    second, first = outer_gradients(True), outer_gradients(False)
    assert not torch.allclose(second[0], first[0])                      # the policy's own weights
    assert second[1].abs().sum() > 0 and first[1].abs().sum() == 0      # the advantage head
    assert second[2] != 0 and first[2] == 0                             # its weight lambda
    assert second[3].abs().sum() > 0                                    # learned inner step sizes
    assert not torch.allclose(second[4], first[4])                      # the value function


def test_macaw_trains_adapts_rolls_out_and_evaluate_scores_it(tmp_path):
    _write_point_histories(tmp_path / "data", n_tasks=3, E=2, n_ep=6)
    sac.main(["--env", "point_goal", "--split", "test", "--tasks", "2", "--steps", "200", "--warmup", "100",
              "--hidden", "8", "--batch-size", "16", "--seed", "1", "--threads", "1", "--device", "cpu", "--out",
              str(tmp_path / "test_data")])
    out = tmp_path / "macaw"
    macaw.main(["--env", "point_goal", "--data", str(tmp_path / "data"), "--test-data", str(tmp_path / "test_data"),
                "--out", str(out), "--iters", "3", "--hidden", "8", "--depth", "1", "--latent", "4",
                "--inner-batch", "16", "--batch-size", "16", "--adapt-batch", "16", "--task-batch", "2",
                "--test-tasks", "2", "--test-seeds", "2", "--test-seed", "1", "--k", "2", "--threads", "1",
                "--device", "cpu"])
    result = json.load(open(out / "results.json"))
    assert set(evaluate.BASELINE_KEYS) <= set(result) and result["method"] == "MACAW"
    assert np.asarray(result["returns"]).shape == (2, 2, 3)            # tasks x seeds x (6 episodes / k=2)
    assert result["tasks"] == envs.sample_tasks("point_goal", 2, "test", seed=1).tolist()   # --test-seed's
    assert "16 offline transitions" in result["adaptation"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model"]["policy.mean.W_wt"].shape == (4, 9 * 2)
    evaluate.main([str(out), "--tasks", "2", "--seeds", "2", "--seed", "1", "--device", "cpu"])
    summary = json.load(open(out / "eval.json"))["summary"]
    assert np.isfinite(summary["score_last5"]) and (out / "incontext.png").exists()


def test_macaw_cli_bad_input(tmp_path):
    def error_of(*argv):
        with pytest.raises(SystemExit) as e:
            macaw.main(["--env", "point_goal", "--threads", "1", *argv])
        return str(e.value.code)

    assert "python sac.py --env point_goal" in error_of("--data", str(tmp_path / "none"))
    _write_point_histories(tmp_path / "data", n_tasks=2)
    missing = error_of("--data", str(tmp_path / "data"), "--test-data", str(tmp_path / "none"))
    assert "no test-task histories" in missing and "--split test" in missing
    # training-split histories are not the test tasks
    assert "does not hold the first 2 test tasks" in error_of("--data", str(tmp_path / "data"), "--test-data",
                                                              str(tmp_path / "data"), "--test-tasks", "2")


def test_macaw_rolls_out_on_the_env_seeds_of_its_test_seed(monkeypatch):
    """--test-seed seeds the rollouts' envs as `evaluate.py --seed` seeds AD's (ad.rollout) and MQL's, so
    every method starts from the same initial states; the training --seed does not move them."""
    seeds, real = [], envs.MultiTaskVecEnv

    def recording(*a, seed=0, **kw):
        seeds.append(seed)
        return real(*a, seed=seed, **kw)
    monkeypatch.setattr(envs, "MultiTaskVecEnv", recording)
    args = _tiny_macaw_args("--test-seed", "7", "--test-seeds", "2", "--seed", "3", "--adapt-batch", "8")
    torch.manual_seed(0)
    model = macaw.MACAW(2, 2, args)
    table = _tiny_macaw_batch(torch.Generator().manual_seed(0))
    stats = {"obs_mean": torch.zeros(2), "obs_std": torch.ones(2)}
    returns, _ = macaw.test(model, table, envs.sample_tasks("point_goal", 2, "test", seed=7), stats, args, 2)
    assert returns.shape == (2, 2, 2) and seeds == [7, 7]               # the adapted rollout, the one before


# ----------------------------------------------------------------------------- install and GPU readiness

import shlex  # noqa: E402  (this section's own imports, kept beside its tests)

import bench  # noqa: E402


def test_requirements_leave_triton_out_where_it_has_no_wheel():
    """requirements.txt's markers, evaluated for Linux, macOS and Windows: Triton on Linux only, every other
    requirement everywhere (pip installs the file unchanged on all three)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    lines = (line.split("#")[0].strip() for line in open(os.path.join(HERE, "requirements.txt")))
    requirements = [Requirement(line) for line in lines if line]
    for platform, system in (("linux", "Linux"), ("darwin", "Darwin"), ("win32", "Windows")):
        env = {**default_environment(), "sys_platform": platform, "platform_system": system}
        kept = {r.name for r in requirements if r.marker is None or r.marker.evaluate(env)}
        assert kept == {r.name for r in requirements} - ({"triton"} if platform != "linux" else set()), platform
    assert "torch" in kept and "gymnasium" in kept


_WITHOUT_TRITON = """
import glob, importlib, importlib.machinery, sys

class HideTriton(importlib.machinery.PathFinder):  # `import triton` fails as where no wheel installed it
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "triton" else super().find_spec(name, path, target)

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = HideTriton
for module in sorted(f[:-3] for f in glob.glob("*.py") if not f.startswith("test_")):
    importlib.import_module(module)                                   # every module of the project
import ad, evaluate, mamba, sac, torch
assert mamba.triton is None and not [m for m in sys.modules if m.split(".")[0] == "triton"]
out = sys.argv[1]
tiny = ["--threads", "1", "--device", "cpu"]
sac.main(["--env", "point_goal", "--tasks", "2", "--steps", "400", "--warmup", "100", "--hidden", "16",
          "--out", out + "/data", *tiny])
ad.main(["--env", "point_goal", "--data", out + "/data", "--out", out + "/run", "--d-model", "8", "--n-layer", "1",
         "--d-state", "4", "--k", "1", "--epochs", "1", "--batch-size", "4", "--val-tasks", "2", "--val-seeds", "1",
         *tiny])
evaluate.main([out + "/run", "--tasks", "2", "--seeds", "1", "--episodes", "2", "--out", out + "/eval", *tiny])
inputs = {key: torch.rand(*shape) for key, shape in dict(u=(1, 2, 3), delta=(1, 2, 3), A=(2, 4), B=(1, 4, 3),
                                                          C=(1, 4, 3)).items()}
try:
    mamba.selective_scan(**inputs, backend="triton")
    sys.exit("backend='triton' ran without triton")
except RuntimeError as e:
    assert "needs the triton package" in str(e)
print("everything ran without triton")
"""


def test_everything_runs_where_triton_cannot_be_imported(tmp_path):
    """As on macOS and Windows: every module imports, and a tiny SAC run, AD run (Mamba on its torch scan)
    and in-context rollout work in a process where `import triton` fails. A module that imported Triton
    unconditionally would fail here."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON, str(tmp_path)], cwd=HERE, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "everything ran without triton" in result.stdout
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["arch"] == "mamba"


@pytest.fixture
def two_gpus(monkeypatch):
    """This process believes it has 2 CUDA GPUs (and is not under torchrun): device checks on any machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _device_error(name):
    with pytest.raises(ValueError) as e:
        envs.resolve_device(name)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_device_resolution_names_what_is_missing(two_gpus):
    """'auto' is CUDA where present, else the CPU, never MPS; a GPU index past the machine's, MPS where there
    is none, CUDA where there is none and a malformed name each get one line that says what there is."""
    assert (envs.resolve_device("auto"), envs.resolve_device("cuda"), envs.resolve_device("cuda:1")) == \
        ("cuda", "cuda", "cuda:1")
    assert _device_error("cuda:2") == "--device cuda:2: this machine has 2 GPU(s), cuda:0 to cuda:1"
    assert _device_error("gpu").startswith("--device gpu: not a device")
    two_gpus.setattr(torch.backends.mps, "is_available", lambda: True)     # Apple silicon
    assert envs.resolve_device("mps") == "mps"
    two_gpus.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "MPS (Apple silicon's GPU) is not available here" in _device_error("mps")
    two_gpus.setattr(torch.cuda, "is_available", lambda: False)
    assert envs.resolve_device("auto") == "cpu"
    assert _device_error("cuda") == "--device cuda: no CUDA GPU here; use --device cpu"


def test_torchrun_gives_each_process_its_own_gpu_and_refuses_more_processes_than_gpus(two_gpus, capsys):
    """Under torchrun, --device cuda is cuda:LOCAL_RANK; a third process on a 2-GPU machine is refused in one
    line by every script (nothing is started: no process group, no data read)."""
    two_gpus.setenv("WORLD_SIZE", "3")
    two_gpus.setenv("LOCAL_RANK", "1")
    assert envs.resolve_device("cuda") == "cuda:1"
    assert envs.resolve_device("cuda:0") == "cuda:0"                      # an explicit index is kept
    two_gpus.setenv("LOCAL_RANK", "2")
    message = "--device cuda: torchrun started more processes on this machine than it has GPUs (2): use " \
              "--nproc_per_node 2 or fewer"
    with pytest.raises(SystemExit) as e:
        ad.main(["--env", "point_goal", "--device", "cuda"])
    assert str(e.value.code) == f"error: {message}"
    with pytest.raises(SystemExit):
        sac.main(["--env", "point_goal", "--device", "cuda"])
    assert capsys.readouterr().err.strip().endswith(message)


def test_cuda_defaults_to_bf16_for_ad_and_tf32_for_fp32_the_cpu_keeps_fp32(two_gpus):
    """ad.py's default precision: bf16 autocast on CUDA (flash attention), fp32 on a CPU; fp32 on CUDA means
    TF32 matmuls, fp32-strict IEEE ones; a CPU's matmul precision is never touched."""
    two_gpus.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert ad.parse_args(["--device", "cpu"]).bf16 is False
    assert ad.parse_args(["--device", "cuda"]).bf16 is True
    assert ad.parse_args(["--device", "cuda", "--dtype", "fp32"]).bf16 is False
    precision = torch.get_float32_matmul_precision()
    try:
        for device, dtype, expected in [("cpu", "fp32", precision), ("cuda", "fp32", "high"),
                                        ("cuda:1", "fp32-strict", "highest"), ("cuda", "bf16", "high")]:
            envs.set_matmul_precision(device, dtype)
            assert torch.get_float32_matmul_precision() == expected, (device, dtype)
    finally:
        torch.set_float32_matmul_precision(precision)


def test_valuable_subgoals_are_computed_on_the_rewards_device():
    """No tensor of valuable_subgoal_steps is made on the CPU behind the caller's back (on CUDA rewards that
    was a device mismatch); the meta device stands in for a GPU here."""
    steps = hybrid.valuable_subgoal_steps(torch.zeros(3, 7, device="meta"))
    assert steps.device.type == "meta" and steps.shape == (3, 7)


def test_droq_layer_norm_runs_outside_autocast(monkeypatch):
    """CUDA's autocast runs layer_norm in fp32: TaskLayerNorm turns autocast off around it, so the norm runs in
    the activations' own dtype on every device."""
    seen, layer_norm = [], torch.nn.functional.layer_norm

    def recording(x, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
        return layer_norm(x, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "layer_norm", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        droq.TaskLayerNorm(2, 4)(torch.randn(2, 3, 4).bfloat16())
    assert seen == [(False, torch.bfloat16)]


def test_ad_reads_the_loss_back_every_few_updates_and_still_stops_on_nan(tmp_path, monkeypatch):
    """The loss stays on the device and is read every LOSS_READ_EVERY updates (and at each validation): a NaN
    in between survives the sum, stops the run at the next read and no checkpoint is written."""
    _write_point_histories(tmp_path / "data")
    monkeypatch.setattr(ad, "LOSS_READ_EVERY", 4)
    reads, read_losses = [], ad.read_losses

    def counting(losses, world, first, last):
        reads.append(last + 1)
        return read_losses(losses, world, first, last)
    monkeypatch.setattr(ad, "read_losses", counting)
    ad.train(_ad_args(tmp_path, tmp_path / "data", "--epochs", "8", "--eval-every", "3", "--out",
                      str(tmp_path / "fine")))
    assert reads == [3, 4, 6, 8]                                          # 8 updates, validated at 3, 6, 8
    n_calls, action_loss = [], ad.action_loss

    def nan_at_update_2(out, targets, loss):
        n_calls.append(1)
        return action_loss(out, targets, loss) * (math.nan if len(n_calls) == 3 else 1)
    monkeypatch.setattr(ad, "action_loss", nan_at_update_2)
    with pytest.raises(FloatingPointError, match="the loss became nan at an update from 0 to 3"):
        ad.train(_ad_args(tmp_path, tmp_path / "data", "--epochs", "8", "--eval-every", "100"))
    assert not (tmp_path / "run" / "last.pt").exists()


@needs_triton
def test_every_triton_launch_is_under_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: under torchrun or --device cuda:1 that is not the tensors'
    GPU unless the launch goes under torch.cuda.device(their device). Both kernels must (-1 for the
    interpreter's CPU tensors)."""
    entered = []

    class RecordingDevice:  # stands in for torch.cuda.device
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.pop()

    launches = []

    class Recorded:  # kernel[grid](...) records which devices were entered at the launch
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(list(entered))
                return self.kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    for name in ("_scan_fwd_kernel", "_scan_bwd_kernel"):
        monkeypatch.setattr(mamba, name, Recorded(getattr(mamba, name)))
    inputs = {key: value.to(DEVICE).requires_grad_() for key, value in _scan_inputs(1, 3, 5, 2).items()}
    mamba.selective_scan(**inputs, backend="triton").sum().backward()
    expected = inputs["u"].device if inputs["u"].is_cuda else -1
    assert launches == [[expected], [expected]]


def test_gpu_check_dry_run_prints_commands_the_scripts_accept(tmp_path):
    """`bash gpu_check.sh --dry-run` runs nothing and prints every step: the suite, the scan at the paper's
    shapes, the attention kernels, a 2-process torchrun of ad.py and AD's speed in IEEE fp32, TF32 and bf16;
    every flag it passes to a script of ours parses. Without a GPU, a real run stops in one line."""
    result = subprocess.run(["bash", "gpu_check.sh", "--dry-run"], cwd=HERE, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines()
                if line.startswith("+ ") and ".py " in line]
    parsers = {"sac.py": lambda: sac.build_parser("sac", ""), "ad.py": ad.build_parser, "bench.py": bench.build_parser}
    scripts = [next(word for word in command if word.endswith(".py")) for command in commands]
    assert sorted(scripts) == ["ad.py", "bench.py", "bench.py", "sac.py", "test_all.py"]
    for command, script in zip(commands, scripts):
        if script in parsers:
            parsers[script]().parse_args(command[command.index(script) + 1:])  # argparse exits on a bad flag
    assert "torchrun --standalone --nproc_per_node 2 ad.py" in result.stdout
    assert "--dtypes fp32-strict fp32 bf16" in result.stdout and "FLASH_ATTENTION" in result.stdout
    no_gpu = subprocess.run(["bash", "gpu_check.sh"], cwd=HERE, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert no_gpu.returncode == 1 and no_gpu.stderr.startswith("error: no CUDA GPU here")
