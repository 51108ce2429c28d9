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

{{/*
Labels of one worker pool, (list $root $pool). The pool label is added only to named pools, so
that the single pool rendered from `workerPools: []` keeps the selector it had before the chart
took pools (a Deployment's selector cannot change on upgrade).
*/}}
{{- define "rerank.pool.selectorLabels" -}}
{{- $p := index . 1 }}
{{- include "rerank.worker.selectorLabels" (index . 0) }}
{{- if $p.name }}
rerank-service/pool: {{ $p.name }}
{{- end }}
{{- end }}

{{- define "rerank.pool.labels" -}}
{{- $p := index . 1 }}
{{- include "rerank.worker.labels" (index . 0) }}
{{- if $p.name }}
rerank-service/pool: {{ $p.name }}
{{- end }}
{{- end }}

{{/*
Labels of a pool's queue Job, (list $root $pool): its own component, so that no worker selector
(Service, PDB, NetworkPolicy, autoscaler) takes its pod for a worker.
*/}}
{{- define "rerank.queueJob.labels" -}}
{{- $p := index . 1 }}
{{ include "rerank.labels" (index . 0) }}
app.kubernetes.io/component: queue
{{- if $p.name }}
rerank-service/pool: {{ $p.name }}
{{- end }}
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
rerank.worker.image takes (list $root $pool): a GPU pool runs the CUDA image, a CPU pool the -cpu one.
*/}}
{{- define "rerank.worker.image" -}}
{{- $root := index . 0 }}
{{- $p := index . 1 }}
{{- $repo := default $root.Values.image.repository $p.image.repository }}
{{- $tag := $p.image.tag }}
{{- if not $tag }}
{{- $tag = default $root.Chart.AppVersion $root.Values.image.tag }}
{{- if not $p.onGpu }}
{{- $tag = printf "%s%s" $tag $root.Values.image.cpuTagSuffix }}
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
{{- $pools := include "rerank.workerPools" . | fromJsonArray }}
{{- $names := list }}
{{- $ids := list }}
{{- $defaults := list }}
{{- range $pools }}
{{- $where := ternary (printf "workerPools[%s]" .name) "worker" (ne .name "") }}
{{- if has .name $names }}
{{- fail (printf "workerPools: two pools are named %q; pool names must be unique (they name the pool's Deployment, HPA, ScaledObject and PDB)." .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- if not .model }}
{{- fail (printf "%s: model is empty; set the Hugging Face repo id or the local directory the pool serves." $where) }}
{{- end }}
{{- if has .servedId $ids }}
{{- fail (printf "workerPools: two pools serve the model id %q; each model is served by one pool (set servedModelName to serve the same checkpoint under another id)." .servedId) }}
{{- end }}
{{- $ids = append $ids .servedId }}
{{- if .default }}{{ $defaults = append $defaults .name }}{{ end }}
{{- if and .autoscaling.keda.enabled .autoscaling.hpa.enabled }}
{{- fail (printf "%s.autoscaling.keda.enabled and %s.autoscaling.hpa.enabled are mutually exclusive: KEDA creates and owns its own HPA. Enable only one." $where $where) }}
{{- end }}
{{- if and .autoscaling.keda.enabled (eq (int .autoscaling.keda.minReplicas) 0) (ne $w.intake "jetstream") }}
{{- fail (printf "%s.autoscaling.keda.minReplicas=0 needs worker.intake=jetstream: with the core intake a request sent while no worker runs fails at once (no responders), and nothing would wake the pool." $where) }}
{{- end }}
{{- if le (int .terminationGracePeriodSeconds) (int .drainTimeoutSeconds) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be greater than %s.drainTimeoutSeconds (%d), or in-flight requests are killed mid-drain." $where (int .terminationGracePeriodSeconds) $where (int .drainTimeoutSeconds)) }}
{{- end }}
{{- end }}
{{- if and $pools (ne (len $defaults) 1) }}
{{- fail (printf "workerPools: exactly one pool must set default: true (it also serves requests that name no model, on %s), found %d%s." .Values.nats.subject (len $defaults) (ternary "" (printf ": %s" (join ", " $defaults)) (empty $defaults))) }}
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

{{/* Whether the workers' HF_HUB_OFFLINE should be 1. */}}
{{- define "rerank.worker.offline" -}}
{{- if or .Values.model.offline (and .Values.model.preDownload.enabled .Values.model.preDownload.setOffline) }}1{{ end }}
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

{{/* Secret-backed and per-pool env of a worker container, (list $root $pool) (shared non-secret settings come from the ConfigMap). */}}
{{- define "rerank.worker.env" -}}
{{- $root := index . 0 }}
{{- $p := index . 1 }}
{{- if include "rerank.worker.offline" $root }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with $p.cpuThreadCount }}
- name: RAYON_NUM_THREADS
  value: {{ . | quote }}
{{- end }}
{{- include "rerank.hfTokenEnv" $root }}
{{- include "rerank.nats.secretEnv" $root }}
{{- with $p.extraEnv }}
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

{{/*
Deep merge of two maps, (list $base $override), as JSON: maps merge key by key, anything else in
$override (false, 0, "", [] and null included) replaces the value in $base. Sprig's mergeOverwrite
is not used because it skips "empty" overrides, so a pool could not turn off what `worker` turns on.
*/}}
{{- define "rerank.deepMerge" -}}
{{- $base := deepCopy (index . 0) }}
{{- range $k, $v := index . 1 }}
{{- if and (kindIs "map" $v) (kindIs "map" (index $base $k)) }}
{{- $_ := set $base $k (include "rerank.deepMerge" (list (index $base $k) $v) | fromJson) }}
{{- else }}
{{- $_ := set $base $k $v }}
{{- end }}
{{- end }}
{{- toJson $base }}
{{- end }}

{{/*
The NATS subject token of a model id. Mirrors rerank_service::wire::model_subject (src/wire/mod.rs),
which is the one definition: ASCII letters, digits and "-" are kept, every other byte (of the
UTF-8 encoding) is written "_XX" in uppercase hex, and the empty id is "_".
"Qwen/Qwen3-Reranker-0.6B" -> "Qwen_2FQwen3-Reranker-0_2E6B". Change both together.
*/}}
{{- define "rerank.modelToken" -}}
{{- if eq . "" }}_{{ end }}
{{- range $c := splitList "" . }}
{{- if regexMatch "^[A-Za-z0-9-]$" $c }}{{ $c }}{{ else }}{{ regexReplaceAll "([0-9A-F]{2})" (printf "%X" $c) "_${1}" }}{{ end }}
{{- end }}
{{- end }}

{{/*
RAYON_NUM_THREADS of a CPU pool, (list $pool): cpuThreads when set, else its CPU request rounded
up ("" when neither is set: the worker then uses every core it sees).
*/}}
{{- define "rerank.pool.cpuThreads" -}}
{{- $p := index . 0 }}
{{- if gt (int $p.cpuThreads) 0 }}
{{- int $p.cpuThreads }}
{{- else }}
{{- $cpu := toString (dig "requests" "cpu" "" (default (dict) $p.resources)) }}
{{- if hasSuffix "m" $cpu }}
{{- max 1 (div (add (int (trimSuffix "m" $cpu)) 999) 1000) }}
{{- else if $cpu }}
{{- max 1 (ceil (float64 $cpu) | int) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The worker pools, resolved, as a JSON list (`include "rerank.workerPools" . | fromJsonArray`).
Each pool is the `worker` block (the defaults of every pool) deep-merged with its `workerPools`
entry, plus derived fields:
  name            the pool name ("" for the single pool of `workerPools: []`)
  resourceName    its Deployment/HPA/ScaledObject/PDB name: <fullname>-worker-<name>, or
                  <fullname>-worker for the single unnamed pool (the names from before pools)
  model, revision, servedModelName, servedId (servedModelName, else model), default
  onGpu, rerankDevice, dtype, token (rerank.modelToken of servedId),
  consumer        its JetStream durable consumer: nats.jetstream.consumer for the default model,
                  <nats.jetstream.consumer>-<token> for any other (the workers' own naming rule)
  cpuThreadCount  RAYON_NUM_THREADS of a CPU pool ("" on a GPU pool)
`workerPools: []` gives one pool: model.id, the default model, named as before pools existed.
Nothing is rendered when worker.enabled is false.
*/}}
{{- define "rerank.workerPools" -}}
{{- $root := . }}
{{- $base := omit .Values.worker "enabled" "intake" "healthPort" "metricsService" }}
{{- $entries := .Values.workerPools }}
{{- if not $entries }}
{{- $entries = list (dict "name" "" "model" .Values.model.id "default" true) }}
{{- end }}
{{- $out := list }}
{{- if .Values.worker.enabled }}
{{- range $entries }}
{{- $p := include "rerank.deepMerge" (list $base .) | fromJson }}
{{- $name := default "" .name }}
{{- $_ := set $p "name" $name }}
{{- if $name }}
{{- $_ := set $p "resourceName" (printf "%s-worker-%s" (include "rerank.fullname" $root | trunc (int (sub 47 (len $name))) | trimSuffix "-") $name) }}
{{- else }}
{{- $_ := set $p "resourceName" (include "rerank.workerName" $root) }}
{{- end }}
{{- $_ := set $p "model" (default "" .model) }}
{{- $_ := set $p "revision" (default $root.Values.model.revision .revision) }}
{{- $_ := set $p "servedModelName" (default "" .servedModelName) }}
{{- $_ := set $p "servedId" (default $p.model $p.servedModelName) }}
{{- $_ := set $p "default" (eq (toString .default) "true") }}
{{- $device := default "" $p.device }}
{{- $_ := set $p "onGpu" (ternary $p.gpu.enabled (ne $device "cpu") (eq $device "")) }}
{{- $_ := set $p "rerankDevice" (ternary (ternary "cuda" "cpu" $p.onGpu) $device (has $device (list "" "gpu"))) }}
{{- $_ := set $p "dtype" (default (default (ternary "bf16" "f32" $p.onGpu) $root.Values.model.dtype) .dtype) }}
{{- $_ := set $p "token" (include "rerank.modelToken" $p.servedId) }}
{{- $_ := set $p "consumer" (ternary $root.Values.nats.jetstream.consumer (printf "%s-%s" $root.Values.nats.jetstream.consumer $p.token) $p.default) }}
{{- $_ := set $p "cpuThreadCount" (ternary "" (include "rerank.pool.cpuThreads" (list $p)) $p.onGpu) }}
{{- $out = append $out $p }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}
