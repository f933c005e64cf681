// Log Analytics and a workspace-based Application Insights that accepts Entra ID-authenticated telemetry only.
param logAnalyticsName string
param appInsightsName string
param location string
param tags object = {}

@description('Principal id of the app\'s managed identity, which publishes the telemetry.')
param principalId string

var monitoringMetricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb'

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    DisableLocalAuth: true
  }
}

resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, principalId, monitoringMetricsPublisherRoleId)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output name string = appInsights.name
// The connection string holds the instrumentation key, which is an identifier, not a credential: with
// DisableLocalAuth, ingestion also needs an Entra ID token (APPLICATIONINSIGHTS_AUTHENTICATION_STRING).
output connectionString string = appInsights.properties.ConnectionString
