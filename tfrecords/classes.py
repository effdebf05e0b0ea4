"""Class identity: a class's label, synset and name, and the check that two class lists are the same.

Labels are positions in the class list, so a model and a set of records (or
two runs) agree only when their lists are the same synsets in the same order.
"""

from __future__ import annotations

import dataclasses
import unicodedata

from tfrecords.checked_json import Flat


@dataclasses.dataclass(frozen=True)
class ClassInfo(Flat):
    """One class: its 0-based label (position in `classes`), WordNet id and name."""

    label: int
    synset: str
    name: str


# Unicode categories a class's synset or name may not hold: control characters
# (tab, newline, ...), lone surrogates, line and paragraph separators. Class
# lists are written one class a line, tab-separated (the exported model's
# class table), so each must be one line of text.
_NOT_IN_CLASS_TEXT = ("Cc", "Cs", "Zl", "Zp")


def control_character(text: str) -> str | None:
    """The first character of `text` a synset or class name may not hold, as U+XXXX, or None."""
    for ch in text:
        if unicodedata.category(ch) in _NOT_IN_CLASS_TEXT:
            return f"U+{ord(ch):04X}"
    return None


class ClassMismatch(ValueError):
    """A model and a set of records (or two runs) have different class lists."""


def check_same_classes(model_synsets, records_synsets, model: str, data: str) -> None:
    """Raises `ClassMismatch` unless the two class lists are the same synsets in the same order.

    Labels are positions in the list: the same count of other classes, or the
    same classes in another order, would pair every output with the wrong
    class without any other error.

    Args:
      model_synsets, records_synsets: Synsets in label order.
      model, data: How to name each side in the message.
    """
    model_synsets, records_synsets = list(model_synsets), list(records_synsets)
    if model_synsets == records_synsets:
        return
    if len(model_synsets) != len(records_synsets):
        raise ClassMismatch(f"{model} has {len(model_synsets)} classes, {data} has {len(records_synsets)}")
    differ = [i for i, (a, b) in enumerate(zip(model_synsets, records_synsets)) if a != b]
    i = differ[0]
    more = f" (and {len(differ) - 1} more labels differ)" if len(differ) > 1 else ""
    raise ClassMismatch(f"{model} and {data} have different classes: label {i} is {model_synsets[i]} in "
                        f"{model}, {records_synsets[i]} in {data}{more}")
