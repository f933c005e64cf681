"""POST /api/alerts (issue 22): Azure Monitor's common alert schema opens one case per alert and resolves it once,
whatever the order and the retries; failures a retry could fix are 503 with Retry-After, within 8 s."""

from __future__ import annotations

import copy
import time

import pytest

from shared import instance
from shared.followups import resolution_id
from shared.intake import record_id
from tests.test_http import assert_error
from triggers import alerts_http

# Microsoft's sample of the common alert schema (learn.microsoft.com/azure/azure-monitor/alerts/alerts-common-schema),
# a metric alert, as published: monitorCondition Resolved.
SAMPLE = {
    "schemaId": "azureMonitorCommonAlertSchema",
    "data": {
        "essentials": {
            "alertId": "/subscriptions/<subscription ID>/providers/Microsoft.AlertsManagement/alerts/"
                       "aaaa0a0a-bb1b-cc2c-dd3d-eeeeee4e4e4e",
            "alertRule": "WCUS-R2-Gen2",
            "severity": "Sev3",
            "signalType": "Metric",
            "monitorCondition": "Resolved",
            "monitoringService": "Platform",
            "alertTargetIDs": ["/subscriptions/<subscription ID>/resourcegroups/pipelinealertrg/providers/"
                               "microsoft.compute/virtualmachines/wcus-r2-gen2"],
            "configurationItems": ["wcus-r2-gen2"],
            "originAlertId": "3f2d4487-b0fc-4125-8bd5-7ad17384221e_PipeLineAlertRG_microsoft.insights_metricAlerts_"
                             "WCUS-R2-Gen2_-117781227",
            "firedDateTime": "2019-03-22T13:58:24.3713213Z",
            "resolvedDateTime": "2019-03-22T14:03:16.2246313Z",
            "description": "",
            "essentialsVersion": "1.0",
            "alertContextVersion": "1.0",
        },
        "alertContext": {
            "properties": None,
            "conditionType": "SingleResourceMultipleMetricCriteria",
            "condition": {
                "windowSize": "PT5M",
                "allOf": [{"metricName": "Percentage CPU", "metricNamespace": "Microsoft.Compute/virtualMachines",
                           "operator": "GreaterThan", "threshold": "25", "timeAggregation": "Average",
                           "dimensions": [{"name": "ResourceId", "value": "3efad9dc-3d50-4eac-9c87-8b3fd6f97e4e"}],
                           "metricValue": 7.727}],
            },
        },
        "customProperties": {"Key1": "Value1", "Key2": "Value2"},
    },
}
ALERT_ID = "alert:aaaa0a0a-bb1b-cc2c-dd3d-eeeeee4e4e4e"  # the sample's alertId holds a space: its last segment


def fired(**essentials):
    body = copy.deepcopy(SAMPLE)
    body["data"]["essentials"].update(monitorCondition="Fired", resolvedDateTime=None, **essentials)
    return body


@pytest.fixture
def alert_account(stack, monkeypatch):
    monkeypatch.setenv("INTAKE_ALERT_ACCOUNT_ID", stack.si.seed_account_id)
    instance.reset(read_timeout=1.0, backoff=0.05)
    return stack.si.seed_account_id


def post(stack, body):
    return stack.call(alerts_http.alert, route="api/alerts", body=body)


def test_fired_then_resolved_opens_one_case_and_resolves_it_once(stack, alert_account):
    status, got, _ = post(stack, fired())
    rid = record_id("incident", "azure-monitor", ALERT_ID)
    assert (status, got) == (201, {"id": rid, "entity": "incident", "created": True, "state": "active"})
    (row,) = stack.si.records("incidents")
    assert (row["title"], row["prioritycode"], row["_customerid_value"]) == ("[Sev3] WCUS-R2-Gen2", 3, alert_account)
    assert "2019-03-22T13:58:24" in row["description"] and "virtualmachines/wcus-r2-gen2" in row["description"]
    assert "Platform" in row["description"]
    assert post(stack, fired())[0] == 200  # the action group's retry, or the same alert fired again
    for _ in range(3):  # Resolved and its retries
        status, got, _ = post(stack, SAMPLE)
        assert (status, got["state"], got["id"]) == (200, "resolved", rid)
    (res,) = stack.si.records("incidentresolutions")
    assert res["activityid"] == resolution_id(rid)
    assert [r["statecode"] for r in stack.si.records("incidents")] == [1]


