"""Tests of `pipelines.class_labels`: validation label files in UTF-8 or UTF-16 with its mark, and what is refused."""

from __future__ import annotations

import pytest

from pipelines import class_labels


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le-bom"])
def test_a_label_file_with_a_byte_order_mark_is_read(sample, tmp_path, encoding):
    text = open(sample["val_labels"]).read()
    path = tmp_path / "labels.txt"
    if encoding == "utf-16-le-bom":
        path.write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    else:
        path.write_bytes(text.encode(encoding))
    assert class_labels.read_val_labels(str(path)) == text.split()


@pytest.mark.parametrize(
    "data, match",
    [
        (b"n01440764\nn02102040\n\x89PNG\r\n\x1a\n\xff\xd8\xff", r"labels.txt:3: not UTF-8 text \(byte 0x89\)"),
        (b"n01440764\n\x00\x01\x02binary", r"labels.txt:2: a NUL byte, not text"),
        ("n01440764\n".encode("utf-16-le"), r"labels.txt:1: a NUL byte, not text \(UTF-16 needs its byte-order mark\)"),
        (b"\xff\xfe" + "n01440764\n".encode("utf-16-le") + b"\x00\xd8", r"labels.txt:2: not UTF-16 text"),
    ],
    ids=["binary", "nul", "utf-16-without-mark", "broken-utf-16"],
)
def test_a_label_file_that_is_not_text_is_one_line_naming_the_line(tmp_path, data, match):
    path = tmp_path / "labels.txt"
    path.write_bytes(data)
    with pytest.raises(class_labels.LayoutError, match=match) as e:
        class_labels.read_val_labels(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_label_file_over_the_bound_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(class_labels, "MAX_LABEL_FILE_BYTES", 100, raising=False)
    path = tmp_path / "labels.txt"
    path.write_bytes(b"n01440764\n" * 11)
    with pytest.raises(class_labels.LayoutError, match="is over 100 bytes: not a label file"):
        class_labels.read_val_labels(str(path))
