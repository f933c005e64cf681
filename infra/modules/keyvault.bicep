// The vault holding the Dynamics 365 client secret, in RBAC mode: the app's identity may only read secrets.
param name string
param location string
param tags object = {}

@description('Principal id of the app\'s managed identity.')
param principalId string

@description('Object id of whoever runs the deployment; when set, it may write secrets (to store or rotate the client secret).')
param deployerPrincipalId string = ''

@description('Whether the app identity reads the vault (DYNAMICS_AUTH secret or certificate).')
param grantApp bool = true

@description('Name of the secret the app reads (DYNAMICS_CLIENT_SECRET_NAME).')
param secretName string

@secure()
@description('The client secret; when empty, no secret is written.')
param secretValue string = ''

var keyVaultSecretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'
var keyVaultSecretsOfficerRoleId = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    // Purge protection is left off so that `azd down --purge` can remove the vault; turn it on
    // (enablePurgeProtection: true) for a production vault you never mean to purge.
    publicNetworkAccess: 'Enabled'
  }
}

resource clientSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(secretValue)) {
  parent: vault
  name: secretName
  properties: {
    value: secretValue
    contentType: 'Dynamics 365 app registration client secret'
  }
}

resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (grantApp) {
  name: guid(vault.id, principalId, keyVaultSecretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUserRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

resource deployerSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(vault.id, deployerPrincipalId, keyVaultSecretsOfficerRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsOfficerRoleId)
    principalId: deployerPrincipalId
  }
}

output name string = vault.name
output vaultUri string = vault.properties.vaultUri
// KEY_VAULT_URL: the vault URI without its trailing slash.
output url string = endsWith(vault.properties.vaultUri, '/') ? substring(vault.properties.vaultUri, 0, length(vault.properties.vaultUri) - 1) : vault.properties.vaultUri
