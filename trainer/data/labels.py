"""Checks on what a source's labels are, the same for every source kind: class names that can be told apart.

NFC and NFD spell an accented name with different code points (`é` or `e` + a combining accent): macOS writes folder
names decomposed, most editors type them composed. Two classes whose names differ only so would print the same and
split one class's images in two.
"""

from __future__ import annotations

import unicodedata

from trainer.config import UserError


def check_class_names(class_names: list[str], source: str) -> None:
    """Refuse (one line) class names that differ only in Unicode normalisation (NFC vs NFD)."""
    seen: dict[str, str] = {}
    for name in class_names:
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            raise UserError(
                f"{source}: classes {seen[key]!r} and {name!r} are one name spelt two ways in Unicode (composed and "
                f"decomposed accents, {seen[key]!a} vs {name!a}); rename one to match the other"
            )
        seen[key] = name
