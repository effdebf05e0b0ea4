"""The export folder: what is replaced, what is refused, and an export interrupted at any point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import export, export_folder
from conftest import cli as _cli
from export_checks import (run_main as _main, tiny_export as _tiny_export, tiny_info as _tiny_info,
                           tiny_model as _tiny_model)


@pytest.fixture
def tiny_run(monkeypatch):
    """Makes `export.main` find the tiny model in any --model_dir (as if trained there)."""
    info, model = _tiny_info(), _tiny_model()
    monkeypatch.setattr(export.run_dir, "load_trained_model", lambda *a: (model, info, np.full(3, 120.0)))
    return model, info


def _tree(path):
    """{relative path: bytes} of every file under `path`."""
    return {os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(path) for f in files}


def test_export_refuses_a_folder_holding_other_files_and_keeps_them(tmp_path, capsys, tiny_run):
    target = tmp_path / "models"
    target.mkdir()
    (target / "other_model.h5").write_bytes(b"someone else's weights")
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("keep me")
    before = _tree(target)
    code, out, err = _main(export, ["--model_dir", str(tmp_path / "run"), "--export_dir", str(target)], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"export: error: {target} is not empty (notes, other_model.h5) and is not a SavedModel "
                             "written by alexnet_tf.export")
    assert _tree(target) == before
    assert sorted(os.listdir(tmp_path)) == ["models"]  # No temporary folder either.
    with pytest.raises(export_folder.ExportError, match="is not empty"):  # The library call refuses the same.
        _tiny_export(target)
    assert _tree(target) == before


def test_export_to_the_current_folder_is_refused_and_its_files_kept(tmp_path, capsys, monkeypatch, tiny_run):
    (tmp_path / "data.csv").write_text("1,2,3\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print('hi')\n")
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    for where in (".", str(tmp_path), "src/.."):
        code, out, err = _main(export, ["--model_dir", "../run", "--export_dir", where], capsys)
        assert code == 1 and len(err) == 1 and err[0].startswith(f"export: error: --export_dir {where} is the "
                                                                 "current folder or holds it"), err
        assert _tree(tmp_path) == before
    # An empty current folder too: replacing it would leave the shell in a removed folder.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code, _, err = _main(export, ["--model_dir", "../run", "--export_dir", "."], capsys)
    assert code == 1 and "is the current folder" in err[0] and os.listdir(empty) == []


def test_export_replaces_an_earlier_export_whole(tmp_path, capsys, monkeypatch):
    target = tmp_path / "exported"
    _tiny_export(target)
    (target / "assets" / "stale.txt").write_text("from the earlier export")
    assert export_folder.is_export(str(target))
    info = _tiny_info([{"label": i, "synset": f"n1000000{i}", "name": f"new {i}"} for i in range(4)])
    model = _tiny_model(4)
    monkeypatch.setattr(export.run_dir, "load_trained_model", lambda *a: (model, info, np.full(3, 120.0)))
    export.main(["--model_dir", "run", "--export_dir", str(target)])  # Success returns (no SystemExit).
    assert "export: wrote" in capsys.readouterr().out
    assert not (target / "assets" / "stale.txt").exists()
    assert export.read_class_synsets(str(target)) == [f"n1000000{i}" for i in range(4)]
    loaded = tf.saved_model.load(str(target))
    assert loaded.preprocessed(tf.zeros([1, 227, 227, 3]))["logits"].shape == (1, 4)
    assert sorted(os.listdir(tmp_path)) == ["exported"]  # Nothing left beside it.
    # An empty folder is filled.
    (tmp_path / "empty").mkdir()
    _tiny_export(tmp_path / "empty")
    assert export_folder.is_export(str(tmp_path / "empty"))


class _Killed(BaseException):
    """Stands for kill -9 in the middle of the swap: nothing after it runs (no clean-up either)."""


def _fake_export(path, tag):
    """A folder with an export's marks (saved_model.pb, assets/classes.tsv) and `tag` in its files."""
    os.makedirs(os.path.join(path, "assets"))
    os.makedirs(os.path.join(path, "variables"))
    for name in ("saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001"):
        with open(os.path.join(path, name), "w") as f:
            f.write(f"{tag} {name}")
    with open(os.path.join(path, "assets", export_folder.CLASSES_ASSET), "w") as f:
        f.write(f"0\t{tag}\tname\n")
    return _tree(path)


