"""Offline checks of the deployment template (infra/) against the app it deploys.

Neither the Azure CLI nor the bicep CLI is available here, so every .bicep file is parsed with pycep
(package pycep-parser) and the checks read the parsed structure. Two things pycep leaves as text, and
how they are handled:

* A string interpolation such as 'ClientId=${identityClientId};Authorization=AAD' stays one string.
  Each `${...}` part is cut out with a regular expression and parsed by pycep itself (`_interpolations`).
* A reference (`principalId`) and a string literal ('principalId') parse to the same Python str. A bare
  string that names a parameter, variable, resource or module of its file is taken as a reference; any
  other string is a literal (`_resolve`, `_walk`).

Values are followed across files: a module's parameter to the value its caller passes, and
`module.outputs.x` to the output in the module's file, so that e.g. a role assignment's principalId in
modules/storage.bicep is traced back to the managed identity's `properties.principalId`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from pycep import BicepParser

from shared.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
PARAMETERS = INFRA / "main.parameters.json"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

IDENTITY_TYPE = "Microsoft.ManagedIdentity/userAssignedIdentities"
SITE_TYPE = "Microsoft.Web/sites"
PLAN_TYPE = "Microsoft.Web/serverfarms"
STORAGE_TYPE = "Microsoft.Storage/storageAccounts"
QUEUE_TYPE = "Microsoft.Storage/storageAccounts/queueServices/queues"
VAULT_TYPE = "Microsoft.KeyVault/vaults"
SECRET_TYPE = "Microsoft.KeyVault/vaults/secrets"
APP_INSIGHTS_TYPE = "Microsoft.Insights/components"
ROLE_ASSIGNMENT_TYPE = "Microsoft.Authorization/roleAssignments"

# Built-in role definition ids (the same in every tenant) and the resource type each must be scoped to.
APP_ROLES = {
    "Storage Blob Data Owner": ("b7e6dc6d-f1e8-4753-8033-0f276bb0955b", STORAGE_TYPE),
    "Storage Queue Data Contributor": ("974c5e8b-45b9-4653-ba55-5f855dd0fb88", STORAGE_TYPE),
    "Key Vault Secrets User": ("4633458b-17de-408a-b874-0445c86b69e6", VAULT_TYPE),
    "Monitoring Metrics Publisher": ("3913510d-42f4-4e42-8a64-420c390055eb", APP_INSIGHTS_TYPE),
}

# App settings the platform needs rather than the app's code (shared/settings.py); everything else the
# template sets must be a setting the code reads. Flex Consumption takes the runtime from
# functionAppConfig, so there is no FUNCTIONS_WORKER_RUNTIME / FUNCTIONS_EXTENSION_VERSION.
PLATFORM_SETTINGS = {
    "AzureWebJobsStorage__credential",  # host storage by identity: 'managedidentity'
    "AzureWebJobsStorage__clientId",  # ... the user-assigned identity's client id
    "AzureWebJobsStorage__blobServiceUri",  # ... host blobs (keys, leases)
    "AzureWebJobsStorage__queueServiceUri",  # ... the queues the triggers read
    "APPLICATIONINSIGHTS_CONNECTION_STRING",  # telemetry target (no credential in it)
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",  # telemetry by Entra ID: ClientId=...;Authorization=AAD
    "AZURE_CLIENT_ID",  # DefaultAzureCredential picks the user-assigned identity (Key Vault)
    "PYTHON_ENABLE_OPENTELEMETRY",  # the Python worker's OpenTelemetry (host.json telemetryMode)
    "AzureFunctionsJobHost__extensions__queues__batchSize",  # per-instance queue concurrency (fleet budget)
    "AzureFunctionsJobHost__extensions__queues__newBatchThreshold",
}

# Queues the app reads (cases, leads), writes (-rejected) and the host poisons failures to (-poison).
QUEUES = {"cases", "leads", "cases-rejected", "leads-rejected", "cases-poison", "leads-poison", "followups",
          "followups-rejected", "followups-poison"}

_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
# Literals no app setting may hold: a storage key or SAS, a password, an Entra ID client secret
# (xxxNQ~ followed by ~34 characters), or any long run of key-like characters mixing letters and digits.
_SECRET_MARKERS = ("accountkey=", "sharedaccesssignature=", "sig=", "password=", "pwd=", "clientsecret=")
_ENTRA_SECRET = re.compile(r"[\w.~-]{3}\dQ~[\w.~-]{31,34}")
_KEYLIKE = re.compile(r"[A-Za-z0-9+/=_~-]{32,}")


# --- reading the parsed template -------------------------------------------------------------------


@cache
def _doc(path: Path) -> dict:
    return BicepParser().parse(file_path=path)


def _unwrap(config: dict) -> dict:
    """The body of a resource or module, under any `if (...)` condition or `[for ...]` loop."""
    while isinstance(config, dict) and "config" in config and {"condition", "loop_type"} & set(config):
        config = config["config"]
    return config


def _resources(path: Path) -> dict[str, dict]:
    return _doc(path).get("resources", {})


def _all_resources(rtype: str) -> list[tuple[Path, str, dict]]:
    """(file, symbolic name, body) of every resource of a type, in every file."""
    return [(path, name, _unwrap(res["config"])) for path in BICEP_FILES
            for name, res in _resources(path).items() if res["type"] == rtype and not res["existing"]]


def _one(rtype: str) -> tuple[Path, str, dict]:
    found = _all_resources(rtype)
    assert len(found) == 1, f"expected exactly one {rtype}, found {[(p.name, n) for p, n, _ in found]}"
    return found[0]


def _module_file(caller: Path, module: dict) -> Path:
    assert module["type"] == "local", "only local modules can be checked offline"
    return (caller.parent / module["detail"]["path"]).resolve()


def _callers(path: Path) -> list[tuple[Path, dict]]:
    """(calling file, params it passes) for every module call of `path`."""
    return [(caller, _unwrap(module["config"]).get("params", {}))
            for caller in BICEP_FILES for module in _doc(caller).get("modules", {}).values()
            if _module_file(caller, module) == path.resolve()]


def _chain(expr: object) -> list[str] | None:
    """`a.b.c` as ['a', 'b', 'c'], or None for anything but a plain property access."""
    if isinstance(expr, str):
        return [expr]
    if isinstance(expr, dict) and expr.get("operator", {}).get("type") == "property_accessor":
        left, right = (_chain(expr["operator"]["operands"][k]) for k in ("operand_1", "operand_2"))
        return left + right if left is not None and right is not None else None
    return None


def _interpolations(text: str) -> list[object]:
    """The `${...}` parts of an interpolated string, each parsed by pycep as an expression."""
    return [BicepParser().parse(text=f"var x = {part}\n")["variables"]["x"]["value"]
            for part in _INTERPOLATION.findall(text)]


def _step(path: Path, expr: object) -> tuple[Path, object] | None:
    """One step from a reference to what it stands for, or None if `expr` is not a followable reference."""
    doc = _doc(path)
    chain = _chain(expr)
    if chain is None or "${" in chain[0]:
        return None
    head = chain[0]
    if len(chain) == 1 and head in doc.get("parameters", {}):
        callers = _callers(path)
        if not callers:
            return None  # a parameter of main.bicep: the end of the trail
        assert len(callers) == 1, f"{path.name} is called more than once; cannot follow {head}"
        caller, params = callers[0]
        if head in params:
            return caller, params[head]
        return path, doc["parameters"][head]["default"]
    if len(chain) == 1 and head in doc.get("variables", {}):
        return path, doc["variables"][head]["value"]
    if len(chain) == 3 and head in doc.get("modules", {}) and chain[1] == "outputs":
        target = _module_file(path, doc["modules"][head])
        return target, _doc(target)["outputs"][chain[2]]["value"]
    return None


def _resolve(path: Path, expr: object) -> tuple[Path, object]:
    """Follow parameters, variables and module outputs until what is left is not a plain reference."""
    for _ in range(20):
        nxt = _step(path, expr)
        if nxt is None:
            return path, expr
        path, expr = nxt
    raise AssertionError(f"reference loop from {expr!r}")


def _points_to(path: Path, expr: object, rtype: str, *attrs: str) -> bool:
    """Does `expr` in `path` resolve to `<resource of type rtype>.<attrs>`?"""
    where, value = _resolve(path, expr)
    chain = _chain(value)
    if not chain or chain[1:] != list(attrs):
        return False
    resource = _resources(where).get(chain[0])
    return resource is not None and resource["type"] == rtype


def _walk(path: Path, expr: object, seen: set | None = None) -> Iterator[tuple[Path, object]]:
    """Every node of `expr` and of everything it references, across files."""
    seen = set() if seen is None else seen
    key = (path, json.dumps(expr, sort_keys=True, default=str))
    if key in seen:
        return
    seen.add(key)
    yield path, expr
    if isinstance(expr, str):
        for part in _interpolations(expr):
            yield from _walk(path, part, seen)
        nxt = _step(path, expr)
        if nxt is not None:
            yield from _walk(*nxt, seen)
    elif isinstance(expr, dict):
        nxt = _step(path, expr)
        if nxt is not None:
            yield from _walk(*nxt, seen)
        operator = expr.get("operator", {})
        if operator.get("type") == "property_accessor" and _chain(operator["operands"]["operand_2"]):
            # In `x.a.b` only x is an expression; a and b are member names, not references.
            yield from _walk(path, operator["operands"]["operand_1"], seen)
            return
        for value in expr.values():
            yield from _walk(path, value, seen)
    elif isinstance(expr, list):
        for value in expr:
            yield from _walk(path, value, seen)


def _is_reference(path: Path, text: str) -> bool:
    doc = _doc(path)
    return any(text in doc.get(kind, {}) for kind in ("parameters", "variables", "resources", "modules"))


def _literals(path: Path, expr: object) -> set[str]:
    """String literals in `expr` and in everything it references."""
    return {node for where, node in _walk(path, expr)
            if isinstance(node, str) and not _is_reference(where, node)}


def _main_params_reached(path: Path, expr: object) -> set[str]:
    main = MAIN.resolve()
    params = _doc(main)["parameters"]
    return {node for where, node in _walk(path, expr)
            if where == main and isinstance(node, str) and node in params}


def _site() -> tuple[Path, dict]:
    path, _, body = _one(SITE_TYPE)
    return path, body


def _service_tag() -> str | None:
    """The site's azd-service-name tag, by which `azd deploy` finds the resource of a service."""
    path, site = _site()
    for _, node in _walk(path, site.get("tags")):
        if isinstance(node, dict):
            for key, value in node.items():
                if key.strip("'") == "azd-service-name":
                    return value
    return None


