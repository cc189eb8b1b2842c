"""The export's format, decided in one place for both paths that export: the export step at the end of fit
(``callbacks/export.py``) and ``python -m lm_lightning export`` on a saved checkpoint (``cli.py``).

The memory strategies are asked through their contract (``callbacks/strategy.py``); none is named here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional

from lm_lightning.errors import LMInputError
from lm_lightning.export.quantization import check_quantization

if TYPE_CHECKING:  # only the type: the callbacks package imports this module (through the Export callback)
    from lm_lightning.callbacks.strategy import MemoryStrategy

__all__ = ["DEFAULT_GROUP_SIZE", "EXPORT_FORMATS", "resolve_format", "strategy_metadata", "trains_for_export"]

DEFAULT_GROUP_SIZE = 32  # inputs per int4 scale when neither --export.group_size nor a strategy gives one
EXPORT_FORMATS = ("safetensors", "onnx")


def resolve_format(
    bits: Optional[int], group_size: Optional[int], strategies: Iterable[MemoryStrategy]
) -> tuple[Optional[int], int]:
    """``(bits, group_size)`` of the export: ``--export.bits`` / ``--export.group_size`` where given, else those of the
    strategy that trained the weights for an integer export (``export_quantization()``), else float32 and 32.

    ``--export.bits`` that differs from the bits a strategy trained for is refused: the weights were trained for one
    rounding and would be exported with another."""
    check_quantization(bits, group_size or DEFAULT_GROUP_SIZE)
    trained = [(s, q) for s in strategies if (q := s.export_quantization()) is not None]
    if len(trained) > 1:
        names = " and ".join(f"{type(s).__name__} ({s.name})" for s, _ in trained)
        raise LMInputError(f"{names} both train the weights for an integer export: keep one of them.")
    if not trained:
        return bits, group_size or DEFAULT_GROUP_SIZE
    strategy, (trained_bits, trained_group_size) = trained[0]
    who = f"{type(strategy).__name__} ({strategy.name})"
    if bits is not None and bits != trained_bits:
        raise LMInputError(
            f"--export.bits {bits} differs from the int{trained_bits} that {who} trains for: drop --export.bits "
            f"(the export follows {type(strategy).__name__}) or change the bits of {who}."
        )
    return trained_bits, group_size or trained_group_size


def trains_for_export(strategies: Iterable[MemoryStrategy]) -> bool:
    """A strategy trains for its export (pruned zeros, integer rounding): the export step then runs by default."""
    return any(s.trains_for_export for s in strategies)


def strategy_metadata(strategies: Iterable[MemoryStrategy]) -> dict[str, dict[str, Any]]:
    """What the manifest records about the run's strategies: ``{strategy.name: strategy.export_metadata()}``."""
    return {s.name or type(s).__name__: s.export_metadata() for s in strategies}
