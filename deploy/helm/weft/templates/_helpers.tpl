{{/*
Helpers of the weft chart. The chart is rendered by Helm and by `cargo xtask chart`, which
implements the functions used here (see the chart's README): use no other.
*/}}

{{/* The namespace of every namespaced object. */}}
{{- define "weft.namespace" -}}
{{- .Values.namespace.name | default .Release.Namespace -}}
{{- end }}

{{/* Chart name and version, as the helm.sh/chart label takes them. */}}
{{- define "weft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* The labels that select weft's pods: never change them (a DaemonSet's selector is immutable). */}}
{{- define "weft.selectorLabels" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The labels of every object. */}}
{{- define "weft.labels" -}}
{{ include "weft.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ include "weft.chart" . }}
{{- end }}

{{- define "weft.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end }}

{{/* The Secret holding the mesh CA. */}}
{{- define "weft.caSecret" -}}
{{- if .Values.ca.create -}}
weft-ca
{{- else -}}
{{- required "ca.existingSecret: name the Secret holding ca.crt and ca.key (or set ca.create)" .Values.ca.existingSecret -}}
{{- end -}}
{{- end }}
