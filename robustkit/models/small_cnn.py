"""Small CNNs: alpha-beta-CROWN's verification models, a MNIST CNN and the ``digits`` CNN.

The alpha-beta-CROWN models are plain ``nn.Sequential`` stacks with exactly the layer order of
``complete_verifier/model_defs.py`` (parameter keys ``0.``, ``2.``, ``5.``, ``7.``), so the
published checkpoints load strictly. Default normalizations are those the checkpoints were
trained with.
"""

from __future__ import annotations

from torch import nn

from robustkit.models.zoo import register_model


def _conv_stack(
    in_channels: int,
    c1: int,
    c2: int,
    kernel: int,
    padding: int,
    flat: int,
    hidden: int,
    num_classes: int,
) -> nn.Sequential:
    """Conv-ReLU-Conv-ReLU-Flatten-Linear-ReLU-Linear, both convs stride 2."""
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, kernel, stride=2, padding=padding),
        nn.ReLU(),
        nn.Conv2d(c1, c2, kernel, stride=2, padding=padding),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cifar_conv_small(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """ERAN's ConvSmall for CIFAR-10 (alpha-beta-CROWN ``cifar_conv_small``), 32x32 inputs."""
    return _conv_stack(in_channels, 16, 32, 4, 0, 32 * 6 * 6, 100, num_classes)


def mnist_cnn_a(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """CNN-A of the SDP-FO paper (alpha-beta-CROWN ``mnist_cnn_4layer``), 28x28 inputs."""
    return _conv_stack(in_channels, 16, 32, 4, 1, 32 * 7 * 7, 100, num_classes)


def mnist_madry_tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """alpha-beta-CROWN ``MadryCNN_no_maxpool_tiny``, 28x28 inputs."""
    return _conv_stack(in_channels, 4, 8, 5, 2, 8 * 7 * 7, 128, num_classes)


def mnist_smallcnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """A typical two-conv MNIST CNN (0.42M parameters), quick to train adversarially on CPU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """CNN for the embedded 8x8 ``digits`` dataset; robustkit ships trained weights for it."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


_MNIST = (1, 28, 28)
register_model(
    "cifar-conv-small",
    cifar_conv_small,
    input_size=(3, 32, 32),
    normalize="0.4914,0.4822,0.4465:0.2023,0.1994,0.2010",
    aliases=("cifar_conv_small",),
    description="ERAN ConvSmall for CIFAR-10 (alpha-beta-CROWN cifar_conv_small)",
)
register_model(
    "mnist-cnn-a",
    mnist_cnn_a,
    normalize=None,
    input_size=_MNIST,
    aliases=("mnist_cnn_4layer", "mnist-cnn-4layer"),
    description="MNIST CNN-A, 4 layers (alpha-beta-CROWN mnist_cnn_4layer)",
)
register_model(
    "mnist-madry-tiny",
    mnist_madry_tiny,
    normalize=None,
    input_size=_MNIST,
    aliases=("madrycnn_no_maxpool_tiny",),
    description="Tiny Madry-style MNIST CNN without max-pool (alpha-beta-CROWN)",
)
register_model(
    "mnist-smallcnn",
    mnist_smallcnn,
    normalize=None,
    input_size=_MNIST,
    aliases=("mnist_smallcnn", "smallcnn"),
    description="Two-conv MNIST CNN with max-pooling, for training",
)
register_model(
    "digits-cnn",
    digits_cnn,
    normalize=None,
    input_size=(1, 8, 8),
    aliases=("digits_cnn",),
    description="Small CNN for the 8x8 digits dataset (packaged weights when available)",
)
