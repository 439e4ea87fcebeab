"""Compiled models: the node runs its model from TorchScript, without torchvision."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import Classifier, ModelArtifact, file_sha256
from inference.compiled import code_fingerprint, compiled_path, load_compiled
from inference.compiled import main as compiled_main
from tests.factories import make_artifact, make_ct
from tests.helpers import MODEL_CACHE_VARIABLE, dicom_node_cmd, wait_for

pytestmark = pytest.mark.timeout(180)


def saved(tmp_path: Path, layer: str = "layer4", name: str = "m") -> Path:
    path = tmp_path / f"{name}.safetensors"
    dataclasses.replace(make_artifact(), gradcam_layer=layer).save(path)
    return path


def scored(classifier: Classifier) -> tuple[np.ndarray, list[np.ndarray]]:
    images = [make_ct(rows=64, columns=64, seed=s) for s in (3, 4)]
    prediction = classifier.predict(images, explain_top_k=1)
    return prediction.frame_probabilities, [e.heatmap for e in prediction.explanations]


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_a_compiled_model_scores_and_explains_as_the_model_built(
    tmp_path: Path, layer: str
) -> None:
    path = saved(tmp_path, layer)
    folder, sha256 = tmp_path / "cache", file_sha256(path)
    compiled = load_compiled(ModelArtifact.load(path), path, sha256, folder, "cpu")
    assert compiled is not None
    assert compiled.path == compiled_path(folder, sha256)
    assert oct(folder.stat().st_mode & 0o777) == "0o700"

    fast = Classifier(ModelArtifact.load(path), "cpu", trace=True, compiled=compiled)
    built = Classifier(ModelArtifact.load(path), "cpu", trace=True)
    assert fast.model is None
    assert fast.traced
    probabilities, heatmaps = scored(fast)
    expected, references = scored(built)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    assert len(heatmaps) == len(references) == 2  # one per label
    for heatmap, reference in zip(heatmaps, references, strict=True):
        assert heatmap.max() > 0
        np.testing.assert_allclose(heatmap, reference, atol=1e-5)

    # Loaded again, the file is read, not compiled again; compiled files no
    # model loaded for 30 days, and a killed child's half-written one, are
    # removed; nothing else in the folder is touched.
    # A failed compile's marker is removed once it holds nothing back (a day).
    other, third = f"{'a' * 64}-{'b' * 16}.pt", f"{'c' * 64}-{'b' * 16}.pt"
    old, recent, partial, mine, failed, failing = (
        folder / name
        for name in (
            other,
            third,
            f".{other}.{'d' * 32}",
            "x.pt",
            f"{other}.failed",
            f"{third}.failed",
        )
    )
    for stale, days in (
        (old, 31),
        (recent, 29),
        (partial, 2),
        (mine, 99),
        (failed, 1.5),
        (failing, 0.5),
    ):
        stale.write_bytes(b"")
        os.utime(stale, (time.time() - days * 86400,) * 2)
    before = compiled.path.stat()
    again = load_compiled(ModelArtifact.load(path), path, sha256, folder, "cpu")
    assert again is not None
    assert compiled.path.stat().st_ino == before.st_ino
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".lock", compiled.path.name, recent.name, mine.name, failing.name]
    )


def test_a_model_that_fails_to_compile_is_not_compiled_again_for_a_day(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference")
    path, folder = saved(tmp_path), tmp_path / "cache"
    artifact = ModelArtifact.load(path)
    # The child refuses a model file whose hash is not the one it was given
    # (as a file replaced meanwhile): a compile that fails.
    wrong = "0" * 64
    marker = compiled_path(folder, wrong).with_suffix(".pt.failed")
    assert load_compiled(artifact, path, wrong, folder, "cpu") is None
    assert marker.is_file()
    child_said = marker.read_text().strip()
    assert child_said
    assert child_said in caplog.text

    # The next load (a restart) runs no child: it says why.
    caplog.clear()
    assert load_compiled(artifact, path, wrong, folder, "cpu") is None
    assert "compiling model" not in caplog.text
    assert "its compile failed" in caplog.text
    assert str(marker) in caplog.text

    # The marker deleted, or a day old, a child tries again (and records it).
    def a_day_old() -> None:
        os.utime(marker, (time.time() - 86401,) * 2)

    for make_way in (marker.unlink, a_day_old):
        make_way()
        caplog.clear()
        assert load_compiled(artifact, path, wrong, folder, "cpu") is None
        assert "compiling model" in caplog.text
        assert "its compile failed" not in caplog.text
        assert child_said in caplog.text
        assert time.time() - marker.stat().st_mtime < 600


def test_a_damaged_or_foreign_compiled_file_is_compiled_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="inference")
    path, other = saved(tmp_path), saved(tmp_path, "layer2", "other")
    folder = tmp_path / "cache"
    sha256, other_sha256 = file_sha256(path), file_sha256(other)
    target = compiled_path(folder, sha256)
    folder.mkdir()
    target.write_bytes(b"PK\x03\x04 not a TorchScript file")

    compiled = load_compiled(ModelArtifact.load(path), path, sha256, folder, "cpu")

    assert compiled is not None
    assert "unreadable" in caplog.text
    reference = Classifier(ModelArtifact.load(path), "cpu")
    fast = Classifier(ModelArtifact.load(path), "cpu", compiled=compiled)
    np.testing.assert_allclose(scored(fast)[0], scored(reference)[0], rtol=1e-5)

    # Another model's compiled file under this model's name: refused by the
    # name it records, compiled again.
    caplog.clear()
    foreign = load_compiled(
        ModelArtifact.load(other), other, other_sha256, folder, "cpu"
    )
    assert foreign is not None
    shutil.copy(foreign.path, target)
    compiled = load_compiled(ModelArtifact.load(path), path, sha256, folder, "cpu")
    assert compiled is not None
    assert "another model's" in caplog.text
    fast = Classifier(ModelArtifact.load(path), "cpu", compiled=compiled)
    np.testing.assert_allclose(scored(fast)[0], scored(reference)[0], rtol=1e-5)

    # This model's file, but made by other code, or giving other logits than
    # it recorded: compiled again.
    for change, said in (
        ({"code": "0" * 64}, "of other code"),
        ({"probe_logits": [[9.0, 9.0]]}, "gives other logits"),
    ):
        caplog.clear()
        extra = {"dicom-node.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation
            graph = torch.jit.load(  # type: ignore[no-untyped-call]
                str(target), _extra_files=extra
            )
            document = {**json.loads(extra["dicom-node.json"]), **change}
            written = {"dicom-node.json": json.dumps(document)}
            torch.jit.save(graph, str(target), _extra_files=written)
        compiled = load_compiled(ModelArtifact.load(path), path, sha256, folder, "cpu")
        assert compiled is not None
        assert said in caplog.text
        fast = Classifier(ModelArtifact.load(path), "cpu", compiled=compiled)
        np.testing.assert_allclose(scored(fast)[0], scored(reference)[0], rtol=1e-5)


def test_loads_at_once_compile_once_in_a_folder_of_the_users_own_group(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference")
    path = saved(tmp_path)
    # umask 002 (Debian's for users): folders writable by the user's own
    # group, which no one else is in.
    shared = tmp_path / "group"
    shared.mkdir()
    shared.chmod(0o775)
    sha256, folder = file_sha256(path), shared / "cache"
    found: list[object] = []

    def load() -> None:
        artifact = ModelArtifact.load(path)
        found.append(load_compiled(artifact, path, sha256, folder, "cpu"))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(found) == 3
    assert None not in found
    assert caplog.text.count("compiling model") == 1


def _kill_compile_child(model: Path, within: float = 60.0) -> int:
    """SIGKILL the compile child started for ``model``; return its pid."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            if b"inference.compiled" in argv and str(model).encode() in argv:
                os.kill(int(proc.name), signal.SIGKILL)
                return int(proc.name)
        time.sleep(0.02)
    raise AssertionError(f"no compile child for {model} within {within} s")


