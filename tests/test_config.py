"""Configuration: the example, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import (
    CallerConfig,
    NodeConfig,
    RetentionConfig,
    example_config_text,
    load_config,
)
from dicom_node.errors import ConfigError
from tests.helpers import run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_example_is_valid_and_documents_every_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, example_config_text()), environ={})

    assert config.ae_title == "DICOMNODE"
    assert (config.host, config.port) == ("127.0.0.1", 11112)
    assert config.state_dir == tmp_path / "dicom-node-data"
    assert config.database_url == ""
    assert config.stable_after == 10.0
    assert config.allow_any_caller is False
    defaults = NodeConfig()
    assert (config.workers, config.torch_threads, config.scoring_nice) == (
        defaults.workers,
        defaults.torch_threads,
        defaults.scoring_nice,
    )
    assert config.callers[0] == CallerConfig("PACS", "127.0.0.1")
    assert [(d.name, d.ae_title, d.port) for d in config.destinations] == [
        ("pacs", "PACS", 4242)
    ]
    assert config.models[0].path == tmp_path / "models/chest.safetensors"
    text = example_config_text()
    for key in NodeConfig.__dataclass_fields__:
        if key not in {
            "http",
            "callers",
            "destinations",
            "models",
            "tls",
            "retention",
            "source",
        }:
            assert f"\n{key} = " in text, f"{key} is not in the example"
    assert config.retention == RetentionConfig(30, 90, 365)
    assert (config.http.port, config.http.host) == (8080, "127.0.0.1")
    for key in ("host", "port", "show_patient", "token_file", "min_free_bytes"):
        assert f"{key} = " in text, f"[http] {key} is not in the example"
    for key in RetentionConfig.__dataclass_fields__:
        assert f"\n{key} = " in text, f"[retention] {key} is not in the example"
    for key in ("certificate", "private_key", "ca_certificates"):
        assert f"\n# {key} = " in text, f"[tls] {key} is not in the example"
    assert all(c.host for c in config.callers), "an example caller without host"


def test_cli_prints_the_example(tmp_path: Path) -> None:
    result = run_cli("config", "--example")

    assert result.returncode == 0
    assert result.stdout == example_config_text()
    checked = run_cli("config", "--config", str(write(tmp_path, result.stdout)))
    assert checked.returncode == 0, checked.stderr
    assert "valid" in checked.stdout


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, example_config_text())
    env = {
        "DICOM_NODE_NODE_PORT": "104",
        "DICOM_NODE_NODE_ALLOW_ANY_CALLER": "true",
        "DICOM_NODE_NODE_STABLE_AFTER": "2.5",
        "DICOM_NODE_NODE_STATE_DIR": "/var/lib/dicom-node",
        "DICOM_NODE_CALLERS": '[{ae_title = "MODALITY1", host = "10.0.0.7"}]',
        "DICOM_NODE_DESTINATIONS": "[]",
        "UNRELATED": "x",
    }

    config = load_config(path, environ=env)

    assert config.port == 104
    assert config.allow_any_caller is True
    assert config.stable_after == 2.5
    assert config.state_dir == Path("/var/lib/dicom-node")
    assert config.callers == (CallerConfig("MODALITY1", "10.0.0.7"),)
    assert config.destinations == ()


def test_model_cache_defaults_to_the_state_dir_and_resolves_like_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = load_config(write(tmp_path, example_config_text()), environ={})
    assert example.model_cache is None  # the example's "" is the default
    assert example.model_cache_dir == example.state_dir / "models"

    from_file = load_config(
        write(tmp_path, '[node]\nmodel_cache = "cache/compiled"\n'), environ={}
    )
    assert from_file.model_cache_dir == tmp_path / "cache" / "compiled"

    (tmp_path / "cache").mkdir()
    monkeypatch.chdir(tmp_path / "cache")
    from_environment = load_config(
        write(tmp_path, "[node]\n"), environ={"DICOM_NODE_NODE_MODEL_CACHE": "here"}
    )
    assert from_environment.model_cache_dir == tmp_path / "cache" / "here"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[node]\nport = 70000\n", {}, "[node] port"),
        ('[node]\nport = "104"\n', {}, "key 'port': expected int, found str"),
        ("[node]\nprot = 104\n", {}, "unknown key 'prot'"),
        ('[node]\nae_title = "A_VERY_LONG_AE_TITLE"\n', {}, "[node] ae_title"),
        ('[node]\nae_title = "BACK\\\\SLASH"\n', {}, "backslash"),
        ("[node]\nstable_after = 0\n", {}, "stable_after"),
        ("[nodes]\nport = 1\n", {}, "unknown section"),
        ('[[callers]]\nhost = "127.0.0.1"\n', {}, "missing key 'ae_title'"),
        (
            '[[callers]]\nae_title = "X"\nhost = "pacs.example"\n',
            {},
            "expected an IP address",
        ),
        (
            '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 0\n',
            {},
            "port",
        ),
        ('[[models]]\npath = "m"\nsha256 = "abc"\n', {}, "64 hexadecimal digits"),
        ("[node]\nport = \n", {}, "not valid TOML"),
        ("", {"DICOM_NODE_NODE_PORT": "eleven"}, "DICOM_NODE_NODE_PORT: expected int"),
        ("", {"DICOM_NODE_NODE_PROT": "1"}, "DICOM_NODE_NODE_PROT: unknown key"),
        ("", {"DICOM_NODE_CALLERS": "PACS"}, "DICOM_NODE_CALLERS"),
        ("[node]\nworkers = -1\n", {}, "[node] workers"),
        ("[node]\ntorch_threads = -1\n", {}, "[node] torch_threads"),
        ("[node]\nscoring_nice = 20\n", {}, "[node] scoring_nice"),
        (
            "[node]\nmax_data_elements = 10\n",
            {},
            "node.toml: expected 1000..100000000, found 10",
        ),
        ("", {"DICOM_NODE_NODE_SCORING_NICE": "-1"}, "[node] scoring_nice"),
        ("", {"DICOM_NODE_NODE_MAX_PDU": "1"}, "(from DICOM_NODE_NODE_MAX_PDU)"),
        ("", {"DICOM_NODE_HTTP_PORT": "70000"}, "(from DICOM_NODE_HTTP_PORT)"),
        (
            "",
            {"DICOM_NODE_RETENTION_STUDIES_DAYS": "-1"},
            "(from DICOM_NODE_RETENTION_STUDIES_DAYS)",
        ),
        (
            "[node]\nscoring_nice = 20\n",
            {"DICOM_NODE_NODE_LOG_LEVEL": "info"},
            "[node] scoring_nice in ",
        ),
        ("[http]\nport = 70000\n", {}, "[http] port"),
        ("[retention]\nstudies_days = -1\n", {}, "[retention] studies_days"),
        ("[node]\ndelivery_attempts = 0\n", {}, "[node] delivery_attempts"),
        ("[node]\nretry_after = 0\n", {}, "[node] retry_after"),
        ("[node]\ndevice = 'gpu'\n", {}, "[node] device"),
        (
            '[[callers]]\nae_title = "PACS"\nresults_port = 70000\n',
            {},
            "expected 1..65535",
        ),
        (
            '[[models]]\npath = "m.safetensors"\n[models.match]\nmodality = ["DX"]\n',
            {},
            "unknown key(s) ['modality']",
        ),
        (
            '[[models]]\npath = "m.safetensors"\n[models.match]\nmodalities = "DX"\n',
            {},
            "expected a list of strings",
        ),
    ],
)
def test_errors_name_the_key_and_where(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=env)

    assert message in str(caught.value)
    # Where the refused value came from: the file, or its variable alone.
    if not env:
        assert str(path) in str(caught.value)
    if "(from " in message:
        assert str(path) not in str(caught.value)
    assert "LOG_LEVEL" not in str(caught.value)  # a variable that played no part


def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = -1\n")

    result = run_cli("serve", "--config", str(path))

    assert result.returncode == 2
    assert "configuration error" in result.stderr
    assert "[node] port" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    result = run_cli("status", "--config", str(tmp_path / "absent.toml"))

    assert result.returncode == 2
    assert "absent.toml" in result.stderr


def test_no_config_given() -> None:
    result = run_cli("serve", env={"DICOM_NODE_CONFIG": ""})

    assert result.returncode == 2
    assert "--config" in result.stderr


def test_ae_title_padding_is_not_significant(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[node]\nae_title = " NODE1  "\n'), environ={})

    assert config.ae_title == "NODE1"


def test_caller_allow_list_semantics() -> None:
    config = NodeConfig(callers=(CallerConfig("PACS", "10.0.0.1"), CallerConfig("CT1")))

    assert config.caller_allowed("PACS", "10.0.0.1")
    assert not config.caller_allowed("PACS", "10.0.0.2")
    assert config.caller_allowed("CT1", "192.168.1.1")
    assert not config.caller_allowed("MR1", "10.0.0.1")


def test_model_match_and_results_port(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            '[[callers]]\nae_title = "PACS"\nhost = "10.0.0.5"\nresults_port = 4242\n'
            '[[models]]\npath = "chest.safetensors"\n'
            '[models.match]\nmodalities = ["DX", "CR"]\nbody_parts = ["CHEST"]\n',
        ),
        environ={"DICOM_NODE_NODE_WORKERS": "2"},
    )
    assert config.callers[0].results_port == 4242
    match = config.models[0].match
    assert match is not None
    assert match.modalities == ("DX", "CR")
    assert match.body_parts == ("CHEST",)
    assert match.calling_ae_titles == ()
    assert config.workers == 2
    assert config.gradcam_top_k == 1