def _app_settings() -> tuple[Path, list[dict]]:
    path, site = _site()
    settings = site["properties"]["siteConfig"]["appSettings"]
    assert isinstance(settings, list), "appSettings must be a literal list of {name, value} to be checked"
    return path, settings


def _setting(name: str) -> object:
    _, settings = _app_settings()
    values = [s["value"] for s in settings if s["name"] == name]
    assert len(values) == 1, f"{name} is set {len(values)} times"
    return values[0]


def _parameters_file() -> dict:
    return json.loads(PARAMETERS.read_text())["parameters"]


# --- the tests -------------------------------------------------------------------------------------


def test_infra_has_main_template_and_modules() -> None:
    assert MAIN in BICEP_FILES
    assert len(BICEP_FILES) > 1


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_bicep_file_parses(path: Path) -> None:
    doc = _doc(path)
    assert doc.get("resources") or doc.get("modules"), f"{path.name} declares nothing"


def test_every_module_call_names_an_existing_file() -> None:
    for caller in BICEP_FILES:
        for name, module in _doc(caller).get("modules", {}).items():
            assert _module_file(caller, module) in BICEP_FILES, f"{caller.name}: module {name}"


def test_plan_is_flex_consumption() -> None:
    path, plan_name, plan = _one(PLAN_TYPE)
    assert plan["sku"]["name"] == "FC1"
    assert plan["sku"]["tier"] == "FlexConsumption"
    site_path, site = _site()
    assert site_path == path and _chain(site["properties"]["serverFarmId"]) == [plan_name, "id"]