def test_a_compile_ended_by_a_signal_is_not_recorded_as_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The node stopped meanwhile, or the kernel ended the child for want of
    # memory: nothing says the model cannot compile, so the next start tries.
    caplog.set_level(logging.INFO, logger="inference")
    path, folder = saved(tmp_path), tmp_path / "cache"
    artifact, sha256 = ModelArtifact.load(path), file_sha256(path)
    marker = compiled_path(folder, sha256).with_suffix(".pt.failed")
    for attempt in (1, 2):
        caplog.clear()
        loaded: list[object] = []
        loading = threading.Thread(
            target=lambda into=loaded: into.append(
                load_compiled(artifact, path, sha256, folder, "cpu")
            )
        )
        loading.start()
        try:
            _kill_compile_child(path)
        finally:
            loading.join(120)
        assert loaded == [None], f"attempt {attempt}: {loaded}"
        assert "compiling model" in caplog.text, f"attempt {attempt}: no child ran"
        assert f"signal {signal.SIGKILL.value}" in caplog.text
        assert not marker.exists(), marker.read_text()
        assert not compiled_path(folder, sha256).exists()


def test_a_model_that_cannot_be_compiled_is_built_in_the_process(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.WARNING, logger="inference")
    path = saved(tmp_path)
    artifact, sha256 = ModelArtifact.load(path), file_sha256(path)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")

    assert load_compiled(artifact, path, sha256, blocked / "cache", "cpu") is None
    assert "not compiled" in caplog.text
    assert "built in this process" in caplog.text
    # A folder others may write to: a compiled file is a program, none is used.
    caplog.clear()
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    assert load_compiled(artifact, path, sha256, loose, "cpu") is None
    assert "is not this user's alone" in caplog.text
    assert not list(loose.iterdir())
    # ... or a folder above it (not sticky, as /tmp is), or a link to one.
    caplog.clear()
    (loose / "mine").mkdir(mode=0o700)
    assert load_compiled(artifact, path, sha256, loose / "mine", "cpu") is None
    assert "may be changed by another user" in caplog.text
    caplog.clear()
    (tmp_path / "link").symlink_to(tmp_path / "a-folder", target_is_directory=True)
    (tmp_path / "a-folder").mkdir(mode=0o700)
    assert load_compiled(artifact, path, sha256, tmp_path / "link", "cpu") is None
    assert "a link?" in caplog.text
    # A child that runs other code than the caller refuses to compile.
    out = tmp_path / "other.pt"
    assert compiled_main([str(path), sha256, str(out), "0" * 64]) == 1
    assert "other code" in capsys.readouterr().err
    assert not out.exists()
    # Where it would not run traced (here CUDA), nothing is compiled.
    assert load_compiled(artifact, path, sha256, tmp_path / "cache", "cuda") is None
    assert not (tmp_path / "cache").exists()
    # A model file changed since its SHA-256 was taken: the child refuses it.
    caplog.clear()
    assert load_compiled(artifact, path, "0" * 64, tmp_path / "cache", "cpu") is None
    assert "SHA-256" in caplog.text


