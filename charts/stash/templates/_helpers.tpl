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

{{/*
The CA the API server trusts the webhook with in existingSecret mode: the operator maintains caBundle only
in selfSigned mode, so the chart writes it, from the value or from the Secret's CA key.
*/}}
{{- define "stash.existingSecretCaBundle" -}}
{{- $cert := .Values.webhook.certificate.existingSecret }}
{{- if $cert.caBundle }}
{{- $cert.caBundle }}
{{- else }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace $cert.name | default dict }}
{{- $ca := dig "data" $cert.caKey "" $secret }}
{{- if not $ca }}
{{- fail (printf "webhook.certificate.existingSecret: Secret %s/%s has no key %q, or could not be read (helm template and client-side dry runs see no cluster): create it first, or set webhook.certificate.existingSecret.caBundle" .Release.Namespace $cert.name $cert.caKey) }}
{{- end }}
{{- $ca }}
{{- end }}
{{- end }}
