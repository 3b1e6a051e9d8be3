"""Config loading: good files load exactly; a broken file names its field and changes nothing."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from tokenhub.config import ConfigError, load_config

GOOD = """
[server]
port = 8123

[[providers]]
name = "p1"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "TOKENHUB_TEST_UPSTREAM_KEY"

[[models]]
id = "m1"
  [[models.deployments]]
  provider = "p1"
  upstream_model = "up-1"
  weight = 2
  vocab = "qwen"
  price = { currency = "CNY", input_per_1m = 0.15, output_per_1m = "0.6" }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tokenhub.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_good_config_loads_with_exact_decimal_prices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENHUB_TEST_UPSTREAM_KEY", "sk-upstream")
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.server.port == 8123
    dep = cfg.models[0].deployments[0]
    assert dep.name == "p1/up-1"
    assert dep.price is not None
    # A TOML float is read as the decimal it spells, never through a binary float.
    assert dep.price.input_per_1m == Decimal("0.15")
    assert dep.price.output_per_1m == Decimal("0.6")
    assert str(dep.price.input_per_1m) == "0.15"


def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[2] / "examples" / "tokenhub.toml")
    assert {m.id for m in cfg.models} == {"gpt-4o-mini", "qwen-plus", "deepseek-chat", "auto"}


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (("weight = 2", 'weight = "two"'), "models[0].deployments[0].weight"),
        (('provider = "p1"', 'provider = "nope"'), "models[0].deployments[0].provider"),
        (('vocab = "qwen"', 'vocab = "klingon"'), "models[0].deployments[0].vocab"),
        (('currency = "CNY"', 'currency = "yuan"'), "models[0].deployments[0].price.currency"),
        (
            ("input_per_1m = 0.15", "input_per_1m = -1"),
            "models[0].deployments[0].price.input_per_1m",
        ),
        (("port = 8123", "port = 70000"), "server.port"),
        (("port = 8123", "port = 8123\nbogus = 1"), "server"),
        (('base_url = "http://127.0.0.1:9/v1"', 'base_url = "ftp://x"'), "providers[0].base_url"),
        (('id = "m1"', 'id = "has space"'), "models[0].id"),
    ],
)
def test_broken_config_names_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: tuple[str, str], field: str
) -> None:
    monkeypatch.setenv("TOKENHUB_TEST_UPSTREAM_KEY", "sk-upstream")
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert field in str(e.value)


def test_missing_upstream_key_variable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENHUB_TEST_UPSTREAM_KEY", raising=False)
    with pytest.raises(
        ConfigError, match=r"providers\[0\]\.api_key_env.*TOKENHUB_TEST_UPSTREAM_KEY"
    ):
        load_config(write(tmp_path, GOOD))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[server\nport = 1"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_duplicate_model_and_empty_deployments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENHUB_TEST_UPSTREAM_KEY", "k")
    dup = GOOD + GOOD[GOOD.index("[[models]]") :]
    with pytest.raises(ConfigError, match=r"models\[1\]\.id.*twice"):
        load_config(write(tmp_path, dup))
    empty = GOOD[: GOOD.index("  [[models.deployments]]")] + "deployments = []\n"
    with pytest.raises(ConfigError, match=r"models\[0\]\.deployments"):
        load_config(write(tmp_path, empty))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('policy = "fastest"', r"models\[0\]\.policy: 'fastest': one of swrr, random"),
        ("max_attempts = 0", r"models\[0\]\.max_attempts: must be from 1 to 8"),
        ('affinity = "sticky"', r"models\[0\]\.affinity: 'sticky': one of none"),
    ],
)
def test_bad_routing_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str, message: str
) -> None:
    monkeypatch.setenv("TOKENHUB_TEST_UPSTREAM_KEY", "k")
    text = GOOD.replace('id = "m1"\n', f'id = "m1"\n{extra}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ('{ cheap = "m1", strong = "m1", threshold = 0.4 }', None),
        ('{ cheap = "m1", strong = "nope" }', r"models\[1\]\.tiers\.strong: 'nope' is not a model"),
        ('{ cheap = "auto", strong = "m1" }', r"models\[1\]\.tiers\.cheap: 'auto' is not a model"),
        ('{ cheap = "m1", strong = "m1", threshold = 2 }', r"tiers\.threshold: must be from 0"),
    ],
)
def test_tiered_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiers: str, message: str | None
) -> None:
    monkeypatch.setenv("TOKENHUB_TEST_UPSTREAM_KEY", "k")
    text = GOOD + f'\n[[models]]\nid = "auto"\ntiers = {tiers}\n'
    if message is None:
        cfg = load_config(write(tmp_path, text))
        auto = cfg.models[1]
        assert auto.tiers is not None and (auto.tiers.cheap, auto.tiers.threshold) == ("m1", 0.4)
        assert auto.deployments == []
    else:
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, text))
    # A tiered model routes to other models: it has no deployments of its own.
    own = GOOD + (
        '\n[[models]]\nid = "auto"\ntiers = { cheap = "m1", strong = "m1" }\n'
        '  [[models.deployments]]\n  provider = "p1"\n  upstream_model = "x"\n'
    )
    with pytest.raises(ConfigError, match=r"models\[1\]\.deployments: a tiered model"):
        load_config(write(tmp_path, own))
