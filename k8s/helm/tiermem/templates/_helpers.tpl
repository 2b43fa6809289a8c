{{/*
Names and labels shared by every template of the tiermem chart.
*/}}

{{/* The chart name, or nameOverride; a DNS label (63 characters). */}}
{{- define "tiermem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: "<release>-<chart>", or just the
release name when it already contains the chart name, or fullnameOverride.
*/}}
{{- define "tiermem.fullname" -}}
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

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "tiermem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "tiermem.commonLabels" -}}
helm.sh/chart: {{ include "tiermem.chart" . }}
app.kubernetes.io/part-of: tiermem
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of the tiermem API pods (immutable once installed). */}}
{{- define "tiermem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tiermem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: api
{{- end }}

{{/* All labels of the tiermem API objects. */}}
{{- define "tiermem.labels" -}}
{{ include "tiermem.commonLabels" . }}
{{ include "tiermem.selectorLabels" . }}
{{- end }}

{{/* Name of the vLLM Deployment, Service and PVC. */}}
{{- define "tiermem.vllm.fullname" -}}
{{- printf "%s-vllm" (include "tiermem.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the vLLM pods. */}}
{{- define "tiermem.vllm.selectorLabels" -}}
app.kubernetes.io/name: vllm
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: llm
{{- end }}

{{/* All labels of the vLLM objects. */}}
{{- define "tiermem.vllm.labels" -}}
{{ include "tiermem.commonLabels" . }}
{{ include "tiermem.vllm.selectorLabels" . }}
{{- end }}

{{/* The ServiceAccount the tiermem pods run as. */}}
{{- define "tiermem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tiermem.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The tiermem image reference; the tag defaults to the chart's appVersion. */}}
{{- define "tiermem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
TIERMEM_LLM_URL: config.llmUrl, or the chart's vLLM found through its
EndpointSlices, so each session stays on one replica (its KV prefix cache).
*/}}
{{- define "tiermem.llmUrl" -}}
{{- if .Values.config.llmUrl }}
{{- .Values.config.llmUrl }}
{{- else if .Values.vllm.enabled }}
{{- printf "k8s://%s/%s:http" .Release.Namespace (include "tiermem.vllm.fullname" .) }}
{{- end }}
{{- end }}

{{/* An HTTP probe on the "http" port from a probes.* value. */}}
{{- define "tiermem.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: http
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- end }}

{{/*
Checks across fields that values.schema.json cannot express; rendering fails
with the reason.
*/}}
{{- define "tiermem.validate" -}}
{{- $drain := int .Values.config.drainTimeoutS }}
{{- $sleep := int .Values.preStopSleepSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (add $drain $sleep) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds (%d) + config.drainTimeoutS (%d), or the kubelet kills streams mid-drain" (int .Values.terminationGracePeriodSeconds) $sleep $drain) }}
{{- end }}
{{- if and (not .Values.config.redisUrl) (not .Values.secrets.redisUrlKey) }}
{{- fail "set config.redisUrl or secrets.redisUrlKey: without one every pod starts its own embedded Redis" }}
{{- end }}
{{- if and (not .Values.config.milvusUri) (or .Values.keda.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "config.milvusUri is empty (Milvus Lite, one process per file): that allows one replica only, without KEDA" }}
{{- end }}
{{- if and (not .Values.vllm.enabled) (not .Values.config.llmUrl) }}
{{- fail "set config.llmUrl when vllm.enabled is false" }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount)) }}
{{- fail "keda.minReplicaCount must not exceed keda.maxReplicaCount" }}
{{- end }}
{{- end }}
