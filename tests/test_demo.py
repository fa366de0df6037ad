"""Tests of the demo (``python -m samopt.demo``): its model, data and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from samopt import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["SGD", "SAM(SGD)", "Adam", "SAM(Adam)"]


def _numerical_grads(
    params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, eps: float = 1e-6
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, p in params.items():
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up, _ = demo.loss_and_grads(params, X, y)
            p[i] = old - eps
            down, _ = demo.loss_and_grads(params, X, y)
            p[i] = old
            g[i] = (up - down) / (2 * eps)
        out[name] = g
    return out


@pytest.mark.parametrize("sizes", [(6, 5, 4), (5, 7, 6, 3)])
def test_loss_and_grads_matches_finite_differences(sizes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    params = demo.init_mlp(sizes, seed=3)
    for name in params:  # non-zero biases so that their gradients are exercised too
        params[name] += 0.1 * rng.standard_normal(params[name].shape)
    X = rng.standard_normal((9, sizes[0]))
    y = rng.integers(0, sizes[-1], size=9).astype(np.int64)
    loss, grads = demo.loss_and_grads(params, X, y)
    assert np.isfinite(loss) and loss > 0
    assert sorted(grads) == sorted(params)
    numerical = _numerical_grads(params, X, y)
    for name in params:
        assert grads[name].shape == params[name].shape
        assert grads[name].dtype == np.float64
        np.testing.assert_allclose(grads[name], numerical[name], rtol=1e-5, atol=1e-8)


def test_loss_is_mean_cross_entropy() -> None:
    params = demo.init_mlp((3, 4, 5), seed=0)
    X = np.random.default_rng(0).standard_normal((7, 3))
    y = np.arange(7, dtype=np.int64) % 5
    logits = np.maximum(X @ params["W1"] + params["b1"], 0) @ params["W2"] + params["b2"]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(7), y]))
    loss, _ = demo.loss_and_grads(params, X, y)
    assert loss == pytest.approx(expected, rel=1e-12)
    assert demo.accuracy(params, X, y) == pytest.approx(np.mean(p.argmax(axis=1) == y))


def test_init_mlp_shapes_and_determinism() -> None:
    params = demo.init_mlp((64, 128, 10), seed=0)
    assert {k: v.shape for k, v in params.items()} == {
        "W1": (64, 128),
        "b1": (128,),
        "W2": (128, 10),
        "b2": (10,),
    }
    assert all(v.dtype == np.float64 for v in params.values())
    again = demo.init_mlp((64, 128, 10), seed=0)
    other = demo.init_mlp((64, 128, 10), seed=1)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not np.array_equal(params["W1"], other["W1"])


def test_load_noisy_digits() -> None:
    d = demo.load_digits_split(noise=0.4, seed=0)
    X_train, y_train, X_test, y_test = demo.load_noisy_digits(noise=0.4, seed=0)
    assert X_train.shape[1] == X_test.shape[1] == 64
    assert X_train.shape[0] + X_test.shape[0] == 1797
    assert X_test.shape[0] == pytest.approx(0.3 * 1797, abs=10)
    assert X_train.dtype == X_test.dtype == np.float64
    np.testing.assert_allclose(X_train.mean(axis=0), 0.0, atol=1e-12)
    assert np.array_equal(X_train, d.X_train) and np.array_equal(y_train, d.y_train)
    assert np.array_equal(y_test, d.y_test)
    # 40% resampled uniformly: about 36% wrong; the test labels are clean.
    assert 0.32 < d.corrupted_fraction < 0.40
    clean = demo.load_digits_split(noise=0.0, seed=0)
    assert np.array_equal(clean.y_train, d.y_train_clean)
    assert np.array_equal(clean.y_test, d.y_test)
    assert np.array_equal(clean.X_train, d.X_train)
    # Every class is in both sets (stratified split), and the split depends on the seed.
    assert set(np.unique(y_test)) == set(range(10))
    other = demo.load_digits_split(noise=0.4, seed=1)
    assert not np.array_equal(other.X_test, d.X_test)


def test_sam_train_step_changes_params_and_lowers_loss() -> None:
    d = demo.load_digits_split(noise=0.0, seed=0)
    for spec in demo.default_specs():
        params = demo.init_mlp(seed=0)
        opt = demo.make_optimizer(spec)
        X, y = d.X_train[:256], d.y_train[:256]
        first = demo.train_step(opt, params, X, y)
        for _ in range(20):
            demo.train_step(opt, params, X, y)
        last, _ = demo.loss_and_grads(params, X, y)
        assert all(np.isfinite(v).all() for v in params.values())
        assert last < first, spec.name


def test_seed_and_per_family_parsing() -> None:
    assert demo._parse_seeds(["3"]) == [0, 1, 2]
    assert demo._parse_seeds(["4,7"]) == [4, 7]
    assert demo._parse_seeds(["4", "7"]) == [4, 7]
    assert demo._parse_seeds(["7,"]) == [7]
    assert demo._parse_per_family("--lr", ["0.1"]) == {"sgd": 0.1, "adam": 0.1}
    assert demo._parse_per_family("--lr", ["adam=0.002"]) == {"adam": 0.002}
    specs = demo.default_specs({"adam": 0.002}, {"sgd": 0.3})
    assert [s.name for s in specs] == NAMES
    assert [(s.lr, s.rho) for s in specs] == [
        (demo.DEFAULT_LR["sgd"], None),
        (demo.DEFAULT_LR["sgd"], 0.3),
        (0.002, None),
        (0.002, demo.DEFAULT_RHO["adam"]),
    ]
    with pytest.raises(SystemExit):
        demo.main(["--lr", "rmsprop=0.1"])
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "0"])


def test_main_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "sub" / "demo.png"
    out_json = tmp_path / "demo.json"
    argv = ["--epochs", "2", "--seeds", "2", "--batch-size", "64", "--no-progress"]
    argv += ["--out", str(png), "--json", str(out_json)]
    assert demo.main(argv) == 0

    assert png.read_bytes()[:8] == PNG_MAGIC
    report = json.loads(out_json.read_text(encoding="utf-8"))
    assert report["config"]["epochs"] == 2
    assert report["config"]["seeds"] == [0, 1]
    assert [o["name"] for o in report["optimizers"]] == NAMES
    for o in report["optimizers"]:
        assert [r["seed"] for r in o["runs"]] == [0, 1]
        for r in o["runs"]:
            assert len(r["test_acc"]) == 2
            assert all(0.0 <= a <= 1.0 for a in r["test_acc"])
        s = o["summary"]
        assert s["best_test_acc_mean"] >= s["final_test_acc_mean"]
        assert s["final_test_acc_mean"] == pytest.approx(
            np.mean([r["test_acc"][-1] for r in o["runs"]])
        )
        assert (o["rho"] is None) == (not o["name"].startswith("SAM("))

    printed = capsys.readouterr().out
    table_rows = [line.split()[0] for line in report["table"].splitlines()[2:]]
    assert table_rows == NAMES
    assert report["table"] in printed
    assert str(png) in printed


def test_main_is_deterministic(tmp_path: Path) -> None:
    reports = []
    for i in range(2):
        path = tmp_path / f"{i}.json"
        argv = ["--epochs", "1", "--seeds", "5,", "--no-progress", "--json", str(path)]
        assert demo.main([*argv, "--out", str(tmp_path / f"{i}.png")]) == 0
        reports.append(json.loads(path.read_text(encoding="utf-8"))["optimizers"])
    assert [o["runs"] for o in reports[0]] == [o["runs"] for o in reports[1]]


def test_the_recipe_decays_the_weights_but_not_the_biases() -> None:
    for family in demo.FAMILIES:
        opt = demo.make_optimizer(demo.OptimizerSpec(family, 0.1, weight_decay=0.01))
        params = demo.init_mlp((4, 3, 2), 0)
        params["b1"][:] = 1.0
        before = {k: v.copy() for k, v in params.items()}
        opt.step(params, {k: np.zeros_like(v) for k, v in params.items()})
        assert np.array_equal(params["b1"], before["b1"]), family
        # With a zero gradient the weights move by their decay alone: towards zero.
        assert np.all(np.sign(before["W1"]) * (params["W1"] - before["W1"]) < 0), family


def test_the_schedule_warms_up_then_anneals_to_zero() -> None:
    spec = demo.OptimizerSpec("sgd", 0.2, warmup_epochs=2)
    opt = demo.make_optimizer(spec)
    schedule = demo.make_schedule(spec, total_steps=100, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        schedule.step(opt)
        lrs.append(opt.get_lr())
    assert lrs[0] == pytest.approx(0.2 / 20) and lrs[19] == pytest.approx(0.2)
    assert all(a <= b for a, b in zip(lrs[:20], lrs[1:20]))
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))
    assert lrs[-1] == 0.0


def test_the_demo_runs_any_variant_of_the_sam_family(tmp_path: Path) -> None:
    out_json = tmp_path / "family.json"
    argv = ["--epochs", "1", "--seeds", "1", "--batch-size", "128", "--no-progress"]
    argv += ["--optimizers", "base", *demo.VARIANTS, "--out", str(tmp_path / "f.png")]
    assert demo.main([*argv, "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text(encoding="utf-8"))
    labels = [label for label, _ in demo.VARIANTS.values()]
    expected = [n for base in ("SGD", "Adam") for n in [base] + [f"{x}({base})" for x in labels]]
    assert [o["name"] for o in report["optimizers"]] == expected
    assert all(0.0 <= o["runs"][0]["test_acc"][0] <= 1.0 for o in report["optimizers"])
    with pytest.raises(SystemExit):
        demo.main(["--optimizers", "nosuchsam"])