def _killing_after(n, monkeypatch):
    """Makes the swap's renames, exchanges and deletions die (_Killed) after the first `n` of them."""
    done = []
    for obj, name in ((tf.io.gfile, "rename"), (tf.io.gfile, "rmtree"), (export_folder, "_exchange")):
        real = getattr(obj, name)

        def step(*args, _real=real, **kwargs):
            if len(done) >= n:
                raise _Killed
            done.append(args)
            return _real(*args, **kwargs)

        monkeypatch.setattr(obj, name, step)
    return done


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_kill_at_any_point_of_the_swap_leaves_a_whole_export(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(export_folder, "_exchange", lambda a, b: False)
    elif not export_folder._exchange(str(tmp_path), str(tmp_path)):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or filesystem")
    steps = None
    for n in range(10):
        case = tmp_path / str(n)
        target, tmp = str(case / "exported"), str(case / f"exported.tmp-{os.getpid()}")
        old, new = _fake_export(target, "old"), _fake_export(tmp, "new")
        with monkeypatch.context() as m:
            done = _killing_after(n, m)
            try:
                export_folder.swap_in(tmp, target)
                steps = len(done)
            except _Killed:
                pass
        # Right after the kill: the old or the new export at the target, or (only between the
        # fallback's two renames) none there and the old one put back by the next export.
        if not os.path.exists(target):
            assert not exchange and export_folder.recover(target) is not None
        assert _tree(target) in (old, new), n
        # The next export tidies what the killed one left.
        export_folder.recover(target)
        assert sorted(os.listdir(case)) == ["exported"] and _tree(target) in (old, new), (n, os.listdir(case))
        if steps is not None:
            assert _tree(target) == new
            break
    # The exchange and the deletion; or the exchange tried, two renames and the deletion.
    assert steps == (2 if exchange else 4)


def test_the_exchange_is_atomic_on_this_system(tmp_path):
    a, b = _fake_export(str(tmp_path / "a"), "a"), _fake_export(str(tmp_path / "b"), "b")
    if not export_folder._exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or filesystem")
    assert _tree(str(tmp_path / "a")) == b and _tree(str(tmp_path / "b")) == a


def test_recover_leaves_folders_that_are_not_an_exports_leftovers(tmp_path):
    target = str(tmp_path / "exported")
    _fake_export(target, "current")
    mine = tmp_path / "exported.tmp-1"  # A user's folder that happens to have the temporary name.
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    dead = 2 ** 22 + 1  # Above Linux's pid_max: no such process.
    leftover = tmp_path / f"exported.tmp-{dead}"
    _fake_export(str(leftover), "half")
    export_folder.recover(target)
    assert (mine / "thesis.tex").read_text() == "keep" and not leftover.exists()


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    # As TensorFlow's SaveV2 says it (TF 2.21, a full tmpfs).
    tf.errors.ResourceExhaustedError(None, None, "{{function_node __wrapped__SaveV2_dtypes_37_device_/job:localhost/"
                                     "replica:0/task:0/device:CPU:0}} /x/exported.tmp-1/variables/variables_temp/"
                                     "part-00000-of-00001.data-00000-of-00001.tempstate1; No space left on device "
                                     "[Op:SaveV2]")], ids=["OSError", "tf.errors"])
def test_a_full_disk_is_one_line_and_keeps_the_earlier_export(tmp_path, capsys, monkeypatch, tiny_run, error):
    import errno

    assert errno.ENOSPC == 28
    target = tmp_path / "exported"
    _tiny_export(target)
    before = _tree(target)

    def full_disk(obj, path, *args, **kwargs):  # Part of the SavedModel written, then the disk is full.
        os.makedirs(os.path.join(path, "variables"))
        with open(os.path.join(path, "variables", "variables.data-00000-of-00001"), "wb") as f:
            f.write(b"\0" * 1000)
        raise error

    monkeypatch.setattr(tf.saved_model, "save", full_disk)  # What Keras' ExportArchive.write_out calls.
    code, out, err = _main(export, ["--model_dir", "run", "--export_dir", str(target)], capsys)
    assert code == 1 and err == [f"export: error: cannot write the SavedModel for {target} (No space left on "
                                 "device); the earlier SavedModel there is unchanged"]
    assert _tree(target) == before and sorted(os.listdir(tmp_path)) == ["exported"]  # The temporary folder is gone.
    # A first export: nothing at all is left.
    code, out, err = _main(export, ["--model_dir", "run", "--export_dir", str(tmp_path / "new")], capsys)
    assert code == 1 and "No space left on device" in err[0] and sorted(os.listdir(tmp_path)) == ["exported"]


