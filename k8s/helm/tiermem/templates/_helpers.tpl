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

{{/*
A memory quantity plus a whole number of GiB: (dict "q" "24Gi" "add" 16 "what" "vllm.resources.requests.memory").
Only whole Mi, Gi or Ti are added to (the chart does not parse every Kubernetes
quantity); anything else fails with the field's name.
*/}}
{{- define "tiermem.addGiB" -}}
{{- $q := toString .q }}
{{- $add := int .add }}
{{- if not (regexMatch "^[0-9]+(Mi|Gi|Ti)$" $q) }}
{{- fail (printf "%s is %q: with vllm.kvOffload.enabled write it as a whole number of Mi, Gi or Ti, so that the chart can add vllm.kvOffload.cpuGiB to it" .what $q) }}
{{- end }}
{{- if hasSuffix "Mi" $q }}
{{- $mi := add (int (trimSuffix "Mi" $q)) (mul $add 1024) }}
{{- if eq (mod $mi 1024) 0 }}{{ printf "%dGi" (div $mi 1024) }}{{ else }}{{ printf "%dMi" $mi }}{{ end }}
{{- else if hasSuffix "Ti" $q }}
{{- printf "%dGi" (add (mul (int (trimSuffix "Ti" $q)) 1024) $add) }}
{{- else }}
{{- printf "%dGi" (add (int (trimSuffix "Gi" $q)) $add) }}
{{- end }}
{{- end }}