def test_site_runs_as_user_assigned_identity() -> None:
    path, site = _site()
    assert site["identity"]["type"] == "UserAssigned"
    keys = list(site["identity"]["userAssignedIdentities"])
    assert len(keys) == 1
    parts = _interpolations(keys[0])
    assert len(parts) == 1 and _points_to(path, parts[0], IDENTITY_TYPE, "id")


def test_flex_function_app_config() -> None:
    path, site = _site()
    config = site["properties"]["functionAppConfig"]
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"]["type"] == "UserAssignedIdentity"
    assert _points_to(path, storage["authentication"]["userAssignedIdentityResourceId"], IDENTITY_TYPE, "id")
    assert config["runtime"]["name"] == "python"
    assert _resolve(path, config["runtime"]["version"])[1] in {"3.11", "3.12"}
    assert {"instanceMemoryMB", "maximumInstanceCount"} <= set(config["scaleAndConcurrency"])
    assert _service_tag() == "api"


def _role_assignments() -> list[tuple[Path, str, dict, str]]:
    """(file, name, body, role definition guid) of every role assignment."""
    out = []
    for path, name, body in _all_resources(ROLE_ASSIGNMENT_TYPE):
        where, role = _resolve(path, body["properties"]["roleDefinitionId"])
        function = role["function"] if isinstance(role, dict) and "function" in role else {}
        assert function.get("type") == "subscription_resource_id", f"{path.name}:{name}: not a built-in role"
        assert function["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
        guid = _resolve(where, function["parameters"]["resource_name_1"])[1]
        out.append((path, name, body, guid))
    return out


def _is_app_identity(path: Path, role_assignment: dict) -> bool:
    principal = role_assignment["properties"]["principalId"]
    return _points_to(path, principal, IDENTITY_TYPE, "properties", "principalId")


@pytest.mark.parametrize("role", sorted(APP_ROLES))
def test_app_identity_has_role(role: str) -> None:
    role_id, scope_type = APP_ROLES[role]
    found = [(path, name, body) for path, name, body, guid in _role_assignments()
             if guid == role_id and _is_app_identity(path, body)]
    assert len(found) == 1, f"{role}: expected one assignment to the app's managed identity, found {len(found)}"
    path, name, body = found[0]
    assert body["properties"]["principalType"] == "ServicePrincipal"
    scope = _resources(path).get(body["scope"])
    assert scope is not None and scope["type"] == scope_type, f"{role} must be scoped to the {scope_type}"
    name_parts = body["name"]["function"]
    assert name_parts["type"] == "guid", f"{name}: role assignment names must be guid(...)"


def test_app_identity_has_no_other_role() -> None:
    granted = {guid for path, _, body, guid in _role_assignments() if _is_app_identity(path, body)}
    assert granted == {role_id for role_id, _ in APP_ROLES.values()}


# What the deployer (azd's AZURE_PRINCIPAL_ID) needs for `python -m tools.queues ... --account-url`: shared
# keys are off, so the queues (and a claim-check body's blob) are reached with the user's own Entra ID token.
DEPLOYER_STORAGE_ROLES = {
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage Blob Data Contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
}


def _is_deployer(path: Path, role_assignment: dict) -> bool:
    """Does the assignment's principal trace back to main.bicep's `principalId` (azd's AZURE_PRINCIPAL_ID)?"""
    where, value = _resolve(path, role_assignment["properties"]["principalId"])
    return where == MAIN.resolve() and value == "principalId"


@pytest.mark.parametrize("role", sorted(DEPLOYER_STORAGE_ROLES))
def test_deployer_gets_storage_data_role_when_given(role: str) -> None:
    assert _parameters_file()["principalId"]["value"] == "${AZURE_PRINCIPAL_ID}"
    found = [(path, name, body) for path, name, body, guid in _role_assignments()
             if guid == DEPLOYER_STORAGE_ROLES[role] and _is_deployer(path, body)]
    assert len(found) == 1, f"{role}: expected one assignment to the deployer, found {len(found)}"
    path, name, body = found[0]
    scope = _resources(path).get(body["scope"])
    assert scope is not None and scope["type"] == STORAGE_TYPE, f"{role} must be scoped to the storage account"
    # Only when a principal is given: `azd provision` by a pipeline without one must not fail.
    condition = _resources(path)[name]["config"]["condition"]
    assert condition["operator"]["type"] == "not", condition
    function = condition["operator"]["operands"]["bool_value"]["function"]
    assert function["type"] == "empty"
    assert _resolve(path, function["parameters"]["item_to_test"]) == (MAIN.resolve(), "principalId")
    # principalType: User unless AZURE_PRINCIPAL_TYPE says otherwise (a service principal in a pipeline).
    assert _parameters_file()["principalType"]["value"] == "${AZURE_PRINCIPAL_TYPE}"
    kind = body["properties"]["principalType"]
    assert _main_params_reached(path, kind) == {"principalType"}
    assert "User" in _literals(path, kind)
    assert _doc(MAIN)["parameters"]["principalType"]["default"] == ""


def test_key_vault_uses_rbac_and_soft_delete() -> None:
    _, _, vault = _one(VAULT_TYPE)
    assert vault["properties"]["enableRbacAuthorization"] is True
    assert vault["properties"]["enableSoftDelete"] is True
    assert "accessPolicies" not in vault["properties"]


def test_storage_is_reached_by_identity_only() -> None:
    _, _, storage = _one(STORAGE_TYPE)
    assert storage["properties"]["allowSharedKeyAccess"] is False
    assert storage["properties"]["minimumTlsVersion"] == "TLS1_2"
    assert storage["properties"]["allowBlobPublicAccess"] is False


def test_queues_are_created() -> None:
    names: set[str] = set()
    for path, name, _ in _all_resources(QUEUE_TYPE):
        config = _resources(path)[name]["config"]
        if "loop_type" in config:
            assert _unwrap(config)["name"] == config["loop_type"]["detail"]["item_name"]
            items = _resolve(path, config["loop_type"]["detail"]["array_name"])[1]
            assert isinstance(items, list), "the queue names must be a literal list"
            names |= set(items)
        else:
            names.add(_resolve(path, config["name"])[1])
    assert names == QUEUES


def test_app_settings_are_the_settings_module_plus_platform() -> None:
    _, settings = _app_settings()
    names = [s["name"] for s in settings]
    assert len(names) == len(set(names)), "an app setting is set twice"
    assert PLATFORM_SETTINGS <= set(names), f"missing platform settings: {PLATFORM_SETTINGS - set(names)}"
    assert set(names) - PLATFORM_SETTINGS == {s.name for s in SETTINGS}


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.name != "KEY_VAULT_URL"], ids=lambda s: s.name)
def test_setting_comes_from_azd_environment(setting) -> None:
    path, _ = _app_settings()
    value = _setting(setting.name)
    params = _main_params_reached(path, value)
    file_values = {p: _parameters_file().get(p, {}).get("value") for p in params}
    assert f"${{{setting.name}}}" in file_values.values(), \
        f"{setting.name} must come from a main.bicep parameter fed by ${{{setting.name}}}: {file_values}"
    if setting.default is not None and setting.name != "INTAKE_DATAVERSE_CONCURRENCY":  # computed: below
        assert setting.default in _literals(path, value), \
            f"{setting.name}: the template's fallback must be the code's default {setting.default!r}"