def test_weights_that_are_not_finite_are_not_exported(tmp_path, capsys, tiny_run):
    model, info = tiny_run
    bias = model.get_layer("fc8").bias
    bias.assign([0.0, np.nan, np.inf])
    with pytest.raises(export_folder.NonFiniteWeights, match=r"fc8/bias holds 1 NaN and 1 infinite values \(of 3\)"):
        _tiny_export(tmp_path / "new", model, info)
    assert os.listdir(tmp_path) == []
    earlier = tmp_path / "exported"
    _tiny_export(earlier)
    before = _tree(earlier)
    for target in (tmp_path / "new", earlier):
        code, out, err = _main(export, ["--model_dir", "run", "--export_dir", str(target)], capsys)
        assert code == 1 and err == ["export: error: the model's weights are not all finite: fc8/bias holds 1 NaN "
                                     "and 1 infinite values (of 3); the run diverged, export a checkpoint from "
                                     "before it (--checkpoint)"]
        assert sorted(os.listdir(tmp_path)) == ["exported"] and _tree(earlier) == before
    # The first one named: conv1's kernel comes before fc8's bias.
    model.get_layer("fc8").kernel.assign(np.full((3, 3), np.nan))
    with pytest.raises(export_folder.NonFiniteWeights, match=r"fc8/kernel holds 9 NaN"):
        export_folder.check_finite(model)
    with pytest.raises(export_folder.NonFiniteWeights, match="the mean image holds 1 NaN"):
        export_folder.check_finite(_tiny_model(), np.array([1.0, np.nan, 2.0]))


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_an_export_killed_at_any_step_leaves_an_export_in_place(tmp_path, monkeypatch, exchange):
    """The whole export() over an earlier export, killed after 0, 1, 2, ... of its renames and deletions."""
    import shutil

    if not exchange:
        monkeypatch.setattr(export_folder, "_exchange", lambda a, b: False)
    target, earlier = tmp_path / "exported", tmp_path / "earlier"
    old_synsets, new_synsets = [f"n2000000{i}" for i in range(3)], [f"n0000000{i}" for i in range(3)]
    _tiny_export(earlier, info=_tiny_info([{"label": i, "synset": s, "name": s} for i, s in enumerate(old_synsets)]))
    model = _tiny_model()
    for n in range(6):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(earlier, target)
        with monkeypatch.context() as m:
            _killing_after(n, m)
            try:
                _tiny_export(target, model)
                finished = True
            except _Killed:
                finished = False
        export_folder.recover(str(target))  # What the next export does first.
        assert export_folder.is_export(str(target)) and export._missing_part(str(target)) is None, n
        assert export.read_class_synsets(str(target)) in ([old_synsets] if n == 0 else [old_synsets, new_synsets])
        assert sorted(os.listdir(tmp_path)) == ["earlier", "exported"], n
        if finished:
            break
    assert finished and export.read_class_synsets(str(target)) == new_synsets
    loaded = tf.saved_model.load(str(target))  # Whole: it loads and answers.
    assert loaded.preprocessed(tf.zeros([1, 227, 227, 3]))["logits"].shape == (1, 3)


@pytest.mark.slow
def test_training_refuses_at_start_a_saved_model_folder_holding_other_files(built, tmp_path):
    out, _ = built
    folder = tmp_path / "run" / "saved_model"
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("not an export")
    r = _cli("alexnet_tf.train", "--preset=sample", f"--data_dir={out}", f"--model_dir={tmp_path / 'run'}",
             "--strategy=one_device", "--epochs=1", "--steps_per_epoch=1", "--batch_size=8")
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (f"train: error: {folder} is not empty (mine.txt) and is not a "
                                                 "SavedModel written by alexnet_tf.export; nothing was written: "
                                                 "name a new or empty folder")
    assert (folder / "mine.txt").read_text() == "not an export"
    assert sorted(os.listdir(tmp_path / "run")) == ["saved_model"]  # Refused before the run wrote anything.


KILLED_EXPORTER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from export_checks import tiny_export, tiny_info
    print("ready", flush=True)
    n = 0
    while True:  # Export after export over the same folder, until killed.
        n += 1
        tiny_export(sys.argv[1], info=tiny_info([{"label": i, "synset": f"n{n:08d}", "name": str(i)}
                                                 for i in range(3)]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_kill_9_during_exports_always_leaves_a_whole_saved_model(tmp_path, exchange):
    """A process exporting over and over into one folder, killed with SIGKILL at random moments."""
    import random
    import signal
    import time

    target = tmp_path / "exported"
    _tiny_export(target)
    script = KILLED_EXPORTER if exchange else KILLED_EXPORTER.replace(
        "from export_checks import", "from alexnet_tf import export_folder; export_folder._exchange = lambda a, b: False\n"
                                     "from export_checks import")
    rng = random.Random(0)
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target), os.path.dirname(__file__)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.5, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        export_folder.recover(str(target))
        assert export_folder.is_export(str(target)) and export._missing_part(str(target)) is None
        loaded = tf.saved_model.load(str(target))
        assert loaded.preprocessed(tf.zeros([1, 227, 227, 3]))["logits"].shape == (1, 3)
        assert sorted(os.listdir(tmp_path)) == ["exported"]
