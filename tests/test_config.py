"""Settings: file < environment < flag, and one clear line naming a bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from boneflow.config import CallerRule, Destination, load_settings, parse_node
from boneflow.errors import ConfigError


def test_defaults() -> None:
    settings = load_settings({}, {}, None)
    assert (settings.ae_title, settings.host, settings.port) == ("BONEFLOW", "127.0.0.1", 11112)
    assert settings.allowed_callers == () and settings.destinations == ()
    assert settings.resolved_model_dir == settings.data_dir / "models"
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_database_url.endswith("boneflow-data/boneflow.db")
    assert settings.broker_url == "" and settings.device == "auto"


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    config = tmp_path / "boneflow.toml"
    config.write_text('PORT = 1000\nAE_TITLE = "FROMFILE"\nDEVICE = "cpu"\nSETTLE_SECONDS = 9\n')
    env = {"BONEFLOW_PORT": "2000", "BONEFLOW_AE_TITLE": "FROMENV"}
    settings = load_settings({"port": "3000"}, env, config)
    assert settings.port == 3000  # flag beats env and file
    assert settings.ae_title == "FROMENV"  # env beats file
    assert settings.device == "cpu"  # file beats default
    assert settings.settle_seconds == 9.0


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "b.toml"
    config.write_text('[boneflow]\nBONEFLOW_DESTINATIONS = ["PACS@10.0.0.1:104"]\n')
    settings = load_settings({}, {"BONEFLOW_CONFIG": str(config)}, None)
    assert settings.destinations == (
        Destination(kind="dimse", ae_title="PACS", host="10.0.0.1", port=104),
    )


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"BONEFLOW_PORT": "notaport"}, "PORT"),
        ({"BONEFLOW_PORT": "70000"}, "PORT"),
        ({"BONEFLOW_AE_TITLE": "A" * 17}, "AE_TITLE"),
        ({"BONEFLOW_DEVICE": "tpu"}, "DEVICE"),
        ({"BONEFLOW_SETTLE_SECONDS": "-1"}, "SETTLE_SECONDS"),
        ({"BONEFLOW_DESTINATIONS": "PACS@host"}, "DESTINATIONS"),
        ({"BONEFLOW_DESTINATIONS": "PACS@host:0"}, "DESTINATIONS"),
        ({"BONEFLOW_ALLOWED_CALLERS": "BAD\\AET"}, "ALLOWED_CALLERS"),
        ({"BONEFLOW_DATABASE_URL": "boneflow.db"}, "DATABASE_URL"),
        ({"BONEFLOW_TLS_CERT": "/nonexistent/cert.pem", "BONEFLOW_TLS_KEY": "/x"}, "TLS_CERT"),
        ({"BONEFLOW_TLS_CERT": "/nonexistent/cert.pem"}, "TLS_KEY"),
        ({"BONEFLOW_LOG_JSON": "maybe"}, "LOG_JSON"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({}, env, None)
    assert str(caught.value).startswith(f"BONEFLOW_{key}:")
    assert "\n" not in str(caught.value)


def test_unknown_and_unreadable_config_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("PROT = 1\n")
    with pytest.raises(ConfigError, match="BONEFLOW_PROT: unknown key"):
        load_settings({}, {}, bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("PORT = [\n")
    with pytest.raises(ConfigError, match=r"BONEFLOW_CONFIG: .* is not valid TOML"):
        load_settings({}, {}, broken)
    with pytest.raises(ConfigError, match="BONEFLOW_CONFIG: cannot read"):
        load_settings({}, {}, tmp_path / "missing.toml")


def test_lists_are_parsed() -> None:
    settings = load_settings(
        {},
        {
            "BONEFLOW_ALLOWED_CALLERS": "PACS, MODALITY@10.1.2.3",
            "BONEFLOW_DESTINATIONS": "PACS@pacs.local:104, https://pacs.example/dicom-web/",
        },
        None,
    )
    assert settings.allowed_callers == (CallerRule("PACS"), CallerRule("MODALITY", "10.1.2.3"))
    assert settings.allowed_callers[1].allows("MODALITY", "10.1.2.3")
    assert not settings.allowed_callers[1].allows("MODALITY", "10.1.2.4")
    assert [str(d) for d in settings.destinations] == [
        "PACS@pacs.local:104",
        "https://pacs.example/dicom-web",
    ]


def test_parse_node_ipv6() -> None:
    assert parse_node("PEER@[::1]:11112") == Destination("dimse", "PEER", "::1", 11112)