def test_key_vault_url_is_the_vault_uri_without_trailing_slash() -> None:
    path, _ = _app_settings()
    where, value = _resolve(path, _setting("KEY_VAULT_URL"))
    assert not _points_to(where, value, VAULT_TYPE, "properties", "vaultUri"), "the raw vaultUri ends in '/'"
    nodes = list(_walk(where, value))
    assert any(_points_to(w, n, VAULT_TYPE, "properties", "vaultUri") for w, n in nodes if _chain(n))
    functions = {n["function"]["type"] for _, n in nodes if isinstance(n, dict) and "function" in n}
    assert functions & {"substring", "take", "replace", "trim"}, "the trailing slash must be cut"


def test_identity_settings_name_the_app_identity() -> None:
    path, _ = _app_settings()
    for name in ("AZURE_CLIENT_ID", "AzureWebJobsStorage__clientId"):
        assert _points_to(path, _setting(name), IDENTITY_TYPE, "properties", "clientId"), name
    assert _setting("AzureWebJobsStorage__credential") == "managedidentity"
    auth = _setting("APPLICATIONINSIGHTS_AUTHENTICATION_STRING")
    assert isinstance(auth, str) and _INTERPOLATION.sub("X", auth) == "ClientId=X;Authorization=AAD"
    (client_id,) = _interpolations(auth)
    assert _points_to(path, client_id, IDENTITY_TYPE, "properties", "clientId")
    for name, service in (("AzureWebJobsStorage__blobServiceUri", "blob"),
                          ("AzureWebJobsStorage__queueServiceUri", "queue")):
        assert _points_to(path, _setting(name), STORAGE_TYPE, "properties", "primaryEndpoints", service), name
    assert _points_to(path, _setting("APPLICATIONINSIGHTS_CONNECTION_STRING"), APP_INSIGHTS_TYPE,
                      "properties", "ConnectionString")
    _, _, insights = _one(APP_INSIGHTS_TYPE)
    assert insights["properties"]["DisableLocalAuth"] is True


