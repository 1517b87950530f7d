"""benchmarks/conv_operator.py (make bench-conv) runs, on the digits CNN only (seconds)."""

from torch import nn

from .conv_operator import MODELS, build, main


def test_conv_operator_benchmark_runs(capsys):
    main(["--what", "sigmas,digits,cost", "--models", "digits", "--cost-models", "digits",
          "--epochs", "1", "--rounds", "1"])
    text = capsys.readouterr().out
    assert "== digits, random init (seed 0), input (1, 8, 8) ==" in text
    assert text.count("3 convs; operator / matricized sigma: min ") == 4   # init + 3 trained
    assert "conv_norm='operator', lam=0.03" in text
    assert "\ndigits           3 " in text                                  # the cost row


def test_the_networks_match_the_benchmark_weight_sets():
    """vgg16-cifar and resnet50 are the networks of benchmarks/models.py's shape sets."""
    from .models import resnet50, vgg16_cifar
    for name, shapes in (("vgg16-cifar", vgg16_cifar()), ("resnet50", resnet50())):
        model, _, _ = build(name)
        mine = [tuple(m.weight.shape) for m in model.modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert sorted(mine) == sorted(shapes), name
    assert set(MODELS) == {"vgg16-cifar", "resnet50", "digits"}
