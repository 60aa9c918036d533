from __future__ import annotations

import json

import pytest

from agent.containers import ContainerSummary
from agent.recovery import parse_labels
from tests.unit.test_models import SPEC


def summary(labels):
    return ContainerSummary("c1", "x", True, labels, "sha256:i")


def good_labels():
    return {
        "drove.job.type": "COMPUTATION",
        "drove.instance.id": SPEC["instanceId"],
        "drove.instance.spec": json.dumps(SPEC),
        "drove.instance.info": json.dumps({"executorId": "e1", "created": 5, "updated": 6}),
    }


def test_good_labels_parse():
    parsed = parse_labels(summary(good_labels()))
    assert not isinstance(parsed, str)
    assert parsed.spec.instance_id == SPEC["instanceId"]
    assert parsed.info["executorId"] == "e1"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"drove.job.type": "SERVICE"}, "job type 'SERVICE' is not COMPUTATION"),
        ({"drove.instance.id": ""}, "label drove.instance.id is missing"),
        ({"drove.instance.spec": "{not json"}, "labels cannot be parsed"),
        (
            {"drove.instance.spec": json.dumps({**SPEC, "resources": []})},
            "labels cannot be parsed: drove.instance.spec.resources",
        ),
        ({"drove.instance.info": "[]"}, "label drove.instance.info is not a JSON object"),
        ({"drove.instance.id": "TI-other"}, "does not match the spec"),
    ],
)
def test_garbled_labels_give_a_reason_not_a_crash(change, reason):
    labels = {**good_labels(), **change}
    parsed = parse_labels(summary(labels))
    assert isinstance(parsed, str)
    assert reason in parsed


def test_missing_labels():
    assert parse_labels(summary({})) == "job type None is not COMPUTATION"
