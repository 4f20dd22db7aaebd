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
def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


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
    """The services that run cbir: built from this repository's Dockerfile."""
    return {name: s for name, s in services.items() if "build" in s}


SCALE = ("scale", "scale-gpu")


def default_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The one-machine deployment (README, "Deploy"): every service outside the scale profiles."""
    return {name: s for name, s in services.items() if not set(s.get("profiles", [])) & set(SCALE)}


def scale_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if set(s.get("profiles", [])) & set(SCALE)}


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
    assert {"app", "app-gpu", "api-1", "api-2", "worker", "worker-gpu"} <= app_services(services).keys()
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


# -- docker-compose.yml, profile `scale` (docs/scaling.md) -----------------------------------------
SCALE_UP = "docker compose --profile scale up -d nginx worker"


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def image_of(services: dict[str, Any], prefix: str) -> list[str]:
    return [name for name, s in services.items() if str(s.get("image", "")).startswith(prefix)]


def api_replicas(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in scale_services(services).items()
        if command_of(s)[:2] == ["cbir", "serve"] and "--role" in command_of(s)
    }


def workers(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: s for name, s in scale_services(services).items() if command_of(s)[:2] == ["cbir", "worker"]
    }


def dependencies(services: dict[str, Any], names: set[str]) -> set[str]:
    """``names`` and every service they depend on, transitively."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(services[name].get("depends_on", {}))
    return seen


def test_scale_profile_runs_postgres_milvus_with_etcd_and_minio_nginx_two_replicas_and_a_worker(
    services: dict[str, Any],
):
    scale = scale_services(services)
    assert image_of({"db": services["db"]}, "postgres:") == ["db"]  # shared: no profile
    (etcd,) = image_of(scale, "quay.io/coreos/etcd:")
    (minio,) = image_of(scale, "minio/minio:")
    (milvus,) = image_of(scale, "milvusdb/milvus:")
    (nginx,) = image_of(scale, "nginx:")
    assert command_of(scale[milvus]) == ["milvus", "run", "standalone"]
    env = scale[milvus]["environment"]
    assert env["ETCD_ENDPOINTS"] == f"{etcd}:2379" and env["MINIO_ADDRESS"] == f"{minio}:9000"
    replicas = api_replicas(services)
    assert len(replicas) == 2
    for replica in replicas.values():
        assert command_of(replica) == ["cbir", "serve", "--role", "api"]
        assert "ports" not in replica  # reached through nginx only
    assert "8000:8000" in scale[nginx]["ports"]
    assert any("scale" in s["profiles"] for s in workers(services).values())


