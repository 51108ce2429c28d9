{{/*
Chart name, truncated to 63 characters.
*/}}
{{- define "rerank.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Kept at 45 characters so that suffixes such as "-worker-metrics"
still fit in a 63-character DNS label.
*/}}
{{- define "rerank.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rerank.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rerank.workerName" -}}
{{- printf "%s-worker" (include "rerank.fullname" .) }}
{{- end }}

{{- define "rerank.sidecarName" -}}
{{- printf "%s-sidecar" (include "rerank.fullname" .) }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "rerank.labels" -}}
helm.sh/chart: {{ include "rerank.chart" . }}
app.kubernetes.io/name: {{ include "rerank.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rerank-service
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "rerank.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rerank.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rerank.worker.selectorLabels" -}}
{{ include "rerank.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "rerank.sidecar.selectorLabels" -}}
{{ include "rerank.selectorLabels" . }}
app.kubernetes.io/component: sidecar
{{- end }}

{{- define "rerank.worker.labels" -}}
{{ include "rerank.labels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "rerank.sidecar.labels" -}}
{{ include "rerank.labels" . }}
app.kubernetes.io/component: sidecar
{{- end }}

{{- define "rerank.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rerank.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image references. CPU pods get image.cpuTagSuffix appended to the default tag.
*/}}
{{- define "rerank.worker.image" -}}
{{- $repo := default .Values.image.repository .Values.worker.image.repository }}
{{- $tag := .Values.worker.image.tag }}
{{- if not $tag }}
{{- $tag = default .Chart.AppVersion .Values.image.tag }}
{{- if not .Values.worker.gpu.enabled }}
{{- $tag = printf "%s%s" $tag .Values.image.cpuTagSuffix }}
{{- end }}
{{- end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{- define "rerank.sidecar.image" -}}
{{- $repo := default .Values.image.repository .Values.sidecar.image.repository }}
{{- $tag := .Values.sidecar.image.tag }}
{{- if not $tag }}
{{- $tag = printf "%s%s" (default .Chart.AppVersion .Values.image.tag) .Values.image.cpuTagSuffix }}
{{- end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/*
Name of the Secret created by the chart for inline credentials.
*/}}
{{- define "rerank.secretName" -}}
{{- printf "%s-credentials" (include "rerank.fullname" .) }}
{{- end }}

{{/* NATS auth Secret name ("" when auth is off). */}}
{{- define "rerank.nats.secretName" -}}
{{- if ne .Values.nats.auth.type "none" }}
{{- default (include "rerank.secretName" .) .Values.nats.auth.existingSecret }}
{{- end }}
{{- end }}

{{/* Whether the chart must create its credentials Secret. */}}
{{- define "rerank.createSecret" -}}
{{- $a := .Values.nats.auth }}
{{- if or (and (ne $a.type "none") (not $a.existingSecret)) (and (not .Values.huggingface.token.existingSecret) .Values.huggingface.token.value) (and .Values.sidecar.enabled (not .Values.sidecar.apiKey.existingSecret) .Values.sidecar.apiKey.value) }}true{{ end }}
{{- end }}

{{- define "rerank.hfToken.secretName" -}}
{{- if .Values.huggingface.token.existingSecret }}
{{- .Values.huggingface.token.existingSecret }}
{{- else if .Values.huggingface.token.value }}
{{- include "rerank.secretName" . }}
{{- end }}
{{- end }}

{{- define "rerank.hfToken.key" -}}
{{- if .Values.huggingface.token.existingSecret }}{{ .Values.huggingface.token.key }}{{ else }}hf-token{{ end }}
{{- end }}

{{- define "rerank.apiKey.secretName" -}}
{{- if .Values.sidecar.apiKey.existingSecret }}
{{- .Values.sidecar.apiKey.existingSecret }}
{{- else if .Values.sidecar.apiKey.value }}
{{- include "rerank.secretName" . }}
{{- end }}
{{- end }}

{{- define "rerank.apiKey.key" -}}
{{- if .Values.sidecar.apiKey.existingSecret }}{{ .Values.sidecar.apiKey.key }}{{ else }}api-key{{ end }}
{{- end }}

{{/* Key in the NATS Secret for a given credential: the configured key for an existing Secret, a fixed one for the chart's Secret. */}}
{{- define "rerank.nats.key" -}}
{{- $root := index . 0 }}
{{- $field := index . 1 }}
{{- if $root.Values.nats.auth.existingSecret }}
{{- index $root.Values.nats.auth.secretKeys $field }}
{{- else }}
{{- printf "nats-%s" (index (dict "token" "token" "user" "user" "password" "password" "nkeySeed" "nkey-seed" "creds" "creds") $field) }}
{{- end }}
{{- end }}

{{/*
Validation that cannot be expressed in values.schema.json. Included by every workload.
*/}}
{{- define "rerank.validate" -}}
{{- $w := .Values.worker }}
{{- if and $w.autoscaling.keda.enabled $w.autoscaling.hpa.enabled }}
{{- fail "worker.autoscaling.keda.enabled and worker.autoscaling.hpa.enabled are mutually exclusive: KEDA creates and owns its own HPA. Enable only one." }}
{{- end }}
{{- if and $w.autoscaling.keda.enabled (eq (int $w.autoscaling.keda.minReplicas) 0) (ne $w.intake "jetstream") }}
{{- fail "worker.autoscaling.keda.minReplicas=0 needs worker.intake=jetstream: with the core intake a request sent while no worker runs fails at once (no responders), and nothing would wake the pool." }}
{{- end }}
{{- if le (int $w.terminationGracePeriodSeconds) (int $w.drainTimeoutSeconds) }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must be greater than worker.drainTimeoutSeconds (%d), or in-flight requests are killed mid-drain." (int $w.terminationGracePeriodSeconds) (int $w.drainTimeoutSeconds)) }}
{{- end }}
{{- $s := .Values.sidecar }}
{{- if and $s.enabled (le (int $s.terminationGracePeriodSeconds) (add (int $s.requestTimeoutSeconds) (int $s.preStopSleepSeconds))) }}
{{- fail (printf "sidecar.terminationGracePeriodSeconds (%d) must be greater than sidecar.requestTimeoutSeconds + sidecar.preStopSleepSeconds (%d)." (int $s.terminationGracePeriodSeconds) (add (int $s.requestTimeoutSeconds) (int $s.preStopSleepSeconds))) }}
{{- end }}
{{- $a := .Values.nats.auth }}
{{- if and (ne $a.type "none") (not $a.existingSecret) }}
{{- if and (eq $a.type "token") (not $a.token) }}{{ fail "nats.auth.type=token needs nats.auth.existingSecret or nats.auth.token" }}{{ end }}
{{- if and (eq $a.type "userPassword") (or (not $a.user) (not $a.password)) }}{{ fail "nats.auth.type=userPassword needs nats.auth.existingSecret or nats.auth.user and nats.auth.password" }}{{ end }}
{{- if and (eq $a.type "nkey") (not $a.nkeySeed) }}{{ fail "nats.auth.type=nkey needs nats.auth.existingSecret or nats.auth.nkeySeed" }}{{ end }}
{{- if and (eq $a.type "creds") (not $a.creds) }}{{ fail "nats.auth.type=creds needs nats.auth.existingSecret or nats.auth.creds" }}{{ end }}
{{- end }}
{{- if and .Values.nats.tls.enabled (not .Values.nats.tls.existingSecret) }}
{{- fail "nats.tls.enabled needs nats.tls.existingSecret" }}
{{- end }}
{{- if and .Values.nats.tls.enabled (ne (empty .Values.nats.tls.certKey) (empty .Values.nats.tls.keyKey)) }}
{{- fail "nats.tls.certKey and nats.tls.keyKey must be set together" }}
{{- end }}
{{- $c := .Values.model.cache }}
{{- if and (eq $c.type "hostPath") (not $c.hostPath.path) }}
{{- fail "model.cache.type=hostPath needs model.cache.hostPath.path" }}
{{- end }}
{{- if and $w.enabled $w.gpu.enabled (hasPrefix "cpu" (default "cuda" $w.device)) }}
{{- fail "worker.device=cpu contradicts worker.gpu.enabled=true (a GPU would be reserved and left idle); set worker.gpu.enabled=false for CPU workers" }}
{{- end }}
{{- end }}

{{/*
NATS client env shared by worker and sidecar: secrets only (non-secret settings live in the ConfigMaps).
*/}}
{{- define "rerank.nats.secretEnv" -}}
{{- $a := .Values.nats.auth }}
{{- $secret := include "rerank.nats.secretName" . }}
{{- if eq $a.type "token" }}
- name: RERANK_NATS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "rerank.nats.key" (list . "token") }}
{{- else if eq $a.type "userPassword" }}
- name: RERANK_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "rerank.nats.key" (list . "user") }}
- name: RERANK_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "rerank.nats.key" (list . "password") }}
{{- else if eq $a.type "nkey" }}
- name: RERANK_NATS_NKEY_SEED
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "rerank.nats.key" (list . "nkeySeed") }}
{{- else if eq $a.type "creds" }}
- name: RERANK_NATS_CREDS_FILE
  value: /etc/rerank/nats-creds/nats.creds
{{- end }}
{{- if .Values.nats.tls.enabled }}
{{- if .Values.nats.tls.caKey }}
- name: RERANK_NATS_TLS_CA
  value: /etc/rerank/nats-tls/{{ .Values.nats.tls.caKey }}
{{- end }}
{{- if .Values.nats.tls.certKey }}
- name: RERANK_NATS_TLS_CERT
  value: /etc/rerank/nats-tls/{{ .Values.nats.tls.certKey }}
