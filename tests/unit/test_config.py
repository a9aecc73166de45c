from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from service.config import Destination, DicomSettings, load_settings
from service.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RADNODE_* variable from the caller's shell may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("RADNODE_"):
            monkeypatch.delenv(name)


def _write_yaml(path: Path, content: object) -> Path:
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return _write_yaml(
        tmp_path / "radnode.yaml",
        {
            "data_dir": str(tmp_path / "data"),
            "log_level": "DEBUG",
            "dicom": {"ae_title": "NODE1", "port": 11200, "max_associations": 4},
            "completion": {"quiet_period_s": 2.5},
            "destinations": [
                "PACS@10.0.0.5:104",
                {"ae_title": "ARCHIVE", "host": "archive.local", "port": 11112,
                 "name": "archive"},
            ],
            "rules": [{"name": "mr", "when": {"attribute": "Modality", "equals": "MR"},
                       "models": ["radnode-builtin-mr"], "destinations": ["archive"]}],
        },
    )


def test_defaults() -> None:
    settings = load_settings()
    assert settings.dicom.ae_title == "RADNODE"
    assert settings.dicom.port == 11112
    assert settings.dicom.host == "0.0.0.0"
    assert settings.destinations == []
    assert settings.completion.quiet_period_s == 5.0
    assert [(r.name, r.models) for r in settings.rules] == [
        ("ct", ["radnode-builtin-ct"]), ("mr", ["radnode-builtin-mr"])]
    assert settings.fallback.models == []  # what no rule matched is stored, not analysed
    assert [m.name for m in settings.models] == ["radnode-builtin-ct", "radnode-builtin-mr"]
    assert settings.model("radnode-builtin-mr").accepts.modalities == ["MR"]
    assert settings.model("radnode-builtin-ct").queue == "gpu"
    assert settings.log_level == "INFO"
    assert settings.data_dir == Path("radnode-data")
    assert settings.spool_dir == Path("radnode-data") / "spool"
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith("radnode-data/radnode.db")
    assert settings.embedded_broker


def test_yaml_nested_keys_and_destinations(config_file: Path, tmp_path: Path) -> None:
    settings = load_settings(config_file)
    assert settings.data_dir == tmp_path / "data"
    assert settings.log_level == "DEBUG"
    assert settings.dicom.ae_title == "NODE1"
    assert settings.dicom.port == 11200
    assert settings.dicom.max_associations == 4
    assert settings.dicom.dimse_timeout_s == 60.0  # untouched default in a given section
    assert settings.completion.quiet_period_s == 2.5
    pacs, archive = settings.destinations
    assert (pacs.ae_title, pacs.host, pacs.port, pacs.name) == ("PACS", "10.0.0.5", 104, "PACS")
    assert (archive.ae_title, archive.host, archive.port, archive.name) == (
        "ARCHIVE", "archive.local", 11112, "archive")
    assert str(pacs) == "PACS@10.0.0.5:104"
    (rule,) = settings.rules
    assert (rule.name, rule.models, rule.destinations) == ("mr", ["radnode-builtin-mr"],
                                                           ["archive"])


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_settings(path).dicom.port == 11112


