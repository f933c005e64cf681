// The Function App on the Flex Consumption plan, running as the user-assigned identity.
param name string
param planName string
param location string
param tags object = {}

@description('Resource id of the user-assigned managed identity the app runs as.')
param identityId string
@description('Client id of that identity (AZURE_CLIENT_ID, AzureWebJobsStorage__clientId).')
param identityClientId string

param storageBlobEndpoint string
param storageQueueEndpoint string
param deploymentContainerName string
param appInsightsConnectionString string

// The app's own settings (shared/settings.py, SETTINGS).
param dynamicsAuth string
param dynamicsUrl string
param dynamicsTenantId string
param dynamicsClientId string
param keyVaultUrl string
param dynamicsClientSecretName string
param dynamicsClientCertificateName string
param dynamicsApiVersion string
param intakeDataverseConcurrency string
param intakeDeferralMaxHours string
param intakeBatchSize string
param intakeBatchWindowMs string
param intakeNoteMaxBytes string
param intakeDefaultCustomerAccountId string
param intakeAlertAccountId string

@description('Queue messages one instance takes at a time per queue function (batchSize; newBatchThreshold is half of it).')
param queueBatchSize int = 8
param azureAuthorityHost string
param intakeCallerAuth string
param intakeApiClientId string
param intakeApiTenantId string
@description('App Service authentication (authsettingsV2) in front of the app as a second wall (entra only).')
param appServiceAuthentication bool = false
param allowedCallerApplications array = []

@allowed([
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048
@description('Upper bound on instances the plan scales out to (Flex Consumption allows up to 1000).')
@maxValue(1000)
param maximumInstanceCount int = 100

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      // Flex Consumption takes the runtime from functionAppConfig: no FUNCTIONS_WORKER_RUNTIME or
      // FUNCTIONS_EXTENSION_VERSION here (the platform rejects them).
      appSettings: [
        // Host storage, by identity.
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: identityClientId
        }
        {
          name: 'AzureWebJobsStorage__blobServiceUri'
          value: storageBlobEndpoint
        }
        {
          name: 'AzureWebJobsStorage__queueServiceUri'
          value: storageQueueEndpoint
        }
        // Telemetry, by identity.
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsightsConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'ClientId=${identityClientId};Authorization=AAD'
        }
        // The Python worker's OpenTelemetry (host.json telemetryMode OpenTelemetry; shared/telemetry.py).
        {
          name: 'PYTHON_ENABLE_OPENTELEMETRY'
          value: 'true'
        }
        // DefaultAzureCredential picks the user-assigned identity by this client id (Key Vault).
        {
          name: 'AZURE_CLIENT_ID'
          value: identityClientId
        }
        // The app's settings.
        {
          name: 'DYNAMICS_AUTH'
          value: dynamicsAuth
        }
        {
          name: 'DYNAMICS_URL'
          value: dynamicsUrl
        }
        {
          name: 'DYNAMICS_TENANT_ID'
          value: dynamicsTenantId
        }
        {
          name: 'DYNAMICS_CLIENT_ID'
          value: dynamicsClientId
        }
        {
          name: 'KEY_VAULT_URL'
          value: keyVaultUrl
        }
        {
          name: 'DYNAMICS_CLIENT_SECRET_NAME'
          value: dynamicsClientSecretName
        }
        {
          name: 'DYNAMICS_CLIENT_CERTIFICATE_NAME'
          value: dynamicsClientCertificateName
        }
        {
          name: 'DYNAMICS_API_VERSION'
          value: dynamicsApiVersion
        }
        {
          name: 'INTAKE_DATAVERSE_CONCURRENCY'
          value: intakeDataverseConcurrency
        }
        {
          name: 'INTAKE_DEFERRAL_MAX_HOURS'
          value: intakeDeferralMaxHours
        }
        {
          name: 'INTAKE_BATCH_SIZE'
          value: intakeBatchSize
        }
        {
          name: 'INTAKE_BATCH_WINDOW_MS'
          value: intakeBatchWindowMs
        }
        {
          name: 'INTAKE_NOTE_MAX_BYTES'
          value: intakeNoteMaxBytes
        }
        {
          name: 'INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID'
          value: intakeDefaultCustomerAccountId
        }
        {
          name: 'INTAKE_ALERT_ACCOUNT_ID'
          value: intakeAlertAccountId
        }
        // Per-instance queue concurrency, overriding host.json: instances x concurrency within the budget.
        {
          name: 'AzureFunctionsJobHost__extensions__queues__batchSize'
          value: string(queueBatchSize)
        }
        {
          name: 'AzureFunctionsJobHost__extensions__queues__newBatchThreshold'
          value: string(queueBatchSize / 2)
        }
        {
          name: 'AZURE_AUTHORITY_HOST'
          value: azureAuthorityHost
        }
        // Read at import: the host indexes /api/cases, /api/leads and /api/diagnostics anonymous under entra.
        {
          name: 'INTAKE_CALLER_AUTH'
          value: intakeCallerAuth
        }
        {
          name: 'INTAKE_API_CLIENT_ID'
          value: intakeApiClientId
        }
        {
          name: 'INTAKE_API_TENANT_ID'
          value: intakeApiTenantId
        }
      ]
    }
  }
}

// Optional second wall (entra): the platform refuses requests without a token for the API before the app
// runs. It checks issuer, audience and the calling application, not app roles: the app checks every token
// and its role either way, and never reads the X-MS-CLIENT-PRINCIPAL headers this injects.
var authority = endsWith(azureAuthorityHost, '/') ? take(azureAuthorityHost, length(azureAuthorityHost) - 1) : azureAuthorityHost

resource auth 'Microsoft.Web/sites/config@2024-04-01' = if (appServiceAuthentication) {
  parent: site
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'Return401'
      excludedPaths: [
        '/api/health'
        '/api/openapi.json'
      ]
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          openIdIssuer: '${authority}/${intakeApiTenantId}/v2.0'
          clientId: intakeApiClientId
        }
        validation: {
          allowedAudiences: [
            intakeApiClientId
            'api://${intakeApiClientId}'
          ]
          defaultAuthorizationPolicy: {
            allowedApplications: allowedCallerApplications
          }
        }
      }
    }
  }
}

output name string = site.name
output url string = 'https://${site.properties.defaultHostName}'
