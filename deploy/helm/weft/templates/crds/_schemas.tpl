{{/*
openAPIV3Schemas of the CRDs weft reads, written for weft: each spec's fields are typed at the
top level (none of Istio's is dropped by pruning), and the nested parts weft reads are kept as
they are written (x-kubernetes-preserve-unknown-fields); weft validates them itself and reports
what it cannot apply.
*/}}

{{- define "weft.crd.metadata" -}}
labels:
  {{- include "weft.labels" . | nindent 2 }}
{{- if .Values.crds.keep }}
annotations:
  # Uninstalling the release keeps the CRDs, and so every object of their kinds.
  helm.sh/resource-policy: keep
{{- end }}
{{- end }}

{{- define "weft.crd.selector" -}}
type: object
properties:
  matchLabels:
    type: object
    additionalProperties:
      type: string
{{- end }}

{{- define "weft.crd.objects" -}}
type: array
items:
  type: object
  x-kubernetes-preserve-unknown-fields: true
{{- end }}

{{- define "weft.crd.strings" -}}
type: array
items:
  type: string
{{- end }}

{{- define "weft.crd.status" -}}
status:
  type: object
  x-kubernetes-preserve-unknown-fields: true
{{- end }}

{{- define "weft.crd.authorizationPolicy" -}}
type: object
properties:
  spec:
    type: object
    properties:
      selector:
        {{- include "weft.crd.selector" . | nindent 8 }}
      targetRef:
        type: object
        x-kubernetes-preserve-unknown-fields: true
      targetRefs:
        {{- include "weft.crd.objects" . | nindent 8 }}
      action:
        type: string
        enum: [ALLOW, DENY, AUDIT, CUSTOM]
      provider:
        type: object
        properties:
          name:
            type: string
      rules:
        type: array
        items:
          type: object
          properties:
            from:
              {{- include "weft.crd.objects" . | nindent 14 }}
            to:
              {{- include "weft.crd.objects" . | nindent 14 }}
            when:
              {{- include "weft.crd.objects" . | nindent 14 }}
  {{- include "weft.crd.status" . | nindent 2 }}
{{- end }}

{{- define "weft.crd.peerAuthentication" -}}
type: object
properties:
  spec:
    type: object
    properties:
      selector:
        {{- include "weft.crd.selector" . | nindent 8 }}
      mtls:
        type: object
        properties:
          mode:
            type: string
            enum: [UNSET, DISABLE, PERMISSIVE, STRICT]
      portLevelMtls:
        type: object
        additionalProperties:
          type: object
          properties:
            mode:
              type: string
              enum: [UNSET, DISABLE, PERMISSIVE, STRICT]
  {{- include "weft.crd.status" . | nindent 2 }}
{{- end }}

{{- define "weft.crd.virtualService" -}}
type: object
properties:
  spec:
    type: object
    properties:
      hosts:
        {{- include "weft.crd.strings" . | nindent 8 }}
      gateways:
        {{- include "weft.crd.strings" . | nindent 8 }}
      http:
        {{- include "weft.crd.objects" . | nindent 8 }}
      tls:
        {{- include "weft.crd.objects" . | nindent 8 }}
      tcp:
        {{- include "weft.crd.objects" . | nindent 8 }}
      exportTo:
        {{- include "weft.crd.strings" . | nindent 8 }}
  {{- include "weft.crd.status" . | nindent 2 }}
{{- end }}

{{- define "weft.crd.destinationRule" -}}
type: object
properties:
  spec:
    type: object
    properties:
      host:
        type: string
      trafficPolicy:
        type: object
        x-kubernetes-preserve-unknown-fields: true
      subsets:
        type: array
        items:
          type: object
          properties:
            name:
              type: string
            labels:
              type: object
              additionalProperties:
                type: string
            trafficPolicy:
              type: object
              x-kubernetes-preserve-unknown-fields: true
      exportTo:
        {{- include "weft.crd.strings" . | nindent 8 }}
      workloadSelector:
        {{- include "weft.crd.selector" . | nindent 8 }}
  {{- include "weft.crd.status" . | nindent 2 }}
{{- end }}

{{- define "weft.crd.serviceEntry" -}}
type: object
properties:
  spec:
    type: object
    properties:
      hosts:
        {{- include "weft.crd.strings" . | nindent 8 }}
      addresses:
        {{- include "weft.crd.strings" . | nindent 8 }}
      ports:
        type: array
        items:
          type: object
          properties:
            number:
              type: integer
            protocol:
              type: string
            name:
              type: string
            targetPort:
              type: integer
      location:
        type: string
        enum: [MESH_EXTERNAL, MESH_INTERNAL]
      resolution:
        type: string
        enum: [NONE, STATIC, DNS, DNS_ROUND_ROBIN]
      endpoints:
        {{- include "weft.crd.objects" . | nindent 8 }}
      workloadSelector:
        {{- include "weft.crd.selector" . | nindent 8 }}
      exportTo:
        {{- include "weft.crd.strings" . | nindent 8 }}
      subjectAltNames:
        {{- include "weft.crd.strings" . | nindent 8 }}
  {{- include "weft.crd.status" . | nindent 2 }}
{{- end }}

{{- define "weft.crd.route" -}}
type: object
properties:
  spec:
    type: object
    properties:
      parentRefs:
        {{- include "weft.crd.objects" . | nindent 8 }}
      hostnames:
        {{- include "weft.crd.strings" . | nindent 8 }}
      rules:
        {{- include "weft.crd.objects" . | nindent 8 }}
  {{- include "weft.crd.status" . | nindent 2 }}
{{- end }}