{{/*
vllm.kvOffload checks that values.schema.json cannot express (and the ones it
can, again, for `--skip-schema-validation`); rendering fails with the reason.
*/}}
{{- define "tiermem.vllm.kvOffload.validate" -}}
{{- $kv := .Values.vllm.kvOffload }}
{{- if $kv.enabled }}
{{- if not (has (toString $kv.backend) (list "native" "lmcache")) }}
{{- fail (printf "vllm.kvOffload.backend is %q: use native (vLLM's OffloadingConnector) or lmcache (LMCacheConnectorV1)" (toString $kv.backend)) }}
{{- end }}
{{- if or (lt (float64 $kv.cpuGiB) 1.0) (ne (float64 $kv.cpuGiB) (float64 (int $kv.cpuGiB))) }}
{{- fail (printf "vllm.kvOffload.cpuGiB is %v: the CPU tier needs a whole number of GiB, at least 1" $kv.cpuGiB) }}
{{- end }}
{{- if eq $kv.backend "native" }}
{{- if $kv.disk.enabled }}
{{- fail "vllm.kvOffload.disk.enabled needs vllm.kvOffload.backend=lmcache: vLLM's native offloading (--kv-offloading-backend=native) keeps its tier in CPU memory only" }}
{{- end }}
{{- $tag := toString .Values.vllm.image.tag }}
{{- if and (regexMatch "^v?[0-9]+\\.[0-9]+\\.[0-9]+$" $tag) (semverCompare "<0.32.0" $tag) }}
{{- fail (printf "vllm.kvOffload with backend native passes --kv-offloading-backend/--kv-offloading-size, which vllm.image.tag %s predates (they were checked against vLLM 0.32.0): set vllm.image.tag to v0.32.0 or later" $tag) }}
{{- end }}
{{- end }}
{{- if $kv.disk.enabled }}
{{- if or (lt (float64 $kv.disk.sizeGiB) 1.0) (ne (float64 $kv.disk.sizeGiB) (float64 (int $kv.disk.sizeGiB))) }}
{{- fail (printf "vllm.kvOffload.disk.sizeGiB is %v: the disk tier needs a whole number of GiB, at least 1" $kv.disk.sizeGiB) }}
{{- end }}
{{- $path := toString $kv.disk.path }}
{{- if not (regexMatch "^/[^:]*[^/:]$" $path) }}
{{- fail (printf "vllm.kvOffload.disk.path is %q: an absolute path without a trailing slash" $path) }}
{{- end }}
{{- range list "/models" "/dev/shm" "/tmp" }}
{{- if or (eq $path .) (hasPrefix (printf "%s/" .) $path) (hasPrefix (printf "%s/" $path) .) }}
{{- fail (printf "vllm.kvOffload.disk.path %q overlaps the vLLM container's %s volume: pick another path" $path .) }}
{{- end }}
{{- end }}
{{- if and $kv.disk.existingClaim (gt (int .Values.vllm.replicaCount) 1) }}
{{- fail (printf "vllm.kvOffload.disk.existingClaim %q is one volume for %d vLLM replicas: two LMCache instances must not share a disk tier; leave it empty (an emptyDir per pod)" $kv.disk.existingClaim (int .Values.vllm.replicaCount)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* `vllm serve` flags of the KV offload tier (list items; nothing when off). */}}
{{- define "tiermem.vllm.kvOffload.args" -}}
{{- $kv := .Values.vllm.kvOffload }}
{{- if $kv.enabled }}
{{- if eq $kv.backend "native" }}
- "--kv-offloading-backend=native"
- "--kv-offloading-size={{ int $kv.cpuGiB }}"
{{- else }}
- {{ printf "--kv-transfer-config=%s" (toJson (dict "kv_connector" "LMCacheConnectorV1" "kv_role" "kv_both")) | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* LMCache's environment (list items; nothing when off or native). */}}
{{- define "tiermem.vllm.kvOffload.env" -}}
{{- $kv := .Values.vllm.kvOffload }}
{{- if and $kv.enabled (eq $kv.backend "lmcache") }}
# LMCache reads its settings from LMCACHE_* (sizes in GB).
- name: LMCACHE_LOCAL_CPU
  value: "True"
- name: LMCACHE_MAX_LOCAL_CPU_SIZE
  value: {{ int $kv.cpuGiB | quote }}
- name: LMCACHE_CHUNK_SIZE
  value: {{ int $kv.lmcache.chunkSize | quote }}
{{- if $kv.disk.enabled }}
- name: LMCACHE_LOCAL_DISK
  value: {{ printf "file://%s/" $kv.disk.path | quote }}
- name: LMCACHE_MAX_LOCAL_DISK_SIZE
  value: {{ int $kv.disk.sizeGiB | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Resources of the vLLM container: vllm.resources, with requests.memory and
limits.memory (where set) raised by vllm.kvOffload.cpuGiB when the tier is on.
*/}}
{{- define "tiermem.vllm.resources" -}}
{{- $res := deepCopy .Values.vllm.resources }}
{{- $kv := .Values.vllm.kvOffload }}
{{- if $kv.enabled }}
{{- range $kind := list "requests" "limits" }}
{{- $memory := dig $kind "memory" "" $res }}
{{- if $memory }}
{{- $_ := set (index $res $kind) "memory" (include "tiermem.addGiB" (dict "q" $memory "add" $kv.cpuGiB "what" (printf "vllm.resources.%s.memory" $kind))) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* sizeLimit of vLLM's /dev/shm: the native tier is a file there, so it grows by cpuGiB. */}}
{{- define "tiermem.vllm.shmSizeLimit" -}}
{{- $kv := .Values.vllm.kvOffload }}
{{- if and $kv.enabled (eq $kv.backend "native") }}
{{- include "tiermem.addGiB" (dict "q" .Values.vllm.shmSizeLimit "add" $kv.cpuGiB "what" "vllm.shmSizeLimit") }}
{{- else }}
{{- .Values.vllm.shmSizeLimit }}
{{- end }}
{{- end }}

{{/* sizeLimit of the LMCache disk tier's emptyDir: sizeGiB plus 10% (at least 1 GiB). */}}
{{- define "tiermem.vllm.kvDiskSizeLimit" -}}
{{- $size := int .Values.vllm.kvOffload.disk.sizeGiB }}
{{- printf "%dGi" (add $size (max 1 (div (add $size 9) 10))) }}
{{- end }}