def test_no_secret_in_app_settings() -> None:
    path, settings = _app_settings()
    for setting in settings:
        for where, node in _walk(path, setting["value"]):
            if isinstance(node, str) and not _is_reference(where, node):
                text = _INTERPOLATION.sub(" ", node)  # the ${...} parts are walked as expressions
                assert not any(m in text.lower() for m in _SECRET_MARKERS), f"{setting['name']}: {text!r}"
                assert not _ENTRA_SECRET.search(text), f"{setting['name']}: {text!r}"
                for run in _KEYLIKE.findall(text):
                    assert not (re.search(r"\d", run) and re.search(r"[A-Za-z]", run)), \
                        f"{setting['name']}: {run!r} looks like a key"
            if isinstance(node, str) and node in _doc(where).get("parameters", {}):
                decorators = {d["type"] for d in _doc(where)["parameters"][node]["decorators"]}
                assert "secure" not in decorators, f"{setting['name']} carries the @secure() parameter {node}"
            if isinstance(node, dict):
                function = node.get("function", {}).get("type")
                accessor = node.get("operator", {}).get("operands", {}).get("func_name", "")
                assert function != "list_func" and not accessor.lower().startswith("list"), \
                    f"{setting['name']} reads keys with a list*() function"


def test_client_secret_is_optional_and_stored_under_the_name_the_app_reads() -> None:
    path, name, _ = _one(SECRET_TYPE)
    config = _resources(path)[name]["config"]
    assert config.get("condition"), "the secret must only be written when one is given"
    secret = _unwrap(config)
    where, value = _resolve(path, secret["properties"]["value"])
    assert where == MAIN.resolve() and value == "dynamicsClientSecret"
    main_param = _doc(MAIN)["parameters"]["dynamicsClientSecret"]
    assert "secure" in {d["type"] for d in main_param["decorators"]}
    assert main_param["default"] == ""
    # The vault secret's name and DYNAMICS_CLIENT_SECRET_NAME come from the same expression (the setting is
    # empty in the modes that read no secret: the app refuses a setting its mode does not use).
    settings_path, _ = _app_settings()
    where, setting = _resolve(settings_path, _setting("DYNAMICS_CLIENT_SECRET_NAME"))
    branches = setting["operator"]["operands"]
    assert branches["condition"]["operator"]["operands"] == {"operand_1": "auth", "operand_2": "secret"}
    assert branches["false_value"] == ""
    assert _resolve(path, secret["name"]) == _resolve(where, branches["true_value"])
    assert _main_params_reached(path, config["condition"]) == {"dynamicsClientSecret"}, \
        "the secret must be written exactly when dynamicsClientSecret is given"


