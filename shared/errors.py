"""One table of failure codes: the same code in logs, HTTP responses and the diagnostics endpoint.

Each code says what happened, what the operator should do, which HTTP status a create endpoint
answers, whether the cause lies in the event itself (a queue message is then set aside in
`<queue>-rejected`) or outside it (the message is deferred and, in the end, poisoned), and whether
only an operator can end it (`operator`: the queue functions' breaker then holds new messages).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    status: int
    cause: str
    fix: str
    in_event: bool = False  # the event can never succeed as sent: reject it, do not retry
    operator: bool = False  # only an operator's fix ends it: queue intake holds new messages (shared/breaker.py)


CODES: dict[str, Code] = {
    # The event itself.
    "invalid_request": Code(400, "The request body breaks the contract.",
                            "Correct the fields listed in details and send again.", True),
    "unsupported_media_type": Code(415, "The body is not a JSON object.",
                                   "Send a JSON object with Content-Type: application/json.", True),
    "payload_too_large": Code(413, "The body is larger than the 64 KiB limit.",
                              "Send a smaller body; put large text in an attachment instead.", True),
    "idempotency_conflict": Code(
        409, "The key (externalId or Idempotency-Key) was already used for a different event: the existing "
             "record's title/customer (case) or name/email (lead) differ from this event's.",
        "Do not send it again as it is. A new event needs a new key. If it is the same event and someone edited "
        "the record in Dynamics since, the record in recordId is that event's record: use it.", True),
    "dynamics_payload_rejected": Code(
        502, "Dataverse rejected the record's columns (HTTP 400/404 with its own code).",
        "Read the Dataverse code and message: usually an unknown column in attributes, a value too long, "
        "or a contactId/accountId that does not exist.", True),
    "envelope_invalid": Code(
        400, "A queue message carries the deferral envelope's marker but is not a valid envelope (a bad key, "
             "attempt or time, or a claim-check blob that is gone).",
        "Envelopes are written by this app only: find the producer that sent it (the reason names the field); "
        "to create the event, send its original body as a plain message.", True),
    # The caller (HTTP routes, INTAKE_CALLER_AUTH=entra).
    "caller_token_missing": Code(
        401, "The request carries no bearer token (no Authorization header, an empty one, or another scheme).",
        "Send Authorization: Bearer <token>, a token from Entra ID for api://<INTAKE_API_CLIENT_ID>/.default "
        "(client credentials), as README, Calling with Entra ID, shows."),
    "caller_token_invalid": Code(
        401, "The bearer token failed a check (the message names it): signature, algorithm, expiry, issuer, "
             "audience, tenant, or not an application token.",
        "Request a new token for api://<INTAKE_API_CLIENT_ID>/.default from the tenant INTAKE_API_TENANT_ID with the "
        "client credentials grant (an application token, not a user's) and send it before it expires."),
    "caller_role_missing": Code(
        403, "The caller's token is valid but lacks the app role this route needs (the message names it).",
        "Enterprise applications > the intake API > Users and groups (or az rest, README, Deploy): assign the named "
        "app role to the caller's service principal, then request a new token."),
    "caller_keys_unavailable": Code(
        503, "Entra ID's signing keys could not be fetched while the token's key was unknown to this instance.",
        "Nothing to change: send it again after Retry-After. Check the app's outbound network to "
        "AZURE_AUTHORITY_HOST if it persists."),
    # Follow-ups (notes, resolve, cancel, update) on a record an event made.
    "record_not_found": Code(
        404, "No record has the id the follow-up names, or the externalId (and source) of the event that created "
             "it: the create has not happened (yet), or the record was deleted.",
        "Name the record as its create did: the same externalId and source (an omitted source is the same default), "
        "or its id. On the followups queue this waits for the create (deferred up to INTAKE_DEFERRAL_MAX_HOURS)."),
    "record_state_conflict": Code(
        409, "The case's state refuses the follow-up: it is resolved or cancelled (read-only in Dynamics), or "
             "Dataverse refused the resolve/cancel for a rule named in message (open child cases, open activities, "
             "status transition rules).",
        "Nothing to send again as it is: reopen the case in Dynamics, or close what the rule names, first.", True),
    "attachment_too_large": Code(
        413, "The note's attachment is larger than INTAKE_NOTE_MAX_BYTES (measured on its base64 text).",
        "Send a smaller file, or a link to it in the note's text; raise INTAKE_NOTE_MAX_BYTES only together with "
        "the organization's maxuploadfilesize.", True),
    "dynamics_attachment_too_large": Code(
        413, "Dataverse refused the note's attachment as larger than the organization's maxuploadfilesize "
             "(0x80044a02).",
        "Send a smaller file; or raise maxuploadfilesize (Power Platform admin center > Settings > Email > "
        "Attachments) or lower INTAKE_NOTE_MAX_BYTES to it, so that the app refuses such files itself.", True),
    "dynamics_attachment_blocked": Code(
        415, "Dataverse refused the note's attachment: its file type is in the organization's blocked "
             "attachments (0x80043e09).",
        "Send the file in another format (zip it), or remove the extension from the blocked file extensions "
        "(Power Platform admin center > Settings > Privacy + Security).", True),
    # Configuration of this app.
    "config_invalid": Code(503, "An app setting is missing or malformed.",
                           "Set the named app setting (Function App > Settings > Environment variables).",
                           operator=True),
    # Key Vault.
    "keyvault_unreachable": Code(503, "Key Vault could not be reached.",
                                 "Check KEY_VAULT_URL and the app's outbound network; retried automatically."),
    "keyvault_auth_failed": Code(
        503, "No identity could get a token for Key Vault.",
        "In Azure: give the Function App a managed identity (and set AZURE_CLIENT_ID to a user-assigned "
        "identity's client id). Locally: run 'az login'."),
    "keyvault_identity_unavailable": Code(
        503, "Entra ID could not issue the app's own identity a token for Key Vault (an outage, not a missing "
             "identity).", "Nothing to change: retried automatically. Check Entra ID service health if it persists."),
    "keyvault_forbidden": Code(
        502, "The app's identity may not read secrets in the vault.",
        "Grant the app's managed identity the 'Key Vault Secrets User' role on the vault "
        "(or a 'get' secret access policy on a vault in access-policy mode).", operator=True),
    "keyvault_secret_missing": Code(
        502, "The vault has no secret named by DYNAMICS_CLIENT_SECRET_NAME.",
        "Create the secret {secret_name} in the vault with the app registration's client secret Value, "
        "or set DYNAMICS_CLIENT_SECRET_NAME to the secret's name.", operator=True),
    "keyvault_secret_disabled": Code(502, "The client secret in the vault is disabled.",
                                     "Enable the secret {secret_name} in the vault, or add a new enabled version.",
                                     operator=True),
    "keyvault_certificate_missing": Code(
        502, "The vault has no certificate named by DYNAMICS_CLIENT_CERTIFICATE_NAME (DYNAMICS_AUTH=certificate).",
        "Import the app registration's certificate, with its private key, into the vault as the certificate "
        "{certificate_name}, or set DYNAMICS_CLIENT_CERTIFICATE_NAME to its name.", operator=True),
    "keyvault_certificate_unusable": Code(
        502, "The vault certificate's secret holds no usable private key (not PEM or PKCS#12, or a key that is not "
             "exportable).",
        "Import the certificate {certificate_name} with an exportable private key (Key Vault's default policy), as "
        "PFX without a password or as PEM; an HSM-only key cannot sign for this app.", operator=True),
    # Entra ID.
    "entra_invalid_secret": Code(
        502, "Entra ID rejected the client secret (AADSTS7000215).",
        "In Azure portal, App registrations > Certificates & secrets: copy the secret's Value, not its "
        "Secret ID, into the vault secret {secret_name}.", operator=True),
    "entra_secret_expired": Code(
        502, "The client secret has expired (AADSTS7000222).",
        "Create a new client secret in App registrations > Certificates & secrets and store its Value as a "
        "new version of the vault secret {secret_name}; no restart is needed.", operator=True),
    "entra_unknown_client": Code(
        502, "No application with DYNAMICS_CLIENT_ID exists in the tenant (AADSTS700016).",
        "Set DYNAMICS_CLIENT_ID to the app registration's Application (client) ID, and DYNAMICS_TENANT_ID "
        "to the tenant it is registered in.", operator=True),
    "entra_unknown_tenant": Code(
        502, "The tenant DYNAMICS_TENANT_ID does not exist (AADSTS90002).",
        "Set DYNAMICS_TENANT_ID to the Directory (tenant) ID from the app registration's Overview page.",
        operator=True),
    "dynamics_url_wrong_scope": Code(
        502, "Entra ID knows no resource at DYNAMICS_URL (AADSTS500011).",
        "Set DYNAMICS_URL to the environment URL from the Power Platform admin center, "
        "e.g. https://contoso.crm.dynamics.com (not the api. host, no path).", operator=True),
    "entra_certificate_not_registered": Code(
        502, "Entra ID found no certificate on the app registration matching the one the app signed with "
             "(AADSTS700027).",
        "Upload the certificate's public part (.cer) in App registrations > {client_id} > Certificates & secrets > "
        "Certificates. After a rotation in the vault, upload the new certificate before the old one is removed.",
        operator=True),
    "entra_certificate_expired": Code(
        502, "The certificate has expired, or the signed assertion is outside its valid time (AADSTS700024).",
        "Add a new version of the vault certificate {certificate_name} and upload its public part to the app "
        "registration; no restart is needed. If the certificate is still valid, check the host's clock.",
        operator=True),
    "entra_federation_mismatch": Code(
        502, "No federated credential on the app registration matches the managed identity's token (AADSTS70021; "
             "AADSTS700211/700212/700213 name the part that did not match: issuer/audience/subject).",
        "App registrations > {client_id} > Certificates & secrets > Federated credentials: add one with issuer "
        "https://login.microsoftonline.com/<tenant>/v2.0, subject = the user-assigned identity's object (principal) "
        "id, audience api://AzureADTokenExchange (README, Deploy).", operator=True),
    "managed_identity_unavailable": Code(
        503, "The Function App's managed identity endpoint did not answer, or knows no such identity.",
        "In Azure: give the Function App the managed identity (user-assigned: set AZURE_CLIENT_ID to its client id). "
        "If it is assigned, this is an outage: retried automatically."),
    "entra_unavailable": Code(503, "Entra ID is unreachable or answered a transient error.",
                              "Nothing to change: retried automatically. Check outbound network if it persists."),
    "entra_error": Code(502, "Entra ID refused the token request.",
                        "Read the AADSTS code in detail and look it up in the Entra ID error reference."),
    # Dataverse.
    "dynamics_token_rejected": Code(
        502, "Dataverse rejected a freshly acquired token (401 twice).",
        "Check that DYNAMICS_URL is the environment the app user was created in, and that the token's "
        "tenant is the environment's tenant.", operator=True),
    "dynamics_app_user_missing": Code(
        502, "The app registration has no application user in this environment (0x80072560).",
        "Power Platform admin center > Environments > {environment} > Settings > Application users: "
        "add the app {client_id} and give it the intake security role.", operator=True),
    "managed_identity_not_app_user": Code(
        502, "The managed identity is not an application user in this environment (0x80072560, "
             "DYNAMICS_AUTH=managed_identity).",
        "Power Platform admin center > Environments > {environment} > Settings > Application users > New app user: "
        "add the managed identity's application (client) id {client_id} and give it the intake security role.",
        operator=True),
    "dynamics_app_user_disabled": Code(
        502, "The application user is disabled (0x80040225).",
        "Power Platform admin center > Application users: activate the application user for {client_id}.",
        operator=True),
    "dynamics_privilege_missing": Code(
        502, "The application user lacks a privilege (0x80040220).",
        "Add the missing privilege named in detail to the application user's security role "
        "(README, Deploy: the role needs create/read on cases, leads and contacts).", operator=True),
    "dynamics_throttled": Code(
        503, "Dataverse service protection limits are throttling this user (429).",
        "Nothing to change: send again after Retry-After (queue messages are deferred that long by themselves). "
        "If it persists, the fleet asks more than the user's limits: see README, Scale."),
    "dynamics_unavailable": Code(
        503, "Dataverse answered a server error or did not answer within the call's deadline.",
        "Nothing to change: send it again after Retry-After (a keyed event cannot be created twice); queue messages "
        "are retried automatically. Check Dataverse service health if it persists."),
    "dynamics_outcome_unknown": Code(
        504, "Dataverse did not confirm the create of an event without a key before the deadline: the record may "
             "exist under the id in recordId.",
        "Look the record up by recordId (GET .../incidents(<recordId>) or .../leads(<recordId>)) before sending "
        "again, or send an externalId or Idempotency-Key so that a retry is always safe."),
    "dynamics_error": Code(502, "Dataverse answered an unexpected error.",
                           "Read the Dataverse code in detail; the request id identifies it for Microsoft support."),
    "instance_overloaded": Code(
        503, "This instance could not start a thread for the call (it is at its thread limit).",
        "Nothing to change: send it again after Retry-After; queue messages are retried automatically. If it "
        "persists, lower the concurrency per instance (host.json: http maxConcurrentRequests, queues batchSize)."),
    "internal_error": Code(500, "An unexpected error in this app.", "Report it with the correlationId."),
}


class IntakeError(Exception):
    """A classified failure. `detail` is safe to show: it never holds a secret or a token."""

    def __init__(self, code: str, detail: str = "", *, request_id: str | None = None,
                 retry_after: float | None = None, details: list[dict] | None = None,
                 upstream_code: str | None = None, fix_args: dict[str, str] | None = None,
                 record_id: str | None = None) -> None:
        self.code = code
        self.spec = CODES[code]
        self.detail = detail or self.spec.cause
        self.request_id = request_id
        self.retry_after = retry_after
        self.details = details
        self.upstream_code = upstream_code
        self.fix_args = fix_args or {}
        self.record_id = record_id  # the row this failure is about: the existing one, or one that may exist
        super().__init__(f"{code}: {self.detail}")

    def copy(self) -> IntakeError:
        """The same failure as a new object: for each of several callers that share one attempt's outcome."""
        twin = IntakeError(self.code, self.detail, request_id=self.request_id, retry_after=self.retry_after,
                           details=self.details, upstream_code=self.upstream_code, fix_args=dict(self.fix_args),
                           record_id=self.record_id)
        twin.__dict__.update({k: v for k, v in self.__dict__.items() if k not in twin.__dict__})
        return twin

    @property
    def status(self) -> int:
        return self.spec.status

    @property
    def in_event(self) -> bool:
        return self.spec.in_event

    @property
    def fix(self) -> str:
        try:
            return self.spec.fix.format(**self.fix_args)
        except (KeyError, IndexError):
            return self.spec.fix

    def to_dict(self) -> dict:
        out: dict = {"code": self.code, "message": self.detail, "fix": self.fix}
        if self.details:
            out["details"] = self.details
        if self.upstream_code:
            out["upstreamCode"] = self.upstream_code
        if self.record_id:
            out["recordId"] = self.record_id
        if self.request_id:
            out["requestId"] = self.request_id
        if self.retry_after is not None:
            out["retryAfter"] = self.retry_after
        return out
