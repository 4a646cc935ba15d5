{{- define "hearth.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hearth.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "hearth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hearth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "hearth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "hearth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret with the API tokens (and the store URL when the chart holds it). */}}
{{- define "hearth.secretName" -}}
{{- default (include "hearth.fullname" .) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Whether the replicas share a PostgreSQL store. */}}
{{- define "hearth.sharedStore" -}}
{{- if or .Values.store.url .Values.store.existingSecret .Values.postgresql.enabled -}}true{{- end -}}
{{- end -}}

{{- define "hearth.checks" -}}
{{- if and (not .Values.auth.tokens) (not .Values.auth.existingSecret) -}}
{{- fail "auth.tokens or auth.existingSecret is required: hearth listens on 0.0.0.0 and refuses to serve it without an API token" -}}
{{- end -}}
{{- if and (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) (not (include "hearth.sharedStore" .)) -}}
{{- fail "more than one replica needs the shared store: set store.url (postgres://...), store.existingSecret, or postgresql.enabled. On the default SQLite store each replica would keep its own predictions: a GET on another replica is a 404, and a cancel there does nothing" -}}
{{- end -}}
{{- if and .Values.postgresql.enabled (not .Values.postgresql.password) -}}
{{- fail "postgresql.password is required with postgresql.enabled" -}}
{{- end -}}
{{- end -}}
