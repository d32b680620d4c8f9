"""deploy/aws/template.yaml: cfn-lint (offline) and what the template promises the code."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode

from comeapi.cache.dynamo import ATTRIBUTE_DEFINITIONS, KEY_SCHEMA
from comeapi.protocol.requests import KINDS
from tests.helpers import REPO

TEMPLATE = REPO / "deploy" / "aws" / "template.yaml"


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


def test_the_handlers_exist_in_the_packaged_source(template: dict[str, Any]) -> None:
    for name in ("CacheFunction", "IdleStopFunction"):
        props = template["Resources"][name]["Properties"]
        assert props["Runtime"] == "python3.12"
        code = (TEMPLATE.parent / props["CodeUri"]).resolve()
        module, _, attr = props["Handler"].rpartition(".")
        assert (code / Path(*module.split("."))).with_suffix(".py").is_file()
        assert callable(getattr(importlib.import_module(module), attr))


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
