{{/* Names, labels and images shared by the templates. */}}

{{- define "relora.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: the release name, unless it already contains the chart's name. */}}
{{- define "relora.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "relora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "relora.labels" -}}
{{ include "relora.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "relora.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "relora.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository[:tag][@digest]; the tag defaults to the chart's appVersion. */}}
{{- define "relora.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The operator's rules on namespaced resources: exactly the API calls it makes. */}}
{{- define "relora.namespacedRules" -}}
# Kopf indexes AdapterMigrations; the operator writes only their status.
- apiGroups: ["relora.dev"]
  resources: ["adaptermigrations"]
  verbs: ["list", "watch"]
- apiGroups: ["relora.dev"]
  resources: ["adaptermigrations/status"]
  verbs: ["patch"]
# One Job per adapter: created, then suspended, failed or given a TTL by patches; a worker
# group's Job (spec.distributed) is deleted and made again to restart the whole group.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# A worker group's headless Service (worker 0's DNS name for the others).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
# Trainer pods: indexed for their state; their log tail carries live progress.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Kubernetes events on AdapterMigrations (the operator's and Kopf's).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
