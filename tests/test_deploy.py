"""docker-compose.yml, the Dockerfile and the README's Deploy section agree with each other and
with the code. There is no Docker engine here, so the files are parsed and checked, not run."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import select

from app.api.exposure import exposure
from app.core.settings import Settings
from app.main import create_app

ROOT = Path(__file__).resolve().parent.parent
HEALTH = "/api/v1/health"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def instructions(dockerfile: list[str], name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile if line.split(None, 1)[0].upper() == name]


@pytest.fixture(scope="module")
def deploy_section() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Deploy\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert match, "README.md has no '## Deploy' section"
    return match.group(1)


def named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """{volume name: mount path} of a service's named (not bind) volumes."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        if not source.startswith((".", "/", "~")):
            mounts[source] = target
    return mounts


def app_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if name != "db"}


# -- docker-compose.yml -----------------------------------------------------------------------
def test_compose_runs_db_and_app_with_plain_up(services: dict[str, Any]):
    assert {"db", "app"} <= services.keys()
    assert "profiles" not in services["db"] and "profiles" not in services["app"]


def test_db_is_postgres_with_a_named_volume_and_a_healthcheck(compose: dict[str, Any], services: dict):
    db = services["db"]
    assert db["image"].startswith("postgres:")
    assert named_volumes(db) == {"pgdata": "/var/lib/postgresql/data"}
    assert "pgdata" in compose["volumes"]
    test = db["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "pg_isready" in " ".join(test[1:])
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= db["environment"].keys()
    # Durability stays PostgreSQL's default: no fsync=off or similar in the deployment.
    command = str(db.get("command", ""))
    assert "fsync" not in command and "synchronous_commit" not in command


@pytest.mark.parametrize("name", ["app", "app-gpu"])
def test_app_waits_for_a_healthy_db_and_serves_port_8000_from_a_data_volume(
    compose: dict[str, Any], services: dict[str, Any], name: str
):
    app = services[name]
    assert app["build"]["context"] == "." and (ROOT / app["build"].get("dockerfile", "Dockerfile")).is_file()
    assert app["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert "8000:8000" in app["ports"]
    env = app["environment"]
    assert env["CBIR_HOST"] == "0.0.0.0" and str(env["CBIR_PORT"]) == "8000"
    volumes = named_volumes(app)
    assert volumes == {"appdata": env["CBIR_DATA_DIR"]} and "appdata" in compose["volumes"]
    # "healthcheck" absent: the Dockerfile's one (on /api/v1/health) applies; never disabled here.
    assert not app.get("healthcheck", {}).get("disable", False)


@pytest.mark.parametrize("name", ["app", "app-gpu"])
def test_app_uses_the_db_service_through_psycopg(services: dict[str, Any], name: str):
    url = services[name]["environment"]["CBIR_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://")
    db_env = services["db"]["environment"]
    user, database = db_env["POSTGRES_USER"], db_env["POSTGRES_DB"]
    assert re.fullmatch(rf"postgresql\+psycopg://{user}:[^@]+@db:5432/{database}", url), url
    # The password is the db service's one, set once for both.
    assert db_env["POSTGRES_PASSWORD"] in url


def test_app_environment_names_only_real_settings(services: dict[str, Any]):
    for service in app_services(services).values():
        for variable in service["environment"]:
            assert variable.startswith("CBIR_"), variable
            assert variable.removeprefix("CBIR_").lower() in Settings.model_fields, variable


def test_gpu_profile_reserves_an_nvidia_gpu_and_asks_for_cuda(services: dict[str, Any]):
    gpu = [s for s in services.values() if "gpu" in s.get("profiles", [])]
    assert len(gpu) == 1
    (service,) = gpu
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert service["environment"]["CBIR_DEVICE"] == "cuda"
    assert "TORCH_INDEX" in service["build"]["args"]  # CUDA torch, not the Dockerfile's CPU default


@pytest.mark.parametrize("name", ["app", "app-gpu"])
def test_app_takes_an_admin_key_from_the_environment_or_creates_one(services: dict[str, Any], name: str):
    """Published on every interface, the service refuses keyless writes (auth_required): the
    compose file passes CBIR_API_KEYS through, and otherwise the first start creates a key."""
    env = services[name]["environment"]
    assert exposure(listen_host=env["CBIR_HOST"], server=None) is not None
    assert env.get("CBIR_AUTH", "auto") != "off"
    assert env["CBIR_API_KEYS"] == "${CBIR_API_KEYS:-}"  # from the shell or .env, empty by default
    assert str(env["CBIR_CREATE_ADMIN_KEY"]).lower() == "true"


def compose_value(value: object) -> str:
    """A compose environment value with ${NAME:-default} replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def test_compose_first_start_prints_an_admin_key_once(
    services: dict[str, Any], settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    """The image's command (`cbir serve`) with the compose environment: one admin key, printed on
    the first start only; only its hash is stored."""
    import uvicorn

    from app.access.keys import digest
    from app.cli import main
    from app.core.settings import get_settings
    from app.data.db import Database
    from app.data.records import ApiKeyRecord

    for variable, value in services["app"]["environment"].items():
        monkeypatch.setenv(variable, compose_value(value))
    monkeypatch.setenv("CBIR_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CBIR_DATABASE_URL", settings.database_url)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    get_settings.cache_clear()
    try:
        first = CliRunner().invoke(main, ["serve"])
        second = CliRunner().invoke(main, ["serve"])
    finally:
        get_settings.cache_clear()
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    printed = re.findall(r"cbir_[\w-]{20,}", first.stdout)
    assert len(printed) == 1 and "cbir_" not in second.stdout
    db = Database(settings.sqlalchemy_url)
    try:
        with db.session() as session:
            (record,) = session.scalars(select(ApiKeyRecord)).all()
    finally:
        db.dispose()
    assert record.scope == "admin" and record.sha256 == digest(printed[0])


# -- Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_builds_on_slim_python_of_the_supported_version(dockerfile: list[str]):
    (base,) = instructions(dockerfile, "FROM")
    image, tag = base.split(":")
    assert image == "python" and tag.endswith("-slim")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={tag.removesuffix('-slim')}" in requires


def test_dockerfile_runs_as_a_non_root_user_from_install_to_serve(dockerfile: list[str]):
    users = instructions(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0")
    keywords = [line.split(None, 1)[0].upper() for line in dockerfile]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert instructions(dockerfile, "CMD") == ['["cbir", "serve"]']


def test_dockerfile_healthcheck_asks_the_health_endpoint(dockerfile: list[str], settings: Settings):
    (check,) = instructions(dockerfile, "HEALTHCHECK")
    env = " ".join(instructions(dockerfile, "ENV"))
    port = re.search(r"CBIR_PORT=(\d+)", env)
    assert port and f"127.0.0.1:{port.group(1)}{HEALTH}" in check
    assert instructions(dockerfile, "EXPOSE") == [port.group(1)]
    assert HEALTH in create_app(settings).openapi()["paths"]


def test_dockerfile_keeps_data_in_the_volume_compose_mounts(dockerfile: list[str], services: dict):
    env = " ".join(instructions(dockerfile, "ENV"))
    assert "CBIR_DATA_DIR=/data" in env and instructions(dockerfile, "VOLUME") == ['["/data"]']
    assert services["app"]["environment"]["CBIR_DATA_DIR"] == "/data"


def test_dockerfile_copies_every_package_pyproject_installs(dockerfile: list[str]):
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = {shlex.split(c)[0] for c in instructions(dockerfile, "COPY")}
    assert {pattern.rstrip("*") for pattern in include["include"]} <= copied


def pip_commands(lines: list[str]) -> list[list[str]]:
    """Each `pip install ...` command in shell lines, as words without the index option (the
    Dockerfile picks where torch comes from; the packages and extras must be the Makefile's)."""
    commands = []
    for line in lines:
        for command in re.split(r"&&|;", line):
            words = shlex.split(command)
            words = [w.removeprefix("$(BIN)/") for w in words]
            if words[:2] != ["pip", "install"]:
                continue
            if "--extra-index-url" in words:
                at = words.index("--extra-index-url")
                del words[at : at + 2]
            commands.append(words)
    return commands


def test_dockerfile_installs_with_the_makefiles_commands(dockerfile: list[str]):
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(BIN\)/\.installed:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert recipe, "the Makefile has no $(BIN)/.installed recipe"
    make = pip_commands(recipe.group(1).splitlines())
    assert make == pip_commands(instructions(dockerfile, "RUN"))
    assert ["pip", "install", "-e", ".[postgres]"] in make  # the image talks to the db service


# -- README ------------------------------------------------------------------------------------
def test_readme_deploy_section_matches_the_compose_file(deploy_section: str, services: dict, compose: dict):
    assert "docker compose up" in deploy_section and "http://localhost:8000" in deploy_section
    for name in services:
        assert f"`{name}`" in deploy_section, name
    for volume in compose["volumes"]:
        assert f"`{volume}`" in deploy_section, volume
    assert "--profile gpu" in deploy_section and HEALTH in deploy_section
    for service in app_services(services).values():
        for variable, value in service["environment"].items():
            assert f"`{variable}`" in deploy_section, variable
            assert str(value) in deploy_section, (variable, value)
    assert "`POSTGRES_PASSWORD`" in deploy_section


def test_readme_deploy_section_says_how_writes_are_keyed(deploy_section: str):
    for words in (
        "cbir keys create --scope admin",
        "`CBIR_API_KEYS`",
        "`CBIR_CREATE_ADMIN_KEY`",
        "docker compose logs app",
        "`auth_required`",
        "`CBIR_AUTH=off`",
    ):
        assert words in deploy_section, words


def test_readme_deploy_section_says_how_to_back_up(deploy_section: str):
    assert "pg_dump" in deploy_section and "pg_restore" in deploy_section
    assert "/data" in deploy_section and "rebuild" in deploy_section
