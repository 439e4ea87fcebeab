"""`dicom-node conformance`: the statement says what the AE actually does.

The Markdown statement is read back as a user would read it (its tables), then
checked against a running node over real associations on loopback: every SOP
class and transfer syntax it lists is accepted, classes and syntaxes it does not
list are rejected, and the A-ASSOCIATE-AC carries the implementation identity
it states. The result objects it lists are those `dicom-node score` writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, build_context

from dicom_node.cli import main
from dicom_node.config import NodeConfig
from dicom_node.conformance import render, statement
from dicom_node.score import score_run
from tests.factories import make_ct
from tests.helpers import RunningNode, make_config

pytestmark = pytest.mark.timeout(240)


def tables(markdown: str) -> dict[str, list[list[str]]]:
    """Each table of the statement by its caption's first words, rows as cells."""
    found: dict[str, list[list[str]]] = {}
    caption = ""
    for line in markdown.splitlines():
        if line.startswith("**") and line.endswith("**"):
            caption = line.strip("*").split(":")[0]
            found[caption] = []
        elif line.startswith("| ") and caption:
            found[caption].append([c.strip() for c in line.strip("|").split(" | ")])
    return {k: rows[1:] for k, rows in found.items()}  # without the header row


def test_the_statement_matches_what_the_node_negotiates(
    start_node: Callable[..., RunningNode],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["conformance"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# DICOM Conformance Statement: dicom-node")
    found = tables(text)
    classes = [row[1] for row in found["Table 4.2-2"]]
    syntaxes = [row[1] for row in found["Table 4.2-6"]]
    identity = {row[0]: row[1] for row in found["Table 4.2-3"]}
    assert "1.2.840.10008.1.1" in classes  # Verification
    assert "1.2.840.10008.5.1.4.1.1.1.1" in classes  # DX for presentation
    assert "1.2.840.10008.5.1.4.1.1.6" in classes  # retired US, accepted
    assert "1.2.840.10008.1.2.4.50" in syntaxes  # JPEG baseline
    assert len(classes) > 150

    node = start_node()
    ae = AE("TESTSCU")
    ae.acse_timeout = 10
    # One context per listed (class, syntax): 128 to an association.
    pairs = [(c, t) for c in classes for t in syntaxes]
    for start in range(0, len(pairs), 128):
        contexts = [build_context(c, [t]) for c, t in pairs[start : start + 128]]
        assoc = ae.associate("127.0.0.1", node.port, contexts, ae_title="DICOMNODE")
        assert assoc.is_established
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in assoc.accepted_contexts
        }
        assert accepted == set(pairs[start : start + 128])
        acceptor = assoc.acceptor
        assert (
            acceptor.implementation_class_uid == (identity["Implementation Class UID"])
        )
        assert (
            acceptor.implementation_version_name
            == (identity["Implementation Version Name"])
        )
        assoc.release()

    # What the statement leaves out is refused: query/retrieve, worklist, storage
    # commitment, a private class; a private transfer syntax.
    unlisted = [
        "1.2.840.10008.5.1.4.1.2.2.1",
        "1.2.840.10008.5.1.4.31",
        "1.2.840.10008.1.20.1",
        "1.2.826.0.1.3680043.2.1143.999",
    ]
    assert not set(unlisted) & set(classes)
    contexts = [build_context(c, ["1.2.840.10008.1.2.1"]) for c in unlisted]
    contexts.append(build_context(classes[1], ["1.2.826.0.1.3680043.2.1143.7"]))
    # With Verification beside them, so that the association is established.
    contexts.append(build_context("1.2.840.10008.1.1"))
    assoc = ae.associate("127.0.0.1", node.port, contexts, ae_title="DICOMNODE")
    assert assoc.is_established
    assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [
        "1.2.840.10008.1.1"
    ]
    assert len(assoc.rejected_contexts) == len(contexts) - 1
    assoc.release()


def test_the_result_objects_listed_are_those_written(
    tmp_path: Path, model: Path
) -> None:
    config = NodeConfig(results_jpeg=True, results_parametric_map=True)
    found = tables(render(statement(config)))
    listed = {(row[1], row[2]) for row in found["Table 4.2-5"]}
    names = {
        "Comprehensive 3D SR Storage": "1.2.840.10008.5.1.4.1.1.88.34",
        "Secondary Capture Image Storage": "1.2.840.10008.5.1.4.1.1.7",
        "Parametric Map Storage": "1.2.840.10008.5.1.4.1.1.30",
    }
    assert {uid for uid, _ in listed} == set(names.values())

    source = tmp_path / "ct.dcm"
    make_ct(rows=64, columns=64, seed=3).save_as(source, enforce_file_format=True)
    run = score_run([source], model, tmp_path / "out", jpeg=True, parametric_map=True)
    assert len(run.studies) == 1
    assert not run.failed
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    kinds = set()
    for path in written:
        ds = dcmread(path)
        kinds.add(str(ds.SOPClassUID))
        syntax = next(
            row[2] for row in found["Table 4.2-5"] if row[1] == ds.SOPClassUID
        )
        assert ds.file_meta.TransferSyntaxUID.name == syntax, path.name
    assert kinds == set(names.values())  # SR, capture and map all written


def test_html_and_a_configuration_are_stated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(tmp_path, ae_title="AINODE", port=11113, max_pdu=65536)
    assert config.tls is None
    out = tmp_path / "statement.html"
    text = render(statement(config), "html")
    assert text.startswith("<!DOCTYPE html>")
    assert "<td>AINODE</td>" in text
    assert "<td>65536</td>" in text
    assert "No TLS on this configuration" in text
    assert main(["conformance", "--format", "html", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(SystemExit) as refused:
        main(["conformance", "--format", "pdf"])
    assert refused.value.code == 2
    assert "invalid choice: 'pdf'" in capsys.readouterr().err
