"""Model-zoo vocabulary: what a registry entry says about a model, and the loaded-model wrapper.

Each architecture module registers :class:`ModelInfo` entries in ``robustkit.registry.MODELS``
with :func:`register_model`; :class:`ZooModel` is what ``load_model`` returns.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from robustkit.models.normalize import Normalize
from robustkit.registry import MODELS


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry: how to build the network and what input it expects.

    ``factory(num_classes=..., in_channels=...)`` returns the bare network (logits, no
    normalization); ``normalize`` is the default normalization spec (see ``parse_normalize``)
    the published weights for this architecture expect, ``None`` for raw [0, 1] inputs.
    """

    factory: Callable[..., nn.Module]
    normalize: str | None
    input_size: tuple[int, int, int]
    num_classes: int
    description: str


def register_model(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    normalize: str | None,
    input_size: tuple[int, int, int],
    num_classes: int = 10,
    description: str,
    aliases: tuple[str, ...] = (),
) -> ModelInfo:
    """Register an architecture in ``MODELS`` under ``name`` (and ``aliases``)."""
    info = ModelInfo(factory, normalize, input_size, num_classes, description)
    return MODELS.register(name, aliases=aliases)(info)


class ZooModel(nn.Sequential):
    """``Sequential(normalize, net)`` (or just ``net``) with the zoo name and entry attached.

    Children are named ``normalize`` (when present) and ``net``, so ``state_dict()`` keys read
    ``normalize.mean`` and ``net.conv1.weight``; save ``model.net.state_dict()`` to get plain
    network keys (``load_model`` accepts either form).
    """

    def __init__(
        self,
        name: str,
        info: ModelInfo,
        net: nn.Module,
        normalize: Normalize | None = None,
        checkpoint: str | None = None,
    ):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if normalize is not None:
            layers["normalize"] = normalize
        layers["net"] = net
        super().__init__(layers)
        self.name = name
        self.info = info
        self.checkpoint = checkpoint

    net: nn.Module  # registered child; declared for type checkers and readers

    @property
    def normalization(self) -> Normalize | None:
        """The Normalize first layer (child ``normalize``), or ``None`` for raw inputs."""
        return self._modules.get("normalize")  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
