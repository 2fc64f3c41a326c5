{{/* Names, labels and the pieces several templates share. */}}

{{- define "switchyard.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "switchyard.selectorLabels" . }}
{{- end -}}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "switchyard.scorerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: scorer
{{- end -}}

{{- define "switchyard.scorerName" -}}
{{- printf "%s-scorer" (include "switchyard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "switchyard.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "switchyard.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}

{{/* Where the policy ConfigMap is mounted, as a directory (the kubelet swaps it in place). */}}
{{- define "switchyard.policyPath" -}}
/etc/switchyard/policy/{{ .Values.policy.key }}
{{- end -}}

{{/* The Secret mount of a backend's credential. */}}
{{- define "switchyard.credentialDir" -}}
/etc/switchyard/credentials/{{ . }}
{{- end -}}

{{/* The backends of the values, or the default policy's two. */}}
{{- define "switchyard.backends" -}}
{{- if .Values.backends -}}
{{- toYaml .Values.backends -}}
{{- else -}}
small: {host: small-model.llm.svc.cluster.local, port: 8000}
large: {host: large-model.llm.svc.cluster.local, port: 8000}
{{- end -}}
{{- end -}}

{{/* Backends are sorted by name, so the rendered args do not depend on map order. */}}
{{- define "switchyard.renderArgs" -}}
{{- $backends := include "switchyard.backends" . | fromYaml }}
- --policy
- {{ include "switchyard.policyPath" . }}
- --listen
- 0.0.0.0:{{ .Values.envoy.port }}
- --ready
- 0.0.0.0:{{ .Values.envoy.probePort }}
- --admin
- 127.0.0.1:{{ .Values.envoy.adminPort }}
- --extproc
- 127.0.0.1:{{ .Values.switchyard.port }}
- --ca-file
- {{ .Values.caFile }}
{{- range $name := keys $backends | sortAlpha }}
{{- $b := index $backends $name }}
- --backend
- {{ printf "%s=%s:%v" $name $b.host $b.port }}
{{- if and $b.tls $b.tls.enabled }}
- --tls
- {{ if $b.tls.sni }}{{ printf "%s=%s" $name $b.tls.sni }}{{ else }}{{ $name }}{{ end }}
{{- end }}
{{- if $b.credential }}
- --credential
- {{ printf "%s=%s:%s/%s" $name (default "authorization" $b.credential.header) (include "switchyard.credentialDir" $name) $b.credential.key }}
{{- if $b.credential.prefix }}
- --credential-prefix
- {{ printf "%s=%s" $name $b.credential.prefix | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if not .Values.envoy.accessLog }}
- --no-access-log
{{- end }}
- --out
- /etc/envoy/envoy.yaml
{{- end -}}
