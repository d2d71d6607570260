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

{{/*
The labels that select the CA service's pods. Apart from the nodes' (weft.selectorLabels): the
DaemonSet, the weft-metrics Service and the PodMonitor must not select them.
*/}}
{{- define "weft.ca.selectorLabels" -}}
app.kubernetes.io/name: weft-ca
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The labels of the CA service's objects. */}}
{{- define "weft.ca.labels" -}}
{{ include "weft.ca.selectorLabels" . }}
app.kubernetes.io/part-of: weft
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ include "weft.chart" . }}
{{- end }}

{{/* The CA service's name in cluster DNS, as nodes dial it (in its TLS certificate). */}}
{{- define "weft.ca.host" -}}
weft-ca.{{ include "weft.namespace" . }}.svc
{{- end }}

{{/*
What weft reads of the cluster, to know what runs where: the rules of the nodes' ClusterRole,
and of the CA service's (which signs an identity only for the node running a pod of it).
*/}}
{{- define "weft.registryRules" -}}
# What runs where, and the Services in front of it.
- apiGroups: [""]
  resources: [namespaces, nodes, pods, services]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
# Istio policy and routing, Gateway API routes. A kind whose CRD is not installed answers 404
# to the list: no access to CRDs is needed.
- apiGroups: [security.istio.io]
  resources: [authorizationpolicies, peerauthentications]
  verbs: [get, list, watch]
- apiGroups: [networking.istio.io]
  resources: [virtualservices, destinationrules, serviceentries]
  verbs: [get, list, watch]
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes, grpcroutes]
  verbs: [get, list, watch]
{{- end }}
