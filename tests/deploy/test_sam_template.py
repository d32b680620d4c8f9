"""deploy/aws/template.yaml: cfn-lint (offline), what the template promises the code, and the
function package built the way docs/aws.md says, imported from where CodeUri points."""

from __future__ import annotations

import ast
import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode

from comeapi.cache.dynamo import (
    ATTRIBUTE_DEFINITIONS,
    KEY_SCHEMA,
    DynamoStore,
    create_table,
    make_client,
)
from comeapi.protocol.requests import KINDS
from comeapi.serverless.config import (
    FUNCTION_VARIABLES,
    IDLE_STOP_VARIABLES,
    FunctionConfig,
    IdleStopConfig,
    init_in_lambda,
)
from comeapi.serverless.snapshot import ARCHIVE, META, SNAPSHOT_DIR
from tests.aws_local import REGION, dummy_credentials, prompt_entries, start_moto_server
from tests.helpers import REPO, Proc
from tests.serverless.conftest import cold_start

TEMPLATE = REPO / "deploy" / "aws" / "template.yaml"
SERVERLESS = REPO / "src" / "comeapi" / "serverless"
# What Lambda itself sets in a function's environment.
SET_BY_LAMBDA = {"AWS_LAMBDA_FUNCTION_NAME", "AWS_REGION"}


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("cfn-lint")
    argv = [str(exe)] if exe.exists() else [shutil.which("cfn-lint") or "cfn-lint"]
    return subprocess.run(
        [*argv, str(path)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    loaded, problems = decode(str(TEMPLATE))
    assert not problems
    assert loaded is not None
    return dict(loaded)


def test_cfn_lint_passes() -> None:
    result = cfn_lint(TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_catches_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "template.yaml"
    broken.write_text(
        TEMPLATE.read_text().replace("BillingMode: PAY_PER_REQUEST", "BillingMode: FREE")
    )
    assert cfn_lint(broken).returncode != 0


def test_the_table_has_the_stores_schema(template: dict[str, Any]) -> None:
    table = template["Resources"]["CacheTable"]
    assert table["Type"] == "AWS::DynamoDB::Table"
    props = table["Properties"]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert [dict(k) for k in props["KeySchema"]] == KEY_SCHEMA
    assert [dict(a) for a in props["AttributeDefinitions"]] == ATTRIBUTE_DEFINITIONS
    assert table["DeletionPolicy"] == "Retain"  # a stack delete must not lose the cache


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A copy of deploy/aws with its function package built as docs/aws.md says
    (`make lambda-package`), from a table on moto's server; (template, table)."""
    root = tmp_path_factory.mktemp("sam")
    template = root / "deploy" / "aws" / "template.yaml"
    template.parent.mkdir(parents=True)
    shutil.copy(TEMPLATE, template)
    procs: list[Proc] = []

    def spawn(argv: list[str]) -> Proc:
        procs.append(Proc(argv, root / "moto.log"))
        return procs[-1]

    with pytest.MonkeyPatch.context() as monkeypatch:
        dummy_credentials(monkeypatch)
        try:
            endpoint = start_moto_server(spawn)
            store = DynamoStore(make_client(REGION, endpoint), "comeapi-cache")
            create_table(store.client, store.table)
            store.replace_all(prompt_entries("日本の首都はどこですか", 5))
            subprocess.run(
                [
                    "make", "-s", "-o", ".venv/.installed", "lambda-package",
                    f"LAMBDA_PACKAGE={template.parent / 'build' / 'CacheFunction'}",
                    f"LAMBDA_PACKAGE_ARGS=--endpoint-url {endpoint} --region {REGION}",
                ],
                cwd=REPO, check=True, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            yield template, store.table
        finally:
            for proc in procs:
                proc.stop()


def test_the_handlers_exist_in_the_package(
    template: dict[str, Any], package: tuple[Path, str]
) -> None:
    copied, _ = package
    for name in ("CacheFunction", "IdleStopFunction"):
        props = template["Resources"][name]["Properties"]
        assert props["Runtime"] == "python3.12"
        code = (copied.parent / props["CodeUri"]).resolve()
        if name == "IdleStopFunction":
            code = (TEMPLATE.parent / props["CodeUri"]).resolve()  # the repository's src/
        module, _, attr = props["Handler"].rpartition(".")
        assert (code / Path(*module.split("."))).with_suffix(".py").is_file(), code
        assert callable(getattr(importlib.import_module(module), attr))


def test_the_snapshot_is_inside_the_package(
    template: dict[str, Any], package: tuple[Path, str]
) -> None:
    copied, table = package
    code = copied.parent / template["Resources"]["CacheFunction"]["Properties"]["CodeUri"]
    meta = json.loads((code / SNAPSHOT_DIR / META).read_text())
    assert meta["table"] == table
    assert (code / SNAPSHOT_DIR / ARCHIVE).is_file()
    # sam build drops compiled files (its Python builder's exclusions); none are shipped.
    assert not list(code.rglob("__pycache__"))


def test_sam_builds_the_package_with_its_makefile(
    template: dict[str, Any], package: tuple[Path, str], tmp_path: Path
) -> None:
    """What `sam build` does with BuildMethod: makefile: copy CodeUri to a scratch directory,
    run `make build-CacheFunction` there with ARTIFACTS_DIR set. The build then holds the
    package compiled for the runtime (here this interpreter stands in for python3.12)."""
    copied, table = package
    function = template["Resources"]["CacheFunction"]
    assert function["Metadata"]["BuildMethod"] == "makefile"
    runtime = function["Properties"]["Runtime"].removeprefix("python")
    assert (
        f"RUNTIME ?= {runtime}"
        in (copied.parent / function["Properties"]["CodeUri"] / "Makefile").read_text()
    )
    scratch, artifacts = tmp_path / "scratch", tmp_path / "artifacts"
    shutil.copytree(copied.parent / function["Properties"]["CodeUri"], scratch)
    artifacts.mkdir()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    subprocess.run(
        ["make", "-s", "build-CacheFunction", f"PYTHON={sys.executable}", f"RUNTIME={version}"],
        cwd=scratch, env={**os.environ, "ARTIFACTS_DIR": str(artifacts)},
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sorted(p.name for p in artifacts.iterdir()) == ["comeapi", SNAPSHOT_DIR]
    tag = sys.implementation.cache_tag
    assert (artifacts / "comeapi" / "serverless" / "__pycache__" / f"handler.{tag}.pyc").is_file()
    result = cold_start(artifacts, table, "日本の首都はどこですか")
    assert (result["status"], result["cache"], result["loaded"]) == (200, "HIT", [])


def test_the_packaged_handler_answers_a_cold_hit_without_boto3(
    template: dict[str, Any], package: tuple[Path, str]
) -> None:
    copied, table = package
    props = template["Resources"]["CacheFunction"]["Properties"]
    code = copied.parent / props["CodeUri"]
    assert props["Handler"] == "comeapi.serverless.handler.handler"  # what cold_start calls
    result = cold_start(code, table, "日本の首都はどこですか")
    assert result["file"].startswith(str(code))
    assert (result["status"], result["cache"], result["loaded"]) == (200, "HIT", [])


def test_every_handler_route_is_routed(template: dict[str, Any]) -> None:
    events = template["Resources"]["CacheFunction"]["Properties"]["Events"]
    routed = {(e["Properties"]["Method"], e["Properties"]["Path"]) for e in events.values()}
    assert {("POST", path) for path in KINDS} <= routed
    assert all(e["Type"] == "HttpApi" for e in events.values())


def statements(policies: list[Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """(condition or None, statement) for every inline statement."""
    out: list[tuple[str | None, dict[str, Any]]] = []
    for policy in policies:
        if "Fn::If" in policy:
            condition, then, _ = policy["Fn::If"]
            out += [(condition, s) for s in then["Statement"]]
        else:
            out += [(None, s) for s in policy["Statement"]]
    return out


def actions(statement: dict[str, Any]) -> set[str]:
    action = statement["Action"]
    return {action} if isinstance(action, str) else set(action)


def test_least_privilege(template: dict[str, Any]) -> None:
    policies = template["Resources"]["CacheFunction"]["Properties"]["Policies"]
    found = statements(policies)
    unconditional = [s for c, s in found if c is None]
    assert len(unconditional) == 1
    assert actions(unconditional[0]) == {"dynamodb:GetItem"}
    assert unconditional[0]["Resource"] == {"Fn::GetAtt": ["CacheTable", "Arn"]}
    ec2 = [s for c, s in found if c is not None]
    assert all(c == "OnDemand" for c, _ in found if c is not None)
    assert set().union(*(actions(s) for s in ec2)) == {
        "ec2:StartInstances",
        "ec2:CreateTags",
        "ec2:DescribeInstances",
    }
    for s in ec2:
        if actions(s) != {"ec2:DescribeInstances"}:  # Describe* cannot be narrowed
            assert "instance/${BackendInstanceId}" in s["Resource"]["Fn::Sub"]
    for _, s in found:
        assert s["Effect"] == "Allow"
        # Only DescribeInstances, which supports no resource-level permissions, gets "*".
        assert s["Resource"] != "*" or actions(s) == {"ec2:DescribeInstances"}


def test_on_demand_parts_exist_only_with_an_instance(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    assert resources["IdleStopFunction"]["Condition"] == "OnDemand"
    assert resources["IdleStopFunctionLogs"]["Condition"] == "OnDemand"
    schedule = resources["IdleStopFunction"]["Properties"]["Events"]["EveryFiveMinutes"]
    assert schedule["Type"] == "Schedule"
    env = resources["CacheFunction"]["Properties"]["Environment"]["Variables"]
    assert env["ON_MISS"] == {"Fn::If": ["OnDemand", "start-backend", "reject"]}
    assert env["TABLE_NAME"] == {"Ref": "CacheTable"}


def environment_reads(path: Path) -> set[tuple[str, str]]:
    """(function, variable) for each environment variable the module reads by name:
    ``environ.get("X")``, ``environ["X"]``, ``os.getenv("X")``, ``helper(environ, "X", ...)``."""
    found: set[tuple[str, str]] = set()

    def is_environ(node: ast.expr) -> bool:
        return (isinstance(node, ast.Name) and node.id == "environ") or (
            isinstance(node, ast.Attribute) and node.attr == "environ"
        )

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            return [node.slice.value] if isinstance(node.slice, ast.Constant) else ["?"]
        if not isinstance(node, ast.Call):
            return []
        func, args = node.func, node.args
        if isinstance(func, ast.Attribute) and func.attr == "get" and is_environ(func.value):
            return [args[0].value] if args and isinstance(args[0], ast.Constant) else ["?"]
        if isinstance(func, ast.Attribute) and func.attr == "getenv":
            return [args[0].value] if args and isinstance(args[0], ast.Constant) else ["?"]
        return [
            b.value
            for a, b in itertools.pairwise(args)
            if is_environ(a) and isinstance(b, ast.Constant)
        ]

    tree = ast.parse(path.read_text(encoding="utf-8"))
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef):
            for node in ast.walk(function):
                found.update((function.name, str(name)) for name in names(node))
    return found


class Recorded(dict[str, str]):
    """An environment that records every variable looked up in it."""

    def __init__(self, values: dict[str, str]):
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def test_every_variable_the_functions_read_is_declared(template: dict[str, Any]) -> None:
    """`sam local --env-vars` sets only declared variables, so an undeclared one cannot point
    the function at a local DynamoDB (a miss then went to AWS and timed out after 29 s).
    What the functions read is what their config objects read (serverless/config.py, the
    variables named by their fields): nothing else in serverless/ reads the environment."""
    for path in SERVERLESS.glob("*.py"):
        if path.name != "config.py":
            assert not environment_reads(path), (path.name, environment_reads(path))
    cache_env = Recorded(
        {"TABLE_NAME": "t", "ON_MISS": "start-backend", "BACKEND_INSTANCE_ID": "i-0"}
    )
    FunctionConfig.from_env(cache_env)
    init_in_lambda(cache_env)
    idle_env = Recorded({"BACKEND_INSTANCE_ID": "i-0"})
    IdleStopConfig.from_env(idle_env)
    assert cache_env.read - SET_BY_LAMBDA == set(FUNCTION_VARIABLES)
    assert idle_env.read == set(IDLE_STOP_VARIABLES)
    assert {"TABLE_NAME", "DYNAMODB_ENDPOINT_URL", "SNAPSHOT", "FORWARD_TIMEOUT"} <= cache_env.read
    resources = template["Resources"]
    for name, wanted in (("CacheFunction", cache_env.read), ("IdleStopFunction", idle_env.read)):
        declared = resources[name]["Properties"]["Environment"]["Variables"]
        assert wanted - SET_BY_LAMBDA <= set(declared), (name, wanted - set(declared))
    # Empty on AWS: the region's own endpoint.
    assert (
        resources["CacheFunction"]["Properties"]["Environment"]["Variables"][
            "DYNAMODB_ENDPOINT_URL"
        ]
        == ""
    )


def test_the_architecture_is_a_parameter_arm64_by_default(template: dict[str, Any]) -> None:
    """arm64 on AWS; x86_64 for `sam local` on an x86-64 machine (no arm64 emulation)."""
    parameter = template["Parameters"]["Architecture"]
    assert parameter["Default"] == "arm64"
    assert set(parameter["AllowedValues"]) == {"arm64", "x86_64"}
    for name in ("CacheFunction", "IdleStopFunction"):
        properties = template["Resources"][name]["Properties"]
        assert properties["Architectures"] == [{"Ref": "Architecture"}]


def test_the_package_build_finds_the_runtimes_python_or_fails(
    template: dict[str, Any], package: tuple[Path, str], tmp_path: Path
) -> None:
    """`sam build` must not ship source without saying so: with python3.12 on the PATH an
    inactive pyenv shim (it exits 127) and no other, the build fails; pyenv's own install
    of the runtime's version is found behind the shim; PYC=off ships source on purpose.
    (This interpreter's version stands in for the runtime's.)"""
    copied, _ = package
    code = copied.parent / template["Resources"]["CacheFunction"]["Properties"]["CodeUri"]
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shims = tmp_path / "shims"
    shims.mkdir()
    shim = shims / f"python{version}"
    shim.write_text("#!/bin/sh\necho 'pyenv: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()

    def build(*args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        scratch, artifacts = tmp_path / "scratch", tmp_path / "artifacts"
        for path in (scratch, artifacts):
            shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(code, scratch)
        artifacts.mkdir()
        env = {"PATH": f"{shims}:/usr/bin:/bin", "HOME": str(home), "ARTIFACTS_DIR": str(artifacts)}
        done = subprocess.run(
            ["make", "-s", "build-CacheFunction", f"RUNTIME={version}", *args],
            cwd=scratch, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        return done, artifacts

    tag = sys.implementation.cache_tag
    compiled = Path("comeapi", "serverless", "__pycache__", f"handler.{tag}.pyc")
    failed, artifacts = build()
    assert failed.returncode != 0, failed.stdout
    assert f"no Python {version}" in failed.stderr and "PYC=off" in failed.stderr
    source, artifacts = build("PYC=off")
    assert source.returncode == 0, source.stderr
    assert not list(artifacts.rglob("*.pyc"))
    pyenv = home / ".pyenv" / "versions" / f"{version}.99" / "bin"
    pyenv.mkdir(parents=True)
    (pyenv / f"python{version}").symlink_to(sys.executable)
    found, artifacts = build()
    assert found.returncode == 0, found.stderr
    assert str(pyenv) in found.stdout
    assert (artifacts / compiled).is_file()
