{{/* Chart name, truncated to 63 characters. */}}
{{- define "cascade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "cascade.fullname" -}}
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

{{- define "cascade.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cascade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cascade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cascade.labels" -}}
helm.sh/chart: {{ include "cascade.chart" . }}
{{ include "cascade.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cascade
{{- end }}

{{- define "cascade.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cascade.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The config.yaml text. */}}
{{- define "cascade.configYaml" -}}
{{- if .Values.configYaml }}
{{- .Values.configYaml }}
{{- else }}
{{- toYaml .Values.config }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding env vars, or "" when there is none. */}}
{{- define "cascade.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if and .Values.secret.create (include "cascade.secretData" .) }}
{{- include "cascade.fullname" . }}
{{- end }}
{{- end }}

{{/* The chart Secret's data, only non-empty values. */}}
{{- define "cascade.secretData" -}}
{{- range $k, $v := .Values.secret.env }}
{{- if $v }}
{{ $k }}: {{ $v | toString | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* How long the app takes to stop after SIGTERM: server.drain_delay_s (0 when unset: /readyz answers
503 while requests are still served) plus server.shutdown_grace_s (30 when unset), from the config. */}}
{{- define "cascade.shutdownGrace" -}}
{{- $server := dict }}
{{- if .Values.configYaml }}
{{- $cfg := fromYaml .Values.configYaml }}
{{- if $cfg.server }}{{ $server = $cfg.server }}{{ end }}
{{- else if and .Values.config .Values.config.server }}
{{- $server = .Values.config.server }}
{{- end }}
{{- $grace := 30.0 }}
{{- if hasKey $server "shutdown_grace_s" }}{{ $grace = $server.shutdown_grace_s | float64 }}{{ end }}
{{- $drain := 0.0 }}
{{- if hasKey $server "drain_delay_s" }}{{ $drain = $server.drain_delay_s | float64 }}{{ end }}
{{- addf $grace $drain | ceil | int }}
{{- end }}

{{- define "cascade.terminationGracePeriodSeconds" -}}
{{- if .Values.terminationGracePeriodSeconds }}
{{- .Values.terminationGracePeriodSeconds | int }}
{{- else }}
{{- add (include "cascade.shutdownGrace" . | int) (.Values.preStopSleepSeconds | int) 10 }}
{{- end }}
{{- end }}

{{/* "true" when the config sets auth.protect_metrics (then /metrics needs the proxy key). */}}
{{- define "cascade.metricsProtected" -}}
{{- $cfg := .Values.config }}
{{- if .Values.configYaml }}{{ $cfg = fromYaml .Values.configYaml }}{{ end }}
{{- if dig "auth" "protect_metrics" false $cfg }}true{{ end }}
{{- end }}