def test_parameters_file_matches_main_template() -> None:
    parameters = _parameters_file()
    declared = _doc(MAIN)["parameters"]
    assert set(parameters) <= set(declared), f"unknown parameters: {set(parameters) - set(declared)}"
    required = {name for name, p in declared.items() if p["default"] is None}
    assert required <= set(parameters), f"not fed by azd: {required - set(parameters)}"
    assert parameters["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert parameters["location"]["value"] == "${AZURE_LOCATION}"


def test_outputs() -> None:
    outputs = _doc(MAIN)["outputs"]
    assert {"AZURE_LOCATION", "AZURE_TENANT_ID"} <= set(outputs)
    assert _points_to(MAIN, outputs["AZURE_FUNCTION_APP_NAME"]["value"], SITE_TYPE, "name")
    where, url = _resolve(MAIN, outputs["AZURE_FUNCTION_APP_URL"]["value"])
    assert isinstance(url, str) and _INTERPOLATION.sub("X", url) == "https://X"
    assert _points_to(where, _interpolations(url)[0], SITE_TYPE, "properties", "defaultHostName")
    assert _points_to(MAIN, outputs["AZURE_KEY_VAULT_URI"]["value"], VAULT_TYPE, "properties", "vaultUri")
    queue = outputs["AZURE_STORAGE_QUEUE_ENDPOINT"]["value"]  # the operator CLI's --account-url
    assert _points_to(MAIN, queue, STORAGE_TYPE, "properties", "primaryEndpoints", "queue")


def test_azure_yaml_service_is_the_tagged_function_app() -> None:
    # azure.yaml is YAML, not Bicep, and PyYAML is not a dependency: read its few `key: value` lines.
    lines = [line.split("#")[0].rstrip() for line in (ROOT / "azure.yaml").read_text().splitlines()]
    text = "\n".join(line for line in lines if line)
    assert re.search(r"^services:\n  api:\n((    \S.*\n?)+)", text, re.M), "azure.yaml needs service 'api'"
    service = re.search(r"^  api:\n((    \S.*\n?)+)", text, re.M).group(1)
    fields = dict(line.strip().split(": ", 1) for line in service.splitlines())
    assert fields == {"project": ".", "language": "python", "host": "function"}
    assert _service_tag() == "api", "the site's azd-service-name tag must name the azure.yaml service"


def test_vault_role_only_where_the_auth_mode_reads_the_vault() -> None:
    """DYNAMICS_AUTH federated and managed_identity read no vault: the app identity gets no vault role."""
    path, name, _ = next(r for r in _all_resources(ROLE_ASSIGNMENT_TYPE) if r[1] == "secretsUser")
    assert _resources(path)[name]["config"]["condition"] == "grantApp"
    (caller, params), = _callers(path)
    where, value = _resolve(caller, params["grantApp"])
    assert value["operator"]["type"] == "or"
    main = _doc(MAIN)["parameters"]["dynamicsAuth"]
    assert set(main["decorators"][0]["argument"]) == {"", "secret", "certificate", "federated", "managed_identity"}


ALERT_TYPE = "Microsoft.Insights/scheduledQueryRules"
ACTION_GROUP_TYPE = "Microsoft.Insights/actionGroups"


def test_alert_rules_on_poison_failures_and_throttling() -> None:
    """Four log alerts on what the app records (shared/telemetry.py), scoped to Application Insights."""
    from shared.telemetry import PREFIX

    rules = {name: body for _, name, body in _all_resources(ALERT_TYPE)}
    assert set(rules) == {"poisonAlert", "failuresAlert", "throttlingAlert", "breakerAlert"}
    path = next(p for p, n, _ in _all_resources(ALERT_TYPE))
    queries = {}
    for name, body in rules.items():
        props = body["properties"]
        assert _points_to(path, props["scopes"][0], APP_INSIGHTS_TYPE, "id"), name
        (criterion,) = props["criteria"]["allOf"]
        queries[name] = _resolve(path, criterion["query"])[1]
        assert criterion["metricMeasureColumn"] == "n" and criterion["operator"] == "GreaterThan"
        assert props["actions"]["actionGroups"] == "alertActions"
    assert f'"{PREFIX}.records"' in queries["poisonAlert"] and '"poisoned"' in queries["poisonAlert"]
    assert "-poison" in queries["poisonAlert"]  # the host's own line when it poisons a message
    assert '"failed"' in queries["failuresAlert"] and "by code" in queries["failuresAlert"]
    assert f'"{PREFIX}.dataverse.throttled"' in queries["throttlingAlert"]
    assert f'"{PREFIX}.breaker.held"' in queries["breakerAlert"] and "by code" in queries["breakerAlert"]
    sustained = rules["throttlingAlert"]["properties"]["criteria"]["allOf"][0]["failingPeriods"]
    assert sustained["minFailingPeriodsToAlert"] >= 3


def test_action_group_only_with_an_alert_email() -> None:
    path, name, body = _one(ACTION_GROUP_TYPE)
    assert _resources(path)[name]["config"]["condition"]
    receiver = body["properties"]["emailReceivers"][0]
    assert receiver["emailAddress"] == "alertEmail"
    (caller, params), = _callers(path)
    assert _main_params_reached(caller, params["alertEmail"]) == {"alertEmail"}
    assert _parameters_file()["alertEmail"]["value"] == "${AZURE_ALERT_EMAIL}"


def test_fleet_stays_within_the_dataverse_concurrency_budget() -> None:
    """Instances x per-instance Dataverse concurrency <= the application user's budget (52 by default)."""
    main = _doc(MAIN)["parameters"]
    assert main["dataverseConcurrencyBudget"]["default"] == 52
    assert main["maximumInstanceCount"]["default"] >= 40  # the lowest value Flex Consumption has accepted
    source = MAIN.read_text()
    assert "var perInstance = max(1, dataverseConcurrencyBudget / maximumInstanceCount)" in source
    budget, instances = 52, main["maximumInstanceCount"]["default"]
    assert instances * max(1, budget // instances) <= budget
    path, _ = _app_settings()
    where, value = _resolve(path, _setting("INTAKE_DATAVERSE_CONCURRENCY"))
    assert "perInstance" in json.dumps(value)
    site = _resources(path)
    assert any("maximumInstanceCount" in json.dumps(r) for r in site.values())


def _bicep_int_expression(source: str, name: str) -> str:
    """A `var name = <expr>` of the template whose expression holds only names, integers, min/max and / ."""
    import re

    line = next(x for x in source.splitlines() if x.startswith(f"var {name} = "))
    expr = line.split("=", 1)[1].strip()
    assert re.fullmatch(r"[A-Za-z0-9_(), /]+", expr), expr  # nothing this check could misread
    return expr.replace("/", "//")  # Bicep divides integers as integers


def test_the_measured_topology_is_the_template_s_formula() -> None:
    """bench/topology.py (what the fleet test and benchmark run) against the template's own expressions."""
    from bench.topology import per_instance

    source = MAIN.read_text()
    per = _bicep_int_expression(source, "perInstance")
    batch = _bicep_int_expression(source, "queueBatchSize")
    for budget in (8, 13, 52, 100, 500):
        for instances in (1, 4, 8, 13, 40, 100, 1000):
            names = {"dataverseConcurrencyBudget": budget, "maximumInstanceCount": instances, "max": max, "min": min}
            names["perInstance"] = eval(per, {"__builtins__": {}}, names)  # noqa: S307 - the template's own text
            want = per_instance(budget, instances)
            assert names["perInstance"] == want.dataverse_concurrency, (budget, instances)
            assert eval(batch, {"__builtins__": {}}, names) == want.queue_batch, (budget, instances)  # noqa: S307
    assert per_instance().queue_batch >= 8  # the template's default: messages ride together, not one at a time
    path, _ = _app_settings()
    module = path.read_text()
    assert "value: string(queueBatchSize / 2)" in module  # newBatchThreshold, as per_instance says


def test_caller_mode_and_api_registration_are_template_parameters() -> None:
    """INTAKE_CALLER_AUTH is function_key or entra (nothing else can reach the app); the API's client id is given."""
    params = _doc(MAIN)["parameters"]
    assert set(params["intakeCallerAuth"]["decorators"][0]["argument"]) == {"", "function_key", "entra"}
    assert {"intakeApiClientId", "intakeApiTenantId", "appServiceAuthentication"} <= set(params)
    assert _parameters_file()["intakeApiClientId"]["value"] == "${INTAKE_API_CLIENT_ID}"


def test_app_service_authentication_is_an_optional_second_wall_for_entra_only() -> None:
    path, name, body = _one("Microsoft.Web/sites/config")
    assert body["name"] == "authsettingsV2"
    assert _resources(path)[name]["config"]["condition"] == "appServiceAuthentication"
    (caller, params), = _callers(path)
    where, value = _resolve(caller, params["appServiceAuthentication"])
    assert value["operator"]["type"] == "and", "only with INTAKE_CALLER_AUTH=entra"
    props = body["properties"]
    assert props["globalValidation"]["requireAuthentication"] is True
    assert props["globalValidation"]["unauthenticatedClientAction"] == "Return401"
    assert set(props["globalValidation"]["excludedPaths"]) == {"/api/health", "/api/openapi.json"}
    aad = props["identityProviders"]["azureActiveDirectory"]
    assert aad["registration"]["clientId"] == "intakeApiClientId"
    assert len(aad["validation"]["allowedAudiences"]) == 2
    assert aad["validation"]["defaultAuthorizationPolicy"]["allowedApplications"] == "allowedCallerApplications"