def test_resolved_that_overtakes_its_fired_creates_then_resolves_and_the_late_fired_changes_nothing(stack,
                                                                                                   alert_account):
    status, got, _ = post(stack, SAMPLE)
    assert (status, got["created"], got["state"]) == (201, True, "resolved")
    status, got, _ = post(stack, fired())  # the Fired, late
    assert (status, got["created"]) == (200, False)
    (row,) = stack.si.records("incidents")
    assert (row["statecode"], row["statuscode"]) == (1, 5)
    assert len(stack.si.records("incidentresolutions")) == 1


@pytest.mark.parametrize("severity, priority", [("Sev0", 1), ("Sev1", 1), ("Sev2", 2), ("Sev4", 3)])
def test_priority_by_severity(stack, alert_account, severity, priority):
    assert post(stack, fired(severity=severity))[0] == 201
    assert stack.si.records("incidents")[0]["prioritycode"] == priority


def test_an_alert_id_that_is_a_key_is_the_case_s_external_id(stack, alert_account):
    real = "/subscriptions/11111111-2222-3333-4444-555555555555/providers/Microsoft.AlertsManagement/alerts/" \
           "aaaa0a0a-bb1b-cc2c-dd3d-eeeeee4e4e4e"
    status, got, _ = post(stack, fired(alertId=real))
    assert (status, got["id"]) == (201, record_id("incident", "azure-monitor", real))


def test_another_schema_is_a_400_naming_it(stack, alert_account):
    status, got, _ = post(stack, {"schemaId": "Microsoft.Insights/activityLogs", "data": {}})
    err = assert_error(status, got, 400, "invalid_request")
    assert err["details"][0]["field"] == "schemaId" and "Microsoft.Insights/activityLogs" in err["message"]
    assert stack.si.records("incidents") == []


def test_a_failure_a_retry_can_fix_is_a_503_with_retry_after_within_8_seconds(stack, alert_account):
    stack.si.fail_next("dataverse", 1000, 500)
    started = time.monotonic()
    status, got, resp = post(stack, SAMPLE)
    assert time.monotonic() - started < 8.0
    assert_error(status, got, 503, "dynamics_unavailable")
    assert int(resp.headers["Retry-After"]) >= 1
    stack.si.clear_faults()
    stack.si.revoke_privilege("prvCreateIncident")  # 502 on the create routes: never retried by an action group
    status, got, resp = post(stack, SAMPLE)
    assert_error(status, got, 503, "dynamics_privilege_missing")
    assert "Retry-After" in resp.headers


def test_an_alert_account_that_does_not_exist_is_a_503_not_a_502(stack, monkeypatch):
    monkeypatch.setenv("INTAKE_ALERT_ACCOUNT_ID", "00000000-0000-4000-8000-000000000001")
    instance.reset(read_timeout=1.0, backoff=0.05)
    status, got, resp = post(stack, fired())
    assert assert_error(status, got, 503, "dynamics_payload_rejected")["upstreamCode"] == "0x80040217"
    assert "Retry-After" in resp.headers


def test_without_an_account_for_alerts_it_is_a_503_naming_the_setting(stack):
    status, got, resp = post(stack, SAMPLE)
    assert "INTAKE_ALERT_ACCOUNT_ID" in assert_error(status, got, 503, "config_invalid")["message"]
    assert stack.si.records("incidents") == []
