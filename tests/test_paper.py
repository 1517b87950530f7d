"""The paper runner (spectral_ext.experiments.paper): --quick end to end, resume, bad input, the
data loaders on files written here in the data sets' exact formats, the gap-at-threshold
definition on hand-made curves, the models and the adversarial objective."""

import json
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_ext.experiments import datasets, models, paper, table1

PNG = b"\x89PNG\r\n\x1a\n"
TIME_KEYS = {"train_time", "epoch_time", "wall_time", "resumed"}


def _strip_times(o):
    if isinstance(o, dict):
        return {k: _strip_times(v) for k, v in o.items() if k not in TIME_KEYS}
    if isinstance(o, list):
        return [_strip_times(v) for v in o]
    return o


# --------------------------------------------------------------------------- --quick

def test_quick_writes_every_output_and_the_table_parses_back(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    pytest.importorskip("matplotlib", reason="the figures need matplotlib (make setup installs it)")
    out = tmp_path / "quick"
    res = paper.main(["--quick", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "# Table 1" in printed
    names = sorted(os.listdir(out))
    figs = [n for n in names if n.endswith(".png")]
    assert {"table1.md", "table1.csv", "results.json", "checkpoints"} <= set(names)
    assert sorted(f.split("-")[0] for f in figs) == ["fig1_accuracy", "fig2_input_gradient",
                                                    "fig3_hessian", "fig4_singular_values",
                                                    "fig5_slope"]
    for f in figs:
        assert (out / f).read_bytes()[:8] == PNG and (out / f).stat().st_size > 5000

    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["quick"] and saved["seeds"] == [0] and saved["wall_time"] > 0
    assert saved["versions"]["torch"] == torch.__version__
    runs = saved["runs"]
    assert {(r["method"], r["regime"]) for r in runs} == \
        {(m, g) for m in paper.METHODS for g in paper.REGIMES}
    epochs = saved["config"]["epochs"]
    for r in runs:
        assert [e["epoch"] for e in r["history"]] == list(range(1, epochs + 1))
        for e in r["history"]:
            for k in ("train_acc", "test_acc", "train_loss", "test_loss", "objective",
                      "input_grad_train", "input_grad_test", "max_sigma", "lr"):
                assert isinstance(e[k], float) and math.isfinite(e[k]), (k, e[k])
            assert abs(e["gap"] - (e["train_acc"] - e["test_acc"])) < 1e-12
            assert e["max_sigma"] == max(e["sigmas"])
            for part in ("train", "test"):
                assert math.isfinite(e[f"hessian_{part}"]["eigenvalue"])
        assert len(r["final"]["slope_values"]) == saved["config"]["slope_samples"]
        assert r["final"]["singular_values"] == sorted(r["final"]["singular_values"], reverse=True)
        assert r["wall_time"] > 0

    # the table: recomputed from results.json, parsed back from both files
    rows = table1.summarize(runs, None)
    csv_rows = table1.parse_csv((out / "table1.csv").read_text())
    md_rows = table1.parse_markdown((out / "table1.md").read_text())
    assert len(rows) == len(csv_rows) == len(md_rows) == len(paper.METHODS) * 2
    key = lambda r: (r["dataset"], r["model"], r["regime"], r["method"])
    csv_by, md_by = {key(r): r for r in csv_rows}, {key(r): r for r in md_rows}
    for r in rows:
        c, m = csv_by[key(r)], md_by[key(r)]
        assert c["alpha"] == r["alpha"] and m["alpha"] == round(r["alpha"], 2)
        assert c["batch_size"] == m["batch_size"] == r["batch_size"]
        for k in ("test_acc_mean", "gap_mean"):
            assert c[k] == r[k]                       # full precision in the CSV
            assert abs(m[k] - r[k]) <= 5e-4 + 1e-12   # 3 decimals in Markdown
        assert math.isnan(m["test_acc_std"])          # one seed: no std
        # the automatic alpha lies below every run's best test accuracy: every gap exists
        assert c["n_gap"] == 1 and not math.isnan(c["gap_mean"])
    assert res["table1"] == rows or json.dumps(res["table1"], default=str) == \
        json.dumps(rows, default=str)


# --------------------------------------------------------------------------- resume

TINY = ["--dataset", "digits", "--model", "vgg", "--vgg-config", "8,M", "--regimes", "small",
        "--methods", "spectral,jacobian,hessian", "--epochs", "3", "--batch-small", "128",
        "--analysis-samples", "32", "--slope-samples", "16", "--curvature-iters", "3",
        "--threads", "1", "--no-progress"]


def test_resume_continues_exactly_and_refuses_changed_settings(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    full = paper.main(TINY + ["--out", str(tmp_path / "a")])

    class Stop(Exception):
        pass

    def interrupt(spec, epoch):      # Ctrl-C after the 2nd epoch of the hessian run
        if spec["method"] == "hessian" and epoch == 2:
            raise Stop
    monkeypatch.setattr(paper, "_after_epoch", interrupt)
    with pytest.raises(Stop):
        paper.main(TINY + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(paper, "_after_epoch", lambda spec, epoch: None)
    resumed = paper.main(TINY + ["--out", str(tmp_path / "b"), "--resume"])
    assert [r["resumed"] for r in resumed["runs"]] == ["complete", "complete", "partial"]
    # the same numbers, bit for bit (same machine, same threads): model, optimizer, the
    # regularizers' vectors, the shuffling and the global RNG all continue from the checkpoint
    assert _strip_times(resumed["runs"]) == _strip_times(full["runs"])

    with pytest.raises(SystemExit, match=r"other settings \(lr: 0.01 -> 0.02\)"):
        paper.main(TINY + ["--out", str(tmp_path / "b"), "--resume", "--lr", "0.02"])


def test_a_diverged_run_is_recorded_not_fatal(tmp_path):
    """A learning rate that blows the weights up: the run finishes with NaN (null in
    results.json) measurements, and every output is still written."""
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    res = paper.main(["--dataset", "digits", "--vgg-config", "8,M", "--methods", "vanilla",
                      "--regimes", "small", "--epochs", "1", "--lr", "1e30",
                      "--analysis-samples", "16", "--slope-samples", "8",
                      "--curvature-iters", "2", "--threads", "1", "--no-progress",
                      "--out", str(tmp_path)])
    (run,) = res["runs"]
    assert run["final"]["diverged"] and math.isnan(run["history"][0]["max_sigma"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["final"]["slope_mean"] is None
    assert (tmp_path / "table1.md").exists()


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flag, value, listed", [
    ("--methods", "spectral,dropout", "vanilla, decay, adversarial, spectral, jacobian"),
    ("--model", "resnet", "vgg, nin, densenet"),
    ("--dataset", "mnist", "digits, mnist1d, cifar10, cifar100, stl10"),
    ("--regimes", "medium", "small, large"),
])
def test_unknown_names_list_the_choices(flag, value, listed, capsys):
    with pytest.raises(SystemExit):
        paper.main([flag, value, "--out", "unused"])
    err = capsys.readouterr().err
    assert "unknown" in err and repr(value.split(",")[-1]) in err and listed in err


@pytest.mark.parametrize("name, files", [
    ("cifar10", ["data_batch_1", "data_batch_5", "test_batch"]),
    ("cifar100", ["train", "test"]),
    ("stl10", ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]),
])
def test_data_dir_without_the_files_names_them(name, files, tmp_path, capsys):
    with pytest.raises(FileNotFoundError) as e:
        datasets.load(name, str(tmp_path))
    for f in files:
        assert f in str(e.value)
    assert datasets.FILES[name][0] in str(e.value)
    with pytest.raises(SystemExit):
        paper.main(["--dataset", name, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert files[0] in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        datasets.load(name, None)


def test_bad_numbers_are_refused(capsys):
    for argv, what in ((["--epochs", "0"], "--epochs"), (["--seeds", "a,b"], "--seeds"),
                       (["--adv-alpha", "2"], "--adv-alpha"),
                       (["--densenet-depth", "41"], "--densenet-depth"),
                       (["--vgg-config", "8,X"], "--vgg-config")):
        with pytest.raises(SystemExit):
            paper.main(argv + ["--out", "unused"])
        assert what in capsys.readouterr().err


# --------------------------------------------------------------------------- loaders

def _rand_images(n, shape):
    return np.random.default_rng(torch.randint(0, 2**31, ()).item()).integers(
        0, 256, size=(n,) + shape, dtype=np.uint8)


def _cifar_pickle(path, images, labels, label_key):
    """The format of https://www.cs.toronto.edu/~kriz/cifar.html, written independently of the
    loader: a dict with bytes keys, data an N x 3072 uint8 array (1024 red values, then green,
    then blue, each 32 x 32 row-major), labels a list of ints."""
    d = {b"batch_label": b"testing batch", b"data": images.reshape(len(images), 3072),
         label_key: [int(v) for v in labels], b"filenames": [b"x.png"] * len(images)}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_loader_reads_the_pickle_format(classes, tmp_path):
    folder = tmp_path / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    key = b"labels" if classes == 10 else b"fine_labels"
    train_x, train_y = [], []
    for n in names:
        x = _rand_images(3, (3, 32, 32))
        y = np.random.default_rng(len(train_x)).integers(0, classes, 3)
        _cifar_pickle(folder / n, x, y, key)
        train_x.append(x)
        train_y.append(y)
    test_x = _rand_images(4, (3, 32, 32))
    test_x[0, 1, 2, 5] = 7      # one known pixel: green channel, row 2, column 5
    test_x[0, 2, 5, 2] = 201
    _cifar_pickle(folder / ("test_batch" if classes == 10 else "test"), test_x,
                  [classes - 1, 0, 1, 2], key)
    d = datasets.load("cifar10" if classes == 10 else "cifar100", str(tmp_path), gcn=False)
    assert d.num_classes == classes and d.input_shape == (3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert torch.equal(d.x_train, torch.from_numpy(np.concatenate(train_x)).float())
    assert torch.equal(d.y_train, torch.from_numpy(np.concatenate(train_y)))
    assert d.x_test[0, 1, 2, 5] == 7 and d.x_test[0, 2, 5, 2] == 201
    assert d.y_test.tolist() == [classes - 1, 0, 1, 2]
    # the folder itself may be given
    assert torch.equal(datasets.load(d.name, str(folder), gcn=False).x_test, d.x_test)


def test_stl10_loader_reads_the_column_major_binary_format(tmp_path):
    """https://cs.stanford.edu/~acoates/stl10/: uint8 images of 3 x 96 x 96, each channel
    stored column-major (MATLAB order); labels uint8 1..10."""
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    imgs = {s: _rand_images(n, (3, 96, 96)) for s, n in (("train", 3), ("test", 2))}
    imgs["test"][1, 0, 10, 60] = 3           # row 10, column 60 of the red channel
    imgs["test"][1, 0, 60, 10] = 250
    labels = {"train": [1, 10, 5], "test": [2, 7]}
    for s in ("train", "test"):
        with open(folder / f"{s}_X.bin", "wb") as f:
            for img in imgs[s]:
                for ch in img:
                    f.write(ch.T.tobytes())   # column-major: column by column
        with open(folder / f"{s}_y.bin", "wb") as f:
            f.write(bytes(labels[s]))
    d = datasets.load("stl10", str(tmp_path), gcn=False)
    assert d.input_shape == (3, 96, 96) and d.num_classes == 10
    assert torch.equal(d.x_train, torch.from_numpy(imgs["train"]).float())
    assert d.x_test[1, 0, 10, 60] == 3 and d.x_test[1, 0, 60, 10] == 250
    assert d.y_train.tolist() == [0, 9, 4] and d.y_test.tolist() == [1, 6]
    (folder / "test_y.bin").write_bytes(bytes([2]))
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        datasets.load("stl10", str(tmp_path))


def test_runner_end_to_end_on_cifar_format_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _cifar_pickle(folder / n, _rand_images(8, (3, 32, 32)),
                      np.arange(8) % 10, b"labels")
    res = paper.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--model", "nin",
                      "--width", "0.05", "--methods", "vanilla,spectral", "--epochs", "1",
                      "--batch-small", "16", "--batch-large", "4096", "--analysis-samples", "8",
                      "--slope-samples", "8", "--curvature-iters", "2", "--threads", "1",
                      "--no-progress", "--out", str(tmp_path / "out")])
    assert res["data"]["cifar10"] == dict(train=40, test=8, input_shape=[3, 32, 32], classes=10)
    large = [r for r in res["runs"] if r["regime"] == "large"]
    assert all(r["batch_size"] == 4096 and r["batch_size_effective"] == 40 for r in large)
    assert os.path.exists(tmp_path / "out" / "table1.md")


def test_global_contrast_normalization():
    x = torch.rand(5, 3, 4, 4) * 7 + 3
    x[2] = 1.5                                    # a constant image stays finite (zero)
    y = datasets.global_contrast_normalize(x)
    flat = y.reshape(5, -1).double()
    assert flat.mean(1).abs().max() < 1e-6
    ok = [0, 1, 3, 4]
    assert (flat[ok].pow(2).mean(1).sqrt() - 1).abs().max() < 1e-6
    assert torch.equal(y[2], torch.zeros_like(y[2]))


def test_digits_and_mnist1d_are_offline(monkeypatch):
    pytest.importorskip("sklearn", reason="digits needs scikit-learn")
    d = datasets.load("digits")
    assert len(d.y_train) + len(d.y_test) == 1797 and d.input_shape == (1, 8, 8)
    mnist1d = pytest.importorskip("mnist1d", reason="MNIST-1D needs the mnist1d package")
    import mnist1d.data
    # the download path is never taken, and the global generators are left as they were
    monkeypatch.setattr(mnist1d.data, "get_dataset",
                        lambda *a, **k: pytest.fail("mnist1d.get_dataset called"))
    monkeypatch.setattr(mnist1d.data.requests, "get",
                        lambda *a, **k: pytest.fail("network access"))
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    d = datasets.load("mnist1d", mnist1d_samples=200)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    assert d.input_shape == (1, 40) and len(d.y_train) == 160 and len(d.y_test) == 40
    assert set(d.y_train.tolist()) <= set(range(10))
    again = datasets.load("mnist1d", mnist1d_samples=200)
    assert torch.equal(again.x_train, d.x_train)          # generated from its own seed


# --------------------------------------------------------------------------- Table 1

def _run(method, regime, train, test, seed=0):
    return dict(dataset="d", model="m", method=method, regime=regime, batch_size=64, lr=0.1,
                seed=seed, history=[dict(epoch=i + 1, train_acc=a, test_acc=b)
                                    for i, (a, b) in enumerate(zip(train, test))])


def test_gap_at_threshold_on_hand_made_curves():
    train = [0.50, 0.80, 0.95, 0.99, 1.00]
    test = [0.45, 0.70, 0.78, 0.80, 0.79]
    # epochs with test > 0.75: 3 (gap 0.17), 4 (0.19), 5 (0.21)
    assert table1.gap_at_threshold(train, test, 0.75) == pytest.approx(0.17)
    # strictly above: 0.78 does not exceed 0.78
    assert table1.gap_at_threshold(train, test, 0.78) == pytest.approx(0.19)
    assert math.isnan(table1.gap_at_threshold(train, test, 0.80))
    # the minimum need not be the last or the best epoch
    assert table1.gap_at_threshold([0.9, 0.8, 0.95], [0.7, 0.75, 0.76], 0.6) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="length"):
        table1.gap_at_threshold([0.1], [0.1, 0.2], 0.0)


def test_auto_alpha_lies_strictly_below_every_best():
    assert table1.auto_alpha([0.873, 0.91]) == 0.87
    assert table1.auto_alpha([0.87, 0.95]) == 0.86     # exceed means strictly above
    assert table1.auto_alpha([0.30000000000000004]) == 0.3
    for _ in range(200):
        best = torch.rand(5).double().tolist()
        a = table1.auto_alpha(best)
        assert a < min(best) and min(best) - a <= 0.01 + 1e-12


def test_table_means_stds_bold_and_round_trip():
    runs = [_run("vanilla", "small", [0.6, 0.9], [0.5, 0.80], seed=0),
            _run("vanilla", "small", [0.6, 0.9], [0.5, 0.84], seed=1),
            _run("spectral", "small", [0.6, 0.88], [0.55, 0.85], seed=0),
            _run("spectral", "small", [0.6, 0.86], [0.55, 0.85], seed=1),
            _run("vanilla", "large", [0.5, 0.7], [0.4, 0.60]),
            _run("spectral", "large", [0.5, 0.9], [0.4, 0.65])]
    rows = {(r["regime"], r["method"]): r for r in table1.summarize(runs)}
    assert rows[("small", "vanilla")]["alpha"] == 0.79      # best test accs 0.80, 0.84, 0.85
    v = rows[("small", "vanilla")]
    assert v["test_acc_mean"] == pytest.approx(0.82)
    assert v["test_acc_std"] == pytest.approx(math.sqrt(2) * 0.02)   # sample std of 0.80, 0.84
    assert v["gap_mean"] == pytest.approx((0.10 + 0.06) / 2)
    s = rows[("small", "spectral")]
    assert s["gap_mean"] == pytest.approx(0.02) and s["gap_std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert rows[("large", "vanilla")]["alpha"] == 0.59
    md = table1.to_markdown(list(rows.values()))
    assert "| spectral | **0.850 ± 0.000** | **0.020 ± 0.014** | **0.650** | 0.250 |" in md
    assert "| vanilla | 0.820 ± 0.028 | 0.080 ± 0.028 | 0.600 | **0.100** |" in md
    back = {(r["regime"], r["method"]): r for r in table1.parse_markdown(md)}
    for k, r in rows.items():
        for f in ("test_acc_mean", "gap_mean"):
            assert abs(back[k][f] - r[f]) <= 5e-4 + 1e-12
    csv_back = {(r["regime"], r["method"]): r for r in table1.parse_csv(table1.to_csv(
        list(rows.values())))}
    assert all(csv_back[k]["gap_mean"] == r["gap_mean"] for k, r in rows.items())
    # a given alpha that a run never exceeds: no gap for it
    na = {(r["regime"], r["method"]): r for r in table1.summarize(runs, alpha=0.84)}
    assert na[("small", "vanilla")]["n_gap"] == 0 and math.isnan(na[("small", "vanilla")]["gap_mean"])
    assert "| vanilla | 0.820 ± 0.028 | n/a |" in table1.to_markdown(list(na.values()))


# --------------------------------------------------------------------------- models, methods

def test_models_on_images_and_sequences():
    for shape in ((3, 32, 32), (1, 8, 8), (1, 40)):
        for name in models.MODELS:
            m = models.build(name, shape, 7, width=0.25, vgg_config="8,M,16,M,16,M,16,M",
                             densenet_depth=10, densenet_growth=4)
            assert m(torch.randn(2, *shape)).shape == (2, 7)
    # DenseNet-40 (k = 12) on CIFAR-10: Huang et al. report 1.0M parameters
    n = sum(p.numel() for p in models.build("densenet", (3, 32, 32), 10).parameters())
    assert 0.95e6 <= n < 1.05e6
    with pytest.raises(ValueError, match="3n \\+ 4"):
        models.build("densenet", (3, 32, 32), 10, densenet_depth=41)
    with pytest.raises(ValueError, match="choices: vgg, nin, densenet"):
        models.build("resnet", (3, 32, 32), 10)


def test_adversarial_objective_on_a_linear_softmax_model():
    """Eq. 3 with eta = eps g / ||g||_2, against the closed-form input gradient of a linear
    softmax model, dL/dx_i = W^T (softmax(W x_i + b) - e_{y_i}) / B; eta is a constant."""
    lin = nn.Linear(6, 4).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    alpha, eps = 0.3, 0.7
    loss = paper.adversarial_loss(lin, x, y, alpha, eps)
    W, b = lin.weight.detach(), lin.bias.detach()
    p = torch.softmax(x @ W.T + b, 1)
    g = (p - F.one_hot(y, 4).double()) @ W / 5
    eta = eps * g / g.norm(dim=1, keepdim=True)
    ref = alpha * F.cross_entropy(lin(x), y) + (1 - alpha) * F.cross_entropy(lin(x + eta), y)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    got = torch.autograd.grad(loss, list(lin.parameters()))
    want = torch.autograd.grad(ref, list(lin.parameters()))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-14)
