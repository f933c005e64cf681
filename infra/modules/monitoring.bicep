// Log Analytics and a workspace-based Application Insights that accepts Entra ID-authenticated telemetry only.
param logAnalyticsName string
param appInsightsName string
param location string
param tags object = {}

@description('Principal id of the app\'s managed identity, which publishes the telemetry.')
param principalId string

@description('E-mail address for the alerts; empty: the alert rules exist, with no action group.')
param alertEmail string = ''

@description('Failed events per code in 15 minutes that raise the failures alert.')
param failureThreshold int = 10

@description('Dataverse 429 answers per 15 minutes that, three windows in a row, raise the throttling alert.')
param throttleThreshold int = 50

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

// Alerts on what the app records (shared/telemetry.py: intake.records, intake.dataverse.throttled) and on the
// host's own line when it moves a message to a -poison queue.
resource alertGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-${appInsightsName}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'intake'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var alertActions = empty(alertEmail) ? [] : [alertGroup.id]

var poisonQuery = 'union (customMetrics | where name == "intake.records" and tostring(customDimensions["intake.outcome"]) == "poisoned" | project n = valueSum), (traces | where message has "MaxDequeueCount" and message has "-poison" | project n = 1.0) | summarize n = sum(n)'
var failuresQuery = 'customMetrics | where name == "intake.records" and tostring(customDimensions["intake.outcome"]) == "failed" | extend code = tostring(customDimensions["intake.code"]) | summarize n = sum(valueSum) by code'
var breakerQuery = 'customMetrics | where name == "intake.breaker.held" | extend code = tostring(customDimensions["intake.code"]) | summarize n = sum(valueSum) by code'
var throttlingQuery = 'customMetrics | where name == "intake.dataverse.throttled" | summarize n = sum(valueSum)'

resource poisonAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: 'alert-${appInsightsName}-poison'
  location: location
  tags: tags
  properties: {
    displayName: 'Intake: messages poisoned'
    description: 'A message reached a -poison queue. Fix the cause (its code in the logs), then: python -m tools.queues replay <queue>.'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: poisonQuery
          timeAggregation: 'Total'
          metricMeasureColumn: 'n'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: alertActions
    }
  }
}

resource failuresAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: 'alert-${appInsightsName}-failures'
  location: location
  tags: tags
  properties: {
    displayName: 'Intake: failures by code'
    description: 'Events failed with the same code; the README table names the cause and the fix.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: failuresQuery
          timeAggregation: 'Total'
          metricMeasureColumn: 'n'
          dimensions: [
            {
              name: 'code'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: failureThreshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: alertActions
    }
  }
}

resource throttlingAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: 'alert-${appInsightsName}-throttling'
  location: location
  tags: tags
  properties: {
    displayName: 'Intake: Dataverse throttling sustained'
    description: 'Dataverse answered 429 for 45 minutes: the fleet sends more than the application user\'s limits allow.'
    severity: 3
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: throttlingQuery
          timeAggregation: 'Total'
          metricMeasureColumn: 'n'
          operator: 'GreaterThan'
          threshold: throttleThreshold
          failingPeriods: {
            numberOfEvaluationPeriods: 3
            minFailingPeriodsToAlert: 3
          }
        }
      ]
    }
    actions: {
      actionGroups: alertActions
    }
  }
}

resource breakerAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: 'alert-${appInsightsName}-breaker'
  location: location
  tags: tags
  properties: {
    displayName: 'Intake: queue messages held for an operator\'s fix'
    description: 'The breaker holds queue messages after a fault only an operator can fix (its code: README, Error codes). Fix it; the next probe closes the breaker and the held messages are created once.'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: breakerQuery
          timeAggregation: 'Total'
          metricMeasureColumn: 'n'
          dimensions: [
            {
              name: 'code'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: alertActions
    }
  }
}

output name string = appInsights.name
// The connection string holds the instrumentation key, which is an identifier, not a credential: with
// DisableLocalAuth, ingestion also needs an Entra ID token (APPLICATIONINSIGHTS_AUTHENTICATION_STRING).
output connectionString string = appInsights.properties.ConnectionString
