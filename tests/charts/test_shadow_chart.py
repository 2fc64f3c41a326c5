"""The chart's shadow policy (``policy.shadow``): a second key of the policy ConfigMap,
passed to ``switchyard serve --shadow``. Its value set in tests/charts/test_chart.py
(``shadow-policy``) also goes through lint, the Kubernetes schemas and Envoy's validation."""

from __future__ import annotations

import pytest

from tests.charts.conftest import find, render
from tests.charts.test_chart import EXISTING_POLICY, VALUE_SETS


def _switchyard(manifests):
    return find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][1]


def test_a_shadow_policy_is_a_second_key_of_the_policy_configmap_passed_to_serve():
    manifests = render(VALUE_SETS["shadow-policy"])
    config_map = find(manifests, "ConfigMap")
    assert config_map["data"]["shadow.yaml"].strip() == EXISTING_POLICY.strip()
    assert "policy.yaml" in config_map["data"]
    switchyard = _switchyard(manifests)
    mount = next(m for m in switchyard["volumeMounts"] if m["name"] == "policy")
    args = switchyard["args"]
    assert args[args.index("--shadow") + 1] == mount["mountPath"] + "/shadow.yaml"  # reloaded like the policy


def test_no_shadow_by_default():
    manifests = render({})
    assert "--shadow" not in _switchyard(manifests)["args"]
    assert set(find(manifests, "ConfigMap")["data"]) == {"policy.yaml"}


def test_a_shadow_from_an_existing_configmap_is_only_named():
    manifests = render({"policy": {"existingConfigMap": "team-policy", "key": "routing.yaml",
                                   "shadow": {"enabled": True, "key": "candidate.yaml"}},
                        "backends": VALUE_SETS["existing-policy-configmap"]["backends"]})
    assert [m for m in manifests if m["kind"] == "ConfigMap"] == []
    assert "/etc/switchyard/policy/candidate.yaml" in _switchyard(manifests)["args"]


def test_an_enabled_shadow_without_content_fails():
    import helm_python

    with pytest.raises(helm_python.HelmError, match="policy.shadow.content"):
        render({"policy": {"shadow": {"enabled": True}}})
