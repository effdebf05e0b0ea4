"""Class identity: two class lists agree only as the same synsets in the same order."""

import pytest

from tfrecords import classes


def test_class_lists_must_be_the_same_synsets_in_the_same_order():
    classes.check_same_classes(["n1", "n2"], ("n1", "n2"), "the model", "recs")
    with pytest.raises(classes.ClassMismatch, match=r"^the model has 2 classes, recs has 3$"):
        classes.check_same_classes(["n1", "n2"], ["n1", "n2", "n3"], "the model", "recs")
    with pytest.raises(classes.ClassMismatch, match=r"label 1 is n2 in the model, n9 in recs$"):
        classes.check_same_classes(["n1", "n2"], ["n1", "n9"], "the model", "recs")


@pytest.mark.parametrize("text, found", [("tench", None), ("caf\u00e9 \U0001F41F", None), ("a\tb", "U+0009"),
                                         ("a\u2028b", "U+2028"), ("\x85", "U+0085"), ("\ud800", "U+D800")])
def test_control_character_names_the_first_one_a_class_may_not_hold(text, found):
    assert classes.control_character(text) == found
