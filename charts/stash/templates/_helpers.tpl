{{/*
Names are fixed, not prefixed with the release: the operator finds its Service, webhook configuration,
Lease and the ClusterRoles it binds by these names (and deploy/ uses the same ones).
*/}}

{{/* Helm's own labels, on every object the chart renders. */}}
{{- define "stash.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* The project's label (`kubectl get crd,clusterrole -l app.kubernetes.io/part-of=stash`) and Helm's. */}}
{{- define "stash.labels" -}}
app.kubernetes.io/part-of: stash
{{ include "stash.helmLabels" . }}
{{- end }}

{{- define "stash.serviceAccountName" -}}
{{- required "serviceAccount.name is required" .Values.serviceAccount.name }}
{{- end }}

{{- define "stash.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "stash.sidecarImage" -}}
{{- $repository := .Values.sidecarImage.repository | default .Values.image.repository }}
{{- printf "%s:%s" $repository (.Values.sidecarImage.tag | default .Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Where the serving certificate is mounted when the operator reads it from files. */}}
{{- define "stash.tlsDir" -}}/etc/stash/webhook{{- end }}

{{/* Where a ConfigMap holding the CA bundle is mounted in existingSecret mode. */}}
{{- define "stash.caDir" -}}/etc/stash/webhook-ca{{- end }}

{{/* The CA bundle file the operator publishes as caBundle in existingSecret mode. */}}
{{- define "stash.caBundleFile" -}}
{{- $cert := .Values.webhook.certificate.existingSecret }}
{{- $dir := ternary (include "stash.caDir" .) (include "stash.tlsDir" .) (ne $cert.caConfigMap "") }}
{{- printf "%s/%s" $dir $cert.caKey }}
{{- end }}
