"""docs/performance.md says what benchmarks/results/*.json say."""

from __future__ import annotations

import copy
import os
import re

import pytest

from benchmarks import tables


@pytest.fixture(scope="module")
def page() -> str:
    with open(tables.PAGE) as f:
        return f.read()


@pytest.fixture(scope="module")
def results() -> dict:
    return tables.load()


def test_every_generated_table_matches_its_json(page, results):
    stale = tables.stale_blocks(page, results)
    assert not stale, f"docs/performance.md disagrees with benchmarks/results for {stale}: python -m benchmarks.tables"


def test_every_table_and_every_result_file_is_on_the_page(page, results):
    blocks = [m.group(2) for m in tables.BLOCK.finditer(page)]
    assert sorted(blocks) == sorted(tables.TABLES), "each table once, and no block without a table"
    unnamed = [name for name in results if f"benchmarks/results/{name}" not in page]
    assert not unnamed, f"result files the page never names: {unnamed}"


def test_a_changed_number_makes_its_block_stale(page, results):
    changed = copy.deepcopy(results)
    changed["loop-cpu.json"]["images_per_second"]["ours"] *= 2
    assert tables.stale_blocks(page, changed) == ["loop"]
    changed = copy.deepcopy(results)
    changed["build.json"]["dask"]["ratio"] = 0.5
    assert tables.stale_blocks(page, changed) == ["dask"]


def test_the_page_is_rewritten_in_place_and_hand_text_is_kept(tmp_path, page, results):
    emptied = re.sub(r"(<!-- generated: [\w-]+ -->\n).*?(<!-- end -->)", r"\1\2", page, flags=re.S)
    assert emptied != page
    path = tmp_path / "performance.md"
    path.write_text(emptied)
    assert tables.main(["--check", "--page", str(path)]) == 1
    assert tables.main(["--page", str(path)]) == 0
    assert path.read_text() == page
    assert tables.main(["--check", "--page", str(path)]) == 0


def test_each_table_says_what_its_json_does_not_record():
    line = tables.provenance({"cores": 2}, "x.json")
    assert "date not recorded" in line and "commit not recorded" in line and "GPU not recorded" in line
    assert "AVX512_BF16): not recorded" in line
    line = tables.provenance({"date": "2026-12-01T00:00:00Z", "device": {"count": 1, "name": "H200"},
                              "machine": {"cores": 16, "commit": "abc1234",
                                          "cpu": {"model": "Xeon", "avx512": True, "avx512_bf16": False}}}, "g.json")
    assert "date 2026-12-01" in line and "1x H200" in line and "commit abc1234" in line
    assert "AVX-512: yes, AVX512_BF16: no" in line


def test_an_unknown_block_is_an_error(results):
    with pytest.raises(KeyError, match="nope"):
        tables.render("<!-- generated: nope -->\n<!-- end -->\n", results)


def test_no_gpu_result_is_said_in_words(results):
    without = {k: v for k, v in results.items() if not k.startswith("gpu-")}
    assert "nothing here is measured on a GPU" in tables.gpu(without)


def test_the_generator_and_this_file_stay_short():
    for path in (tables.__file__, __file__):
        assert sum(1 for _ in open(path)) <= 450, os.path.basename(path)