def test_scale_profile_and_db_have_a_healthcheck_each(services: dict[str, Any]):
    for name, service in {**scale_services(services), "db": services["db"]}.items():
        check = service.get("healthcheck", {})
        assert not check.get("disable", False), name
        assert check.get("test", [None])[0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name


def test_every_image_is_pinned_to_a_version(services: dict[str, Any]):
    images = {name: s["image"] for name, s in services.items() if "image" in s}
    assert {"db", "etcd", "minio", "milvus", "nginx"} <= images.keys()
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, (name, image)  # a tag, not a registry port
        assert tag != "latest" and re.search(r"\d", tag), (name, image)


def test_scale_replicas_and_workers_build_here_and_share_data_database_and_milvus(services: dict[str, Any]):
    cbir = {**api_replicas(services), **workers(services)}
    assert cbir.keys() == {n for n in app_services(services) if n in scale_services(services)}
    (milvus,) = image_of(services, "milvusdb/milvus:")
    mounts, stores, databases = set(), set(), set()
    for name, service in cbir.items():
        assert service["build"]["context"] == ".", name
        env = service["environment"]
        mounts.add(tuple(named_volumes(service).items()))
        assert named_volumes(service) == {"appdata": env["CBIR_DATA_DIR"]}, name
        stores.add((env["CBIR_VECTOR_STORE"], env["CBIR_VECTOR_STORE_PREFIX"]))
        databases.add(env["CBIR_DATABASE_URL"])
    assert len(mounts) == 1 and len(stores) == 1 and len(databases) == 1
    assert databases == {services["app"]["environment"]["CBIR_DATABASE_URL"]}
    ((store, _),) = stores
    assert store == f"milvus://{milvus}:19530"
    assert Settings(vector_store=store).vector_store_backend == "milvus"


def test_scale_services_wait_for_healthy_dependencies(services: dict[str, Any]):
    for name, service in scale_services(services).items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in services[dependency], (name, dependency)
    (milvus,) = image_of(services, "milvusdb/milvus:")
    for name in {**api_replicas(services), **workers(services)}:
        assert {"db", milvus} <= services[name]["depends_on"].keys(), name


def test_the_documented_command_starts_the_whole_profile_and_not_app(compose_text: str, services: dict):
    """`app` has no profile, so a bare `up --profile scale` would start it too (a second job runner
    on FAISS, and port 8000 twice): the documented command names nginx and the worker instead."""
    assert SCALE_UP in compose_text
    named = set(SCALE_UP.split()[6:])
    in_scale = {n for n, s in services.items() if "scale" in s.get("profiles", [])}
    assert dependencies(services, named) == in_scale | {"db"}
    gpu = {n for n, s in services.items() if "scale-gpu" in s.get("profiles", [])}
    assert gpu and dependencies(services, gpu) <= in_scale | gpu | {"db"}


def test_worker_health_is_its_heartbeat_file_touched_within_60_s(tmp_path: Path, services: dict):
    import os
    import subprocess
    import sys
    import time

    for name, worker in workers(services).items():
        command = command_of(worker)
        heartbeat = command[command.index("--heartbeat") + 1]
        check = worker["healthcheck"]["test"]
        assert check[:2] == ["CMD", "python"] and heartbeat in check[-1], name
        probe = tmp_path / "alive"
        script = check[-1].replace(heartbeat, str(probe))

        def healthy(check: list[str] = check, script: str = script) -> bool:
            return subprocess.run([sys.executable, *check[2:-1], script], capture_output=True).returncode == 0

        assert not healthy(), name  # no heartbeat yet
        probe.touch()
        assert healthy(), name
        os.utime(probe, (time.time() - 61, time.time() - 61))
        assert not healthy(), name


def test_gpu_worker_is_the_worker_with_cuda_on_an_nvidia_gpu(services: dict[str, Any]):
    (name,) = [n for n, s in workers(services).items() if "scale-gpu" in s["profiles"]]
    gpu, cpu = services[name], services["worker"]
    assert "scale" not in gpu["profiles"]  # a CPU host's `--profile scale` does not start it
    assert command_of(gpu) == command_of(cpu)
    assert gpu["environment"] == {**cpu["environment"], "CBIR_DEVICE": "cuda"}
    assert gpu["build"]["args"] == services["app-gpu"]["build"]["args"]
    assert gpu["deploy"] == services["app-gpu"]["deploy"]


def test_nginx_proxies_port_8000_to_both_replicas_from_deploy_nginx_conf(services: dict[str, Any]):
    (name,) = image_of(services, "nginx:")
    nginx = services[name]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    conf = re.sub(r"#.*", "", (ROOT / "deploy" / "nginx.conf").read_text())
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", conf, flags=re.S)
    assert upstream and f"proxy_pass http://{upstream.group(1)};" in conf
    servers = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", upstream.group(2), flags=re.M))
    replicas = api_replicas(services)
    assert servers == {f"{n}:{r['environment']['CBIR_PORT']}" for n, r in replicas.items()}
    assert re.search(r"^\s*listen\s+8000;", conf, flags=re.M) and "8000:8000" in nginx["ports"]
    assert nginx["depends_on"] == {n: {"condition": "service_healthy"} for n in replicas}
    assert HEALTH in " ".join(nginx["healthcheck"]["test"])


def test_cli_has_the_commands_and_options_the_profile_runs(services: dict[str, Any]):
    from app.cli import main

    for name, service in {**api_replicas(services), **workers(services)}.items():
        program, command, *options = command_of(service)
        assert program == "cbir" and command in main.commands, name
        known = {opt for param in main.commands[command].params for opt in param.opts}
        assert {o for o in options if o.startswith("--")} <= known, name


def test_scaling_doc_names_every_service_volume_and_setting_of_the_profile(services: dict, compose: dict):
    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert SCALE_UP in doc and "--profile scale-gpu" in doc and HEALTH in doc
    scale = scale_services(services)
    for name in scale:
        assert f"`{name}`" in doc, name
    for volume in {v for s in scale.values() for v in named_volumes(s)} | {"appdata"}:
        assert f"`{volume}`" in doc, volume
    for service in app_services(scale).values():
        for variable in service["environment"]:
            assert re.search(rf"`{variable}[`=]", doc), variable
        store = service["environment"]["CBIR_VECTOR_STORE"]
        assert f"`CBIR_VECTOR_STORE={store}`" in doc
    for setting in ("CBIR_ROLE", "CBIR_JOB_LEASE_SECONDS", "CBIR_VECTOR_STORE_PREFIX"):
        assert re.search(rf"`{setting}[`=]", doc), setting
    assert "--heartbeat" in doc


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
    # the image talks to the db service, and to Milvus in the scale profile
    assert ["pip", "install", "-e", ".[postgres,milvus]"] in make


# -- README ------------------------------------------------------------------------------------
def test_readme_deploy_section_matches_the_compose_file(deploy_section: str, services: dict, compose: dict):
    """The one-machine services; the scale profile is docs/scaling.md's (tested below)."""
    default = default_services(services)
    assert "docker compose up" in deploy_section and "http://localhost:8000" in deploy_section
    for name in default:
        assert f"`{name}`" in deploy_section, name
    for volume in {v for s in default.values() for v in named_volumes(s)}:
        assert f"`{volume}`" in deploy_section, volume
    assert "--profile gpu" in deploy_section and HEALTH in deploy_section
    for service in app_services(default).values():
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
