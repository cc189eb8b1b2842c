"""The export's bits and group size, decided once (export/settings.py) from --export.* and the strategies' contract."""

import pytest

from lm_lightning.callbacks.accumulation import MicroBatchAccumulation
from lm_lightning.callbacks.pruning import MagnitudePruning
from lm_lightning.callbacks.quantization import QuantizationAwareFinishing
from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError
from lm_lightning.export.settings import resolve_format, strategy_metadata, trains_for_export


class RoundsToInt8(MemoryStrategy):
    """A fork's strategy, unknown to lm_lightning: it is asked through the contract like the template's."""

    name = "rounds"
    trains_for_export = True

    def export_quantization(self) -> tuple[int, int]:
        return 8, 64

    def export_metadata(self) -> dict:
        return {"why": "fork"}


def test_the_flags_decide_without_a_strategy_that_trained_for_integers():
    assert resolve_format(None, None, []) == (None, 32)
    assert resolve_format(8, None, [MicroBatchAccumulation(micro_batch_size=2)]) == (8, 32)
    assert resolve_format(4, 16, [MagnitudePruning(sparsity=0.5)]) == (4, 16)


def test_a_strategy_that_trained_for_integers_gives_its_format_unless_the_flags_say_otherwise():
    qat = QuantizationAwareFinishing(bits=4, group_size=8)
    assert resolve_format(None, None, [qat]) == (4, 8)
    assert resolve_format(4, 16, [qat]) == (4, 16)  # the group size is the flag's when given
    assert resolve_format(None, None, [RoundsToInt8()]) == (8, 64)
    with pytest.raises(LMInputError) as error:
        resolve_format(8, None, [qat])
    assert str(error.value) == (
        "--export.bits 8 differs from the int4 that QuantizationAwareFinishing (qat) trains for: drop --export.bits "
        "(the export follows QuantizationAwareFinishing) or change the bits of QuantizationAwareFinishing (qat)."
    )
    with pytest.raises(LMInputError, match=r"QuantizationAwareFinishing \(qat\) and RoundsToInt8 \(rounds\) both train"):
        resolve_format(None, None, [qat, RoundsToInt8()])


def test_the_manifest_records_each_strategy_under_its_name_and_training_for_export_turns_the_step_on():
    strategies = [MagnitudePruning(sparsity=0.5), RoundsToInt8(), MicroBatchAccumulation(micro_batch_size=2)]
    recorded = strategy_metadata(strategies)
    assert list(recorded) == ["pruning", "rounds", "micro_batches"] and recorded["rounds"] == {"why": "fork"}
    assert trains_for_export(strategies) and not trains_for_export([MicroBatchAccumulation(micro_batch_size=2)])
