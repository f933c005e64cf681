"""The local stand-ins (Entra ID, Key Vault, Dataverse), the dev stack and the HTTP host: for tests and the
local run, never deployed and never pointed at Azure. The operator's tools live in tools/."""