def test_env_beats_yaml(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADNODE_DICOM__PORT", "12000")
    settings = load_settings(config_file)
    assert settings.dicom.port == 12000
    # Only the one nested key is overridden; the rest of the YAML section stays.
    assert settings.dicom.ae_title == "NODE1"
    assert settings.dicom.max_associations == 4


def test_env_without_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADNODE_DICOM__PORT", "12001")
    monkeypatch.setenv("RADNODE_LOG_LEVEL", "WARNING")
    settings = load_settings()
    assert settings.dicom.port == 12001
    assert settings.log_level == "WARNING"


def test_flags_beat_env_and_yaml(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RADNODE_DICOM__PORT", "12000")
    monkeypatch.setenv("RADNODE_LOG_LEVEL", "WARNING")
    settings = load_settings(
        config_file, dicom={"port": 13000}, log_level="ERROR", data_dir=tmp_path / "flag",
        destinations=None,  # None flags are ignored
    )
    assert settings.dicom.port == 13000
    assert settings.log_level == "ERROR"
    assert settings.data_dir == tmp_path / "flag"
    assert [str(d) for d in settings.destinations] == [
        "PACS@10.0.0.5:104", "ARCHIVE@archive.local:11112"]


def test_flag_as_section_model(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # radnode serve passes whole section objects built from the YAML plus flags.
    monkeypatch.setenv("RADNODE_DICOM__PORT", "12000")
    dicom = DicomSettings(ae_title="FLAGNODE", port=14000)
    settings = load_settings(config_file, dicom=dicom, destinations=["archive@h:1"])
    assert settings.dicom.port == 14000
    assert settings.dicom.ae_title == "FLAGNODE"
    assert [str(d) for d in settings.destinations] == ["archive@h:1"]


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ({"colour": "red"}, "colour"),
        ({"dicom": {"prot": 104}}, "prot"),
        ({"destinations": [{"ae_title": "A", "host": "h", "port": 1, "tls": True}]}, "tls"),
    ],
)
def test_unknown_key_is_config_error_naming_it(
    tmp_path: Path, content: dict[str, object], key: str
) -> None:
    path = _write_yaml(tmp_path / "bad.yaml", content)
    with pytest.raises(ConfigError, match=key) as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_unknown_env_nested_key_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADNODE_DICOM__PROT", "104")
    with pytest.raises(ConfigError, match="(?i)prot"):
        load_settings()


@pytest.mark.parametrize("ae_title", ["A" * 17, "BAD\\AE", "", "   ", "TAB\tAE"])
def test_invalid_ae_title_is_config_error(tmp_path: Path, ae_title: str) -> None:
    path = _write_yaml(tmp_path / "bad.yaml", {"dicom": {"ae_title": ae_title}})
    with pytest.raises(ConfigError, match="ae_title"):
        load_settings(path)


def test_invalid_ae_title_in_destination_and_delivery(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(_write_yaml(tmp_path / "a.yaml", {"destinations": ["A" * 17 + "@h:104"]}))
    with pytest.raises(ConfigError, match="ae_title"):
        load_settings(_write_yaml(tmp_path / "b.yaml", {"delivery": {"ae_title": "B\\AD"}}))


def test_ae_title_is_stripped(tmp_path: Path) -> None:
    path = _write_yaml(tmp_path / "ok.yaml", {"dicom": {"ae_title": " NODE  "}})
    assert load_settings(path).dicom.ae_title == "NODE"


@pytest.mark.parametrize(
    ("value", "key"),
    [({"dicom": {"port": 0}}, "port"), ({"dicom": {"port": 70000}}, "port"),
     ({"completion": {"quiet_period_s": 0}}, "quiet_period_s"),
     ({"log_level": "CHATTY"}, "log_level")],
)
def test_out_of_range_values(tmp_path: Path, value: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(_write_yaml(tmp_path / "bad.yaml", value))


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(missing)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_is_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(path)


def test_invalid_yaml_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("dicom: {port: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@10.0.0.5:104", ("PACS", "10.0.0.5", 104)),
        ("  ORTHANC@pacs.example.org:4242 ", ("ORTHANC", "pacs.example.org", 4242)),
        ("A@h:1", ("A", "h", 1)),
        ("SIXTEEN_CHARS_AE@h:65535", ("SIXTEEN_CHARS_AE", "h", 65535)),
        ("V6@[::1]:11112", ("V6", "::1", 11112)),
        ("MY AE@host:104", ("MY AE", "host", 104)),
    ],
)
def test_destination_parse_good(text: str, expected: tuple[str, str, int]) -> None:
    dest = Destination.parse(text)
    assert (dest.ae_title, dest.host, dest.port) == expected
    assert dest.name == expected[0]


@pytest.mark.parametrize(
    "text",
    [
        "PACS@host",            # missing port
        "PACS@host:",           # empty port
        "PACS@host:0",          # port 0
        "PACS@host:70000",      # port out of range
        "@host:104",            # empty AE
        "   @host:104",         # blank AE
        "PACS:104",             # no host part
        "PACS@:104",            # empty host
        "SEVENTEEN_CHARSAE@host:104",
        "BAD\\AE@host:104",
        "PACS@host:port",
        "",
    ],
)
def test_destination_parse_bad(text: str) -> None:
    with pytest.raises(ConfigError):
        Destination.parse(text)


@pytest.mark.parametrize("text", ["PACS@10.0.0.5:104", "MY AE@pacs.example.org:4242"])
def test_destination_str_round_trips(text: str) -> None:
    # Jobs store str(destination); delivery parses it back (service/scheduler.py).
    dest = Destination.parse(text)
    assert Destination.parse(str(dest)) == dest


def test_destination_str_round_trips_ipv6() -> None:
    dest = Destination.parse("V6@[::1]:11112")
    assert Destination.parse(str(dest)) == dest


def test_errors_name_the_key_and_its_line(tmp_path: Path) -> None:
    path = tmp_path / "radnode.yaml"
    path.write_text(
        "destinations:\n"
        "  - {name: pacs, ae_title: PACS, host: 10.0.0.5, port: 104}\n"
        "rules:\n"
        "  - name: ct\n"
        "    when: {attribute: Modality, equals: CT}\n"
        "    models: [radnode-builtin-ct]\n"
        "  - name: chest\n"
        "    when:\n"
        "      all:\n"
        "        - {attribute: SeriesDescription, regex: 'chest(('}\n"
        "    models: [radnode-builtin-ct]\n",
        encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "rules.1.when.all.0" in message
    assert "(line 10)" in message  # the line of the broken condition
    path.write_text(path.read_text().replace("'chest(('", "chest")
                    .replace("models: [radnode-builtin-ct]\n", "models: [liver-net]\n", 1))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "rules[0] (ct): model 'liver-net' is not declared" in str(info.value)
    assert "(line 4)" in str(info.value)  # the line of that rule
