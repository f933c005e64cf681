// Dynamics 365 intake on Azure Functions: everything `azd up` provisions.
//
// One resource group holding a Function App on the Flex Consumption plan, run as a user-assigned managed
// identity that reaches storage, Key Vault and Application Insights with Entra ID only: no storage key,
// no instrumentation key and no secret is ever written to an app setting. The Dynamics 365 client
// secret lives in the vault; the app reads it at run time.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; names the resource group and seeds the unique resource names.')
param environmentName string

@minLength(1)
@description('Region for every resource. It must offer the Flex Consumption plan (az functionapp list-flexconsumption-locations).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the user or service principal running azd (azd fills AZURE_PRINCIPAL_ID). When set, it may write secrets to the vault and read and write the queues (and blobs) with the operator CLI.')
param principalId string = ''

@allowed([
  ''
  'User'
  'ServicePrincipal'
  'Group'
])
@description('AZURE_PRINCIPAL_TYPE: what principalId is; empty means User (a pipeline signed in as a service principal sets ServicePrincipal).')
param principalType string = ''

// The settings the app reads (shared/settings.py, SETTINGS). Each required one is fed from the azd
// environment variable of the same name, see main.parameters.json.
@allowed([
  ''
  'secret'
  'certificate'
  'federated'
  'managed_identity'
])
@description('DYNAMICS_AUTH: how the app proves itself to Dataverse (secret, certificate, federated, managed_identity); empty means secret.')
param dynamicsAuth string = ''

@minLength(1)
@description('DYNAMICS_URL: the Dataverse environment URL, e.g. https://contoso.crm.dynamics.com')
param dynamicsUrl string

@description('DYNAMICS_TENANT_ID: Directory (tenant) ID of the Dynamics app registration (not used with managed_identity).')
param dynamicsTenantId string = ''

@description('DYNAMICS_CLIENT_ID: Application (client) ID of the Dynamics app registration (not used with managed_identity).')
param dynamicsClientId string = ''

@description('DYNAMICS_CLIENT_SECRET_NAME: name of the vault secret holding the client secret; empty means the default.')
param dynamicsClientSecretName string = ''

@description('DYNAMICS_CLIENT_CERTIFICATE_NAME: name of the vault certificate (certificate mode); empty means the default.')
param dynamicsClientCertificateName string = ''

@description('DYNAMICS_API_VERSION: Dataverse Web API version; empty means the default.')
param dynamicsApiVersion string = ''

@description('AZURE_AUTHORITY_HOST: Entra ID authority host; empty means the login endpoint of the cloud deployed to.')
param azureAuthorityHost string = ''

@description('The Dataverse application user\'s concurrency budget: 52 concurrent requests per user (service protection), shared by every instance of the app.')
param dataverseConcurrencyBudget int = 52

@minValue(1)
@maxValue(1000)
@description('Flex Consumption maximumInstanceCount. Learn has given 40 as the lowest value it accepts; each instance gets dataverseConcurrencyBudget / this many concurrent Dataverse requests (README, Scale).')
param maximumInstanceCount int = 40

@description('INTAKE_DATAVERSE_CONCURRENCY: one instance\'s concurrent Dataverse requests; empty means dataverseConcurrencyBudget / maximumInstanceCount.')
param intakeDataverseConcurrency string = ''

@description('INTAKE_DEFERRAL_MAX_HOURS: how long a queue message may wait out throttling or an outage before it is set aside in <queue>-poison; empty means the default.')
param intakeDeferralMaxHours string = ''

@description('INTAKE_BATCH_SIZE: at most this many concurrent creates of one instance go to Dataverse as one $batch (1: no batching); empty means the default.')
param intakeBatchSize string = ''

@description('INTAKE_BATCH_WINDOW_MS: how long the first of concurrent creates waits for others to join its $batch; empty means the default.')
param intakeBatchWindowMs string = ''

@allowed([
  ''
  'function_key'
  'entra'
])
@description('INTAKE_CALLER_AUTH: how callers prove who they are: function_key (a function key) or entra (an Entra ID access token with an app role); empty means function_key.')
param intakeCallerAuth string = ''

@description('INTAKE_API_CLIENT_ID: Application (client) ID of the intake API\'s app registration (README, Deploy, Callers with Entra ID); required with entra.')
param intakeApiClientId string = ''

@description('INTAKE_API_TENANT_ID: Directory (tenant) ID the callers\' tokens come from; empty means the tenant deployed to.')
param intakeApiTenantId string = ''

@description('With entra: also turn on App Service authentication (authsettingsV2) as a second wall in front of the app: Return401 without a token for the API, allowedApplications below. The app checks every token and its app role either way.')
param appServiceAuthentication bool = false

@description('With appServiceAuthentication: the callers\' application (client) ids let through (the app still checks each one\'s app role); empty: any caller application of the tenant.')
param allowedCallerApplications array = []
@description('INTAKE_NOTE_MAX_BYTES: the largest note attachment the notes routes accept (bytes of base64 text); empty means the default (Dataverse\'s default maxuploadfilesize).')
param intakeNoteMaxBytes string = ''

@description('INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID: the account a case with no customer is filed under; empty: such a case is refused.')
param intakeDefaultCustomerAccountId string = ''

@description('INTAKE_ALERT_ACCOUNT_ID: the account the cases of /api/alerts (Azure Monitor) are filed under; empty: INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID.')
param intakeAlertAccountId string = ''