- name: RERANK_NATS_TLS_KEY
  value: /etc/rerank/nats-tls/{{ .Values.nats.tls.keyKey }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rerank.nats.volumes" -}}
{{- if eq .Values.nats.auth.type "creds" }}
- name: nats-creds
  secret:
    secretName: {{ include "rerank.nats.secretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "rerank.nats.key" (list . "creds") }}
        path: nats.creds
{{- end }}
{{- if .Values.nats.tls.enabled }}
- name: nats-tls
  secret:
    secretName: {{ .Values.nats.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "rerank.nats.volumeMounts" -}}
{{- if eq .Values.nats.auth.type "creds" }}
- name: nats-creds
  mountPath: /etc/rerank/nats-creds
  readOnly: true
{{- end }}
{{- if .Values.nats.tls.enabled }}
- name: nats-tls
  mountPath: /etc/rerank/nats-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "rerank.hfTokenEnv" -}}
{{- $s := include "rerank.hfToken.secretName" . }}
{{- if $s }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $s }}
      key: {{ include "rerank.hfToken.key" . }}
{{- end }}
{{- end }}

{{/* Probe timing fields from values (path and port are set by the templates). */}}
{{- define "rerank.probeTiming" -}}
initialDelaySeconds: {{ .initialDelaySeconds }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
successThreshold: {{ .successThreshold }}
{{- end }}

{{/* Whether the worker's HF_HUB_OFFLINE should be 1. */}}
{{- define "rerank.worker.offline" -}}
{{- if or .Values.model.offline (and .Values.model.preDownload.enabled .Values.model.preDownload.setOffline) }}1{{ end }}
{{- end }}

{{- define "rerank.worker.dtype" -}}
{{- if .Values.model.dtype }}{{ .Values.model.dtype }}{{ else if .Values.worker.gpu.enabled }}bf16{{ else }}f32{{ end }}
{{- end }}

{{- define "rerank.worker.device" -}}
{{- if .Values.worker.device }}{{ .Values.worker.device }}{{ else if .Values.worker.gpu.enabled }}cuda{{ else }}cpu{{ end }}
{{- end }}

{{- define "rerank.worker.modelVolume" -}}
{{- $c := .Values.model.cache }}
- name: model-cache
{{- if eq $c.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-model-cache" (include "rerank.fullname" .)) $c.persistentVolumeClaim.existingClaim }}
{{- else if eq $c.type "hostPath" }}
  hostPath:
    path: {{ $c.hostPath.path }}
    type: {{ $c.hostPath.type }}
{{- else }}
  emptyDir:
    {{- with $c.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- else }}
    {}
    {{- end }}
{{- end }}
{{- end }}

{{/* Secret-backed and per-pod env of the worker container (non-secret settings come from the ConfigMap). */}}
{{- define "rerank.worker.env" -}}
{{- if include "rerank.worker.offline" . }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- include "rerank.hfTokenEnv" . }}
{{- include "rerank.nats.secretEnv" . }}
{{- with .Values.worker.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Secret-backed env of the sidecar container. */}}
{{- define "rerank.sidecar.env" -}}
{{- with include "rerank.apiKey.secretName" . }}
- name: RERANK_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "rerank.apiKey.key" $ }}
{{- end }}
{{- include "rerank.nats.secretEnv" . }}
{{- with .Values.sidecar.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
