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

{{- define "switchyard.metaLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "switchyard.labels" -}}
{{ include "switchyard.metaLabels" . }}
{{ include "switchyard.selectorLabels" . }}
{{- end -}}

{{/* The metrics Service's own labels (the ServiceMonitor selects it by them); it selects the gateway pods. */}}
{{- define "switchyard.metricsLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: metrics
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

{{/* The headless Service of the scrape targets. */}}
{{- define "switchyard.metricsName" -}}
{{- printf "%s-metrics" (include "switchyard.fullname" .) | trunc 63 | trimSuffix "-" -}}
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

{{/*
Where switchyard serves ext_proc, and where Envoy's ext_proc cluster points: the pod's loopback,
since Envoy is in the same pod. The one declaration `serve --listen`, `envoy render --extproc`
and switchyard's probes use; nothing outside the pod can reach it (no containerPort names it).
*/}}
{{- define "switchyard.extprocAddress" -}}
127.0.0.1:{{ .Values.switchyard.port }}
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
- {{ include "switchyard.extprocAddress" . }}
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
{{- if .Values.envoy.failOpen }}
- --fail-open
{{- end }}
- --out
- /etc/envoy/envoy.yaml
{{- end -}}

{{/*
Where the scorer TLS Secret (scorer.tls.secretName: tls.crt, tls.key, ca.crt) is mounted, in
the scorer pods and in the switchyard container (a policy's `remote.tls` names these files).
*/}}
{{- define "switchyard.scorerTlsDir" -}}
/etc/switchyard/scorer-tls
{{- end }}

{{/*
A probe that runs inside the container: it asks the gRPC health service at `target` (status 1 is
SERVING). For a server the kubelet cannot reach (switchyard on loopback) or cannot speak to
(the scorer over mutual TLS). Takes a dict: target, and for mutual TLS `tlsDir` (ca.crt,
tls.crt, tls.key) and `serverName` (the certificate's name).
*/}}
{{- define "switchyard.grpcHealthExec" -}}
exec:
  command:
  - python
  - -c
  - >-
    import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g;
    {{- if .tlsDir }}
    r = lambda f: open("{{ .tlsDir }}/" + f, "rb").read();
    c = grpc.secure_channel("{{ .target }}",
    grpc.ssl_channel_credentials(r("ca.crt"), r("tls.key"), r("tls.crt")), options=[("grpc.ssl_target_name_override", "{{ .serverName }}")]);
    {{- else }}
    c = grpc.insecure_channel("{{ .target }}");
    {{- end }}
    sys.exit(g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=4).status != 1)
timeoutSeconds: 5
{{- end }}

{{/* switchyard's probe action: its health over the pod's loopback, from inside the container. */}}
{{- define "switchyard.probe" -}}
{{- include "switchyard.grpcHealthExec" (dict "target" (include "switchyard.extprocAddress" .)) }}
{{- end }}

{{/*
The scorer's probe action. Plaintext: the kubelet's gRPC probe. TLS: the kubelet's gRPC probe
cannot do TLS, so the pod asks its own health service over mutual TLS with the mounted files,
naming the Service as the certificate's name.
*/}}
{{- define "switchyard.scorerProbe" -}}
{{- $s := .Values.scorer -}}
{{- if $s.tls.secretName -}}
{{- include "switchyard.grpcHealthExec" (dict "target" (printf "127.0.0.1:%v" $s.port) "tlsDir" (include "switchyard.scorerTlsDir" .)
      "serverName" (printf "%s.%s.svc.cluster.local" (include "switchyard.scorerName" .) .Release.Namespace)) }}
{{- else -}}
grpc: {port: {{ $s.port }}}
{{- end }}
{{- end }}
