"""The three splits, and how one text is dealt into them.

Splits of a single text are deterministic: paragraphs (or lines, for text with few blank lines) are dealt in order,
each to valid or test whenever that split falls half a block behind its share. Neighbouring text stays together
inside a block, and all three splits sample the whole text rather than its start or end.
"""

from __future__ import annotations

from lm_lightning.errors import LMInputError

SPLITS = ("train", "valid", "test")


def split_documents(
    blocks: list[str], valid_fraction: float, test_fraction: float, separator: str = "\n"
) -> tuple[str, str, str]:
    """Deal blocks in order: a block goes to valid (or test) once that split is half a block behind its share.

    Deterministic, within one block of the asked fractions at every prefix, and interleaved through the text.
    """
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 0.5:
            raise LMInputError(f"{name} must be in (0, 0.5), got {value}.")
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    shares = {"valid": valid_fraction, "test": test_fraction}
    for i, block in enumerate(blocks):
        behind = {name: share * (i + 1) - len(splits[name]) for name, share in shares.items()}
        name = max(behind, key=behind.__getitem__)  # ties go to valid
        splits[name if behind[name] >= 0.5 else "train"].append(block)
    if not splits["valid"] or not splits["test"]:
        raise LMInputError(
            f"The text has only {len(blocks)} paragraphs or lines, too few to split off validation and test "
            "text: give a longer text or a folder with train.txt, valid.txt and test.txt."
        )
    return separator.join(splits["train"]), separator.join(splits["valid"]), separator.join(splits["test"])


def paragraphs_of(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def blocks_of(text: str) -> tuple[list[str], str]:
    """Paragraphs (blank-line separated), or lines if the text has too few paragraphs; and how to rejoin them."""
    paragraphs = paragraphs_of(text)
    if len(paragraphs) >= 40:
        return paragraphs, "\n\n"
    return [line for line in text.splitlines() if line.strip()], "\n"
