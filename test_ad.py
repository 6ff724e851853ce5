
# ----------------------------------------------------------------------------- mamba.py

def _scan_inputs(batch, dim, L, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, z = torch.randn(batch, dim, L, generator=g), torch.randn(batch, dim, L, generator=g)
    delta = 0.5 * torch.randn(batch, dim, L, generator=g)
    A = -(0.5 + torch.rand(dim, N, generator=g))
    B, C = torch.randn(batch, N, L, generator=g), torch.randn(batch, N, L, generator=g)
    D, delta_bias = torch.randn(dim, generator=g), 0.3 * torch.randn(dim, generator=g)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


@pytest.mark.parametrize("shape, options", [
    ((2, 3, 1, 4), {}),
    ((2, 5, 37, 4), {"D", "z", "delta_bias", "softplus"}),
    ((1, 4, 64, 16), {"softplus"}),
    ((3, 2, 17, 1), {"D", "z"}),
])
def test_selective_scan_torch_equals_ref(shape, options):
    """The fast CPU path and the sequential oracle agree on outputs and every input gradient."""
    inputs = _scan_inputs(*shape)
    kwargs = {key: inputs.pop(key) if key in options else (inputs.pop(key), None)[1]
              for key in ("D", "z", "delta_bias")}
    kwargs["delta"] = inputs["delta"] if "softplus" in options else inputs["delta"].abs()
    results = {}
    for backend in ("ref", "torch"):
        leaves = {key: value.clone().requires_grad_() for key, value in {**inputs, **kwargs}.items()
                  if value is not None}
        y = mamba.selective_scan(**leaves, delta_softplus="softplus" in options, backend=backend)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[backend] = [y.detach()] + [leaves[key].grad for key in sorted(leaves)]
    for ref, fast in zip(results["ref"], results["torch"]):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_selective_scan_rejects_bad_shapes():
    inputs = _scan_inputs(2, 3, 5, 4)
    with pytest.raises(ValueError, match="B must have shape"):
        mamba.selective_scan(**{**inputs, "B": inputs["B"][:, :, :4]})
    with pytest.raises(ValueError, match="unknown selective_scan backend"):
        mamba.selective_scan(**inputs, backend="cuda")


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
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-5)


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


def _ad_args(tmp_path, data_dir, *extra):
    return ad.parse_args(["--env", "point_goal", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                          "--d-model", "8", "--n-layer", "1", "--d-state", "4", "--k", "2", "--batch-size", "4",
                          "--val-tasks", "2", "--val-seeds", "1", "--warmup-iters", "2", "--threads", "1",
                          "--device", "cpu", *extra])


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
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
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
    assert set(result["summary"]) >= {"first_episode", "last5", "score_last5", "zero_action", "random_policy"}
    assert (tmp_path / "eval" / "incontext.png").stat().st_size > 10_000


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
    with pytest.raises(ad.DataError, match="holds a mamba model, not transformer"):
        ad.load_checkpoint(str(tmp_path / "run"), arch="transformer")
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path / "bad.pt")])
    assert "not a checkpoint written by ad.py" in str(e.value.code)
