"""`model_info.json` as one typed object: the network and input a run's weights belong to.

A training run writes it beside its checkpoints (with the mean it subtracts,
`mean_image.npy`); an export, `evaluate`, the report and a resumed run read it.
A missing key or a value of the wrong type stops with the file's path, the
field and the value found (`ModelInfoError`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from tfrecords import checked_json
from tfrecords.classes import ClassInfo

MEAN_KINDS = ("image", "rgb")


class ModelInfoError(ValueError):
    """A `model_info.json` that is not one: names the file, the field and the value found."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What an export needs besides a run's weights.

    Attributes:
      num_classes: The network's outputs, `len(classes)`.
      grouped: conv2, conv4 and conv5 in the paper's two groups (§3.2).
      dropout: fc6's and fc7's dropout rate.
      classes: In label order, as the run's records had them.
      mean: What is subtracted from every input: "image" (the mean image,
        §2) or "rgb" (the mean colour).
      mean_file: The mean's file in the model folder.
      square_size: The side of the records' stored squares (256 in the paper).
      recipe: The training recipe; None in folders written before runs kept it.
    """

    num_classes: int
    grouped: bool
    dropout: float
    classes: tuple[ClassInfo, ...]
    mean: str
    mean_file: str
    square_size: int
    recipe: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def synsets(self) -> tuple[str, ...]:
        """The classes' WordNet ids in label order."""
        return tuple(c.synset for c in self.classes)

    def to_json(self) -> dict:
        """The file's object, in the order its keys have always been written."""
        obj = {"num_classes": self.num_classes, "grouped": self.grouped, "dropout": self.dropout,
               "classes": [c.to_json() for c in self.classes], "mean": self.mean, "mean_file": self.mean_file,
               "square_size": self.square_size}
        if self.recipe:
            obj["recipe"] = self.recipe
        return obj

    @classmethod
    def from_json(cls, obj: Mapping, path: str) -> ModelInfo:
        """Reads the file's object, checking every field.

        Raises:
          ModelInfoError: A key is missing or of the wrong type, the class list
            is not in label order, or `num_classes` is not its length.
        """
        top = checked_json.Fields(obj, "", path, ModelInfoError)
        classes = tuple(ClassInfo(c.integer("label"), c.string("synset"), c.string("name"))
                        for c in top.objects("classes"))
        for i, c in enumerate(classes):
            if c.label != i:
                top.fail(f"classes[{i}].label", f"{i} (labels are positions in the list)", c.label)
        num_classes = top.integer("num_classes")
        if num_classes != len(classes):
            top.fail("num_classes", f"the length of classes ({len(classes)})", num_classes)
        mean = top.string("mean")
        if mean not in MEAN_KINDS:
            top.fail("mean", " or ".join(f'"{k}"' for k in MEAN_KINDS), mean)
        recipe = top.get("recipe", None)
        if recipe is not None and type(recipe) is not str:
            top.fail("recipe", "a string", recipe)
        return cls(num_classes, top.boolean("grouped"), top.number("dropout"), classes, mean,
                   top.string("mean_file"), top.integer("square_size"), recipe)