@description('E-mail address that receives the alerts (poison, failures by code, sustained throttling); empty: no action group.')
param alertEmail string = ''

@secure()
@description('The app registration\'s client secret Value. Optional: when empty, no secret is written and you put it in the vault yourself.')
param dynamicsClientSecret string = ''

// An empty value means the default, as it does in the app (shared/settings.py, same defaults): azd leaves
// an unset variable empty, and so may `az deployment sub create -p main.parameters.json` or a pipeline.
var auth = empty(dynamicsAuth) ? 'secret' : dynamicsAuth
// The fleet inside the user's budget: instances x per-instance Dataverse concurrency <= the budget.
var perInstance = max(1, dataverseConcurrencyBudget / maximumInstanceCount)
var dataverseConcurrency = empty(intakeDataverseConcurrency) ? string(perInstance) : intakeDataverseConcurrency
// Queue messages in flight per instance, decoupled from its Dataverse share: the creates that wait for a
// Dataverse slot go out together as one $batch when it frees, so at least 8 ride in each (bench/topology.py).
var queueBatchSize = min(32, max(8, perInstance))
var deferralMaxHours = empty(intakeDeferralMaxHours) ? '24' : intakeDeferralMaxHours
var batchSize = empty(intakeBatchSize) ? '10' : intakeBatchSize
var batchWindowMs = empty(intakeBatchWindowMs) ? '20' : intakeBatchWindowMs
var noteMaxBytes = empty(intakeNoteMaxBytes) ? '5242880' : intakeNoteMaxBytes
// Key Vault is read in the secret and certificate modes only; the managed-identity modes need no vault role.
var usesVault = (auth == 'secret') || (auth == 'certificate')
var clientSecretName = empty(dynamicsClientSecretName) ? 'dynamics-client-secret' : dynamicsClientSecretName
var certificateName = empty(dynamicsClientCertificateName) ? 'dynamics-client-certificate' : dynamicsClientCertificateName
var apiVersion = empty(dynamicsApiVersion) ? 'v9.2' : dynamicsApiVersion
var authorityHost = empty(azureAuthorityHost) ? environment().authentication.loginEndpoint : azureAuthorityHost
var callerAuth = empty(intakeCallerAuth) ? 'function_key' : intakeCallerAuth
var apiTenantId = empty(intakeApiTenantId) ? tenant().tenantId : intakeApiTenantId

// The queues the app reads (cases, leads, followups), writes (-rejected) and the host moves failures to (-poison).
var queueNames = [
  'cases'
  'leads'
  'cases-rejected'
  'leads-rejected'
  'cases-poison'
  'leads-poison'
  'followups'
  'followups-rejected'
  'followups-poison'
]

var tags = {
  'azd-env-name': environmentName
}
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var functionAppName = 'func-${resourceToken}'

resource rg 'Microsoft.Resources/resourceGroups@2021-04-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    appInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
    principalId: identity.outputs.principalId
    alertEmail: alertEmail
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: 'app-package'
    queueNames: queueNames
    principalId: identity.outputs.principalId
    deployerPrincipalId: principalId
    deployerPrincipalType: empty(principalType) ? 'User' : principalType
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    principalId: identity.outputs.principalId
    grantApp: usesVault
    deployerPrincipalId: principalId
    secretName: clientSecretName
    secretValue: dynamicsClientSecret
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageBlobEndpoint: storage.outputs.blobEndpoint
    storageQueueEndpoint: storage.outputs.queueEndpoint
    deploymentContainerName: storage.outputs.deploymentContainerName
    appInsightsConnectionString: monitoring.outputs.connectionString
    dynamicsAuth: auth
    dynamicsUrl: dynamicsUrl
    // A setting a mode does not use must be empty: the app refuses one that is set (config_invalid).
    dynamicsTenantId: (auth == 'managed_identity') ? '' : dynamicsTenantId
    dynamicsClientId: (auth == 'managed_identity') ? '' : dynamicsClientId
    keyVaultUrl: usesVault ? keyVault.outputs.url : ''
    dynamicsClientSecretName: (auth == 'secret') ? clientSecretName : ''
    dynamicsClientCertificateName: (auth == 'certificate') ? certificateName : ''
    dynamicsApiVersion: apiVersion
    maximumInstanceCount: maximumInstanceCount
    intakeDataverseConcurrency: dataverseConcurrency
    intakeDeferralMaxHours: deferralMaxHours
    intakeBatchSize: batchSize
    intakeBatchWindowMs: batchWindowMs
    intakeNoteMaxBytes: noteMaxBytes
    intakeDefaultCustomerAccountId: intakeDefaultCustomerAccountId
    intakeAlertAccountId: intakeAlertAccountId
    queueBatchSize: queueBatchSize
    azureAuthorityHost: authorityHost
    intakeCallerAuth: callerAuth
    intakeApiClientId: intakeApiClientId
    intakeApiTenantId: apiTenantId
    appServiceAuthentication: (callerAuth == 'entra') && appServiceAuthentication
    allowedCallerApplications: allowedCallerApplications
  }
}

// Outputs azd stores in .azure/<environment>/.env
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_URL string = functionApp.outputs.url
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_KEY_VAULT_URI string = keyVault.outputs.vaultUri
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
// For the operator CLI: python -m tools.queues replay cases --account-url "$(azd env get-value AZURE_STORAGE_QUEUE_ENDPOINT)"
output AZURE_STORAGE_QUEUE_ENDPOINT string = storage.outputs.queueEndpoint
output AZURE_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output AZURE_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
