{{/*
Names and labels shared by every template. Object names derive from the release's fullname
(`datapin` for a release named datapin), and the operator is told each of them through its
DATAPIN_* environment, so the chart and the program never disagree on a name.
*/}}
{{- define "datapin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "datapin.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "datapin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: name, instance, component. */}}
{{- define "datapin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "datapin.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every label of one component's objects. Call with (dict "root" $ "component" "x"). */}}
{{- define "datapin.labels" -}}
{{ include "datapin.selectorLabels" . }}
helm.sh/chart: {{ include "datapin.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: datapin
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "datapin.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "datapin.sidecarImage" -}}
{{- default (include "datapin.image" .) .Values.sidecar.image }}
{{- end }}

{{- define "datapin.operatorName" -}}{{ include "datapin.fullname" . }}-operator{{- end }}
{{- define "datapin.agentName" -}}{{ include "datapin.fullname" . }}-agent{{- end }}
{{- define "datapin.webhookService" -}}{{ include "datapin.fullname" . }}-webhook{{- end }}
{{- define "datapin.webhookTLSSecret" -}}{{ include "datapin.fullname" . }}-webhook-tls{{- end }}
{{- define "datapin.prefetchConfigMap" -}}{{ include "datapin.fullname" . }}-prefetch{{- end }}
{{- define "datapin.agentCredentials" -}}{{ include "datapin.fullname" . }}-agent-credentials{{- end }}
{{- define "datapin.peering" -}}{{ include "datapin.fullname" . }}{{- end }}

{{/* The agent selector the operator uses to find agents (DATAPIN_AGENT_SELECTOR). */}}
{{- define "datapin.agentSelector" -}}
app.kubernetes.io/name={{ include "datapin.name" . }},app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=agent
{{- end }}

{{/* Restricted-profile container security context (non-root, read-only root, no caps). */}}
{{- define "datapin.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}
