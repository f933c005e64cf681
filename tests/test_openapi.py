"""The OpenAPI document and the Power Automate connector: generated from the contract, valid, and true.

schemathesis drives the functions over a real socket (devstack/httphost.py) from the committed document:
no 500, and every answer's status, headers and body must be what the document says, so the test
fails when the document and the code disagree.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate

from devstack.httphost import FUNCTION_KEY, serve
from shared.errors import CODES
from tools import apidocs
from triggers import ops

DOC = json.loads(apidocs.OPENAPI.read_text())
SWAGGER = json.loads(apidocs.SWAGGER.read_text())
PROPERTIES = json.loads((apidocs.SWAGGER.parent / "apiProperties.json").read_text())


def test_committed_documents_are_generated_from_the_one_source(capsys):
    assert apidocs.main(["--check"]) == 0, capsys.readouterr().err


def test_openapi_3_1_and_swagger_2_0_are_valid():
    validate(DOC)
    validate(SWAGGER)
    assert DOC["openapi"] == "3.1.0" and SWAGGER["swagger"] == "2.0"


def test_every_code_of_the_table_is_documented_under_its_status():
    documented = {}
    for status, resp in DOC["paths"]["/cases"]["post"]["responses"].items():
        schema = resp.get("content", {}).get("application/json", {}).get("schema", {})
        for code in schema.get("properties", {}).get("error", {}).get("properties", {}).get("code", {}).get("enum", []):
            documented[code] = int(status)
    assert documented == {code: spec.status for code, spec in CODES.items()}


def test_connector_operations_and_api_key():
    ops_ = {op["operationId"]: op for path in SWAGGER["paths"].values() for op in path.values()}
    assert set(ops_) == {"CreateCase", "CreateLead", "AddCaseNote", "AddLeadNote", "ResolveCase", "CancelCase",
                         "UpdateCase"}
    for op in ops_.values():
        assert op["summary"] and op["description"] and op["operationId"][0].isupper()
    assert SWAGGER["securityDefinitions"]["api_key"] == {"type": "apiKey", "in": "header", "name": "x-functions-key"}
    key = PROPERTIES["properties"]["connectionParameters"]["api_key"]
    assert key["type"] == "securestring"
    assert {"displayName", "description", "tooltip", "constraints"} <= set(key["uiDefinition"])


def test_the_app_serves_the_committed_document(stack):
    status, body, resp = stack.call(ops.openapi, method="GET", route="api/openapi.json")
    assert status == 200 and body == DOC
    assert stack.si.counts["dataverse"]["total"] == 0


SCHEMA = schemathesis.openapi.from_dict(DOC)


@pytest.fixture(params=["function_key", "entra"])
def served(stack, request, monkeypatch):
    """The functions behind a socket, under function keys (the host's key check) and under entra (a token)."""
    headers = {"x-functions-key": FUNCTION_KEY}
    if request.param == "entra":
        from tests.test_callers import use_entra

        headers = {"Authorization": f"Bearer {use_entra(stack, monkeypatch)}"}
    with serve(keys=request.param != "entra") as url:
        yield url, headers
    from shared import caller_tokens

    caller_tokens.reset()


@SCHEMA.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_the_functions_answer_as_documented(case, served):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import positive_data_acceptance, unsupported_method

    # Undeclared methods are the host's routing, not the app's (the stand-in host answers 405 without Allow).
    # A body the schema accepts may still be refused by Dataverse (an unknown column, an account that does
    # not exist): a documented 502 with its code, so "any 5xx" is no finding; a 500 is.
    base_url, headers = served
    response = case.call_and_validate(base_url=base_url, headers=headers,
                                      excluded_checks=[positive_data_acceptance, not_a_server_error,
                                                                       unsupported_method])
    assert response.status_code != 500, response.text


def test_both_caller_schemes_are_declared_and_the_entra_connector_uses_aad():
    schemes = DOC["components"]["securitySchemes"]
    assert set(schemes) == {"functionKey", "entraId"}
    assert DOC["security"] == [{"functionKey": []}, {"entraId": [apidocs.API_SCOPE]}]  # either one
    assert apidocs.API_SCOPE in schemes["entraId"]["flows"]["clientCredentials"]["scopes"]
    entra = json.loads(apidocs.SWAGGER_ENTRA.read_text())
    validate(entra)
    assert entra["securityDefinitions"]["oauth2_auth"]["type"] == "oauth2" and entra["security"] == [
        {"oauth2_auth": []}]
    assert entra["paths"] == SWAGGER["paths"]
    props = json.loads((apidocs.SWAGGER_ENTRA.parent / "apiProperties.json").read_text())
    token = props["properties"]["connectionParameters"]["token"]
    assert token["type"] == "oauthSetting" and token["oAuthSettings"]["identityProvider"] == "aad"
    assert token["oAuthSettings"]["properties"]["AzureActiveDirectoryResourceId"] == "api://<INTAKE_API_CLIENT_ID>"
    for status in ("401", "403"):
        codes = DOC["paths"]["/cases"]["post"]["responses"][status]["content"]["application/json"]["schema"]
        assert codes["properties"]["error"]["properties"]["code"]["enum"]
