{{- define "ai-lb.name" -}}{{ .Chart.Name }}{{- end -}}
{{- define "ai-lb.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- define "ai-lb.labels" -}}
app.kubernetes.io/name: {{ include "ai-lb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "ai-lb.selector" -}}
app.kubernetes.io/name: {{ include "ai-lb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "ai-lb.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "ai-lb.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}
{{- define "ai-lb.redisUrl" -}}
{{- if .Values.redis.url -}}{{ .Values.redis.url }}
{{- else if .Values.redis.enabled -}}{{ printf "redis://%s-redis:6379/0" (include "ai-lb.fullname" .) }}
{{- else -}}memory{{- end -}}
{{- end -}}
