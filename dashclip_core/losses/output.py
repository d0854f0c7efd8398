"""The value every loss in :mod:`dashclip_core.losses` returns (LAVIS ``BlipOutput`` style)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class LossOutput:
    """A scalar to backpropagate plus named, detached components to log.

    Attributes:
        loss: scalar Tensor, attached to the graph; call ``.backward()`` on it.
        parts: detached scalar Tensors, logged as ``train/<name>`` (e.g. ``loss_itc``, ``scale``). They are
            detached again in ``__post_init__``, so logging them never keeps a graph alive.
    """

    loss: Tensor  # () scalar to backprop
    parts: dict[str, Tensor]  # name -> () detached

    def __post_init__(self) -> None:
        self.parts = {name: value.detach() for name, value in self.parts.items()}