def test_the_code_fingerprint_follows_torch_and_torchvision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code_fingerprint.cache_clear()
    now = code_fingerprint()
    real = importlib.metadata.version

    def upgraded(name: str) -> str:
        return "99.0" if name == "torchvision" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", upgraded)
    code_fingerprint.cache_clear()
    try:
        assert code_fingerprint() != now
    finally:
        monkeypatch.undo()
        code_fingerprint.cache_clear()
    assert code_fingerprint() == now


def test_serve_runs_its_model_without_torchvision(tmp_path: Path) -> None:
    saved(tmp_path, name="model")
    (tmp_path / "node.toml").write_text(
        '[node]\nport = 0\nhost = "127.0.0.1"\n'
        '[[callers]]\nae_title = "TESTSCU"\nhost = "127.0.0.1"\n'
        '[[models]]\npath = "model.safetensors"\n'
    )
    # The default folder (in state_dir), not the one the tests share.
    env = {k: v for k, v in os.environ.items() if k != MODEL_CACHE_VARIABLE}
    proc = subprocess.Popen(
        dicom_node_cmd("serve", "--config", str(tmp_path / "node.toml")),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    stderr = proc.stderr

    def read() -> None:
        with stderr:  # closed at the end of the output
            lines.extend(stderr)

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: any("loaded model" in x for x in lines), 120, "the model")
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        proc.terminate()
        proc.wait(30)
    loaded = next(x for x in lines if "loaded model" in x)
    assert "(traced, compiled)" in loaded
    assert "torch" in maps  # it runs PyTorch...
    assert "torchvision" not in maps  # ... and never loaded torchvision
    assert list((tmp_path / "dicom-node-data" / "models").glob("*.pt"))
