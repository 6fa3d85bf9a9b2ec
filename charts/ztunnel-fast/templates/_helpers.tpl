{{/*
Name of the DaemonSet and its ServiceAccount: Istio's `ztunnel.release-name`.  istioctl looks
for DaemonSet "ztunnel" and istiod trusts ServiceAccount <istio ns>/ztunnel by default.
*/}}
{{- define "ztunnel.release-name" -}}
{{- .Values.resourceName | default "ztunnel" -}}
{{- end }}

{{/* The container image: `image` as is when it names a registry path, else hub/image:tag[-variant]. */}}
{{- define "ztunnel.image" -}}
{{- if contains "/" .Values.image -}}
{{- .Values.image -}}
{{- else -}}
{{- printf "%s/%s:%s" .Values.hub (.Values.image | default "ztunnel-fast") (.Values.tag | default .Chart.AppVersion | toString) -}}
{{- with .Values.variant }}-{{ . }}{{ end -}}
{{- end -}}
{{- end }}

{{/* istiod's address for CA and xDS when caAddress/xdsAddress are empty. */}}
{{- define "ztunnel.istiod-address" -}}
{{- printf "istiod%s.%s.svc:15012" (ternary "" (printf "-%s" .Values.revision) (empty .Values.revision)) .Values.istioNamespace -}}
{{- end }}

{{/* Labels on every object (Istio's istio.labels plus app.kubernetes.io/name). */}}
{{- define "ztunnel.labels" -}}
app.kubernetes.io/name: ztunnel
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: istio
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
istio.io/rev: {{ .Values.revision | default "default" | quote }}
{{- end }}

{{/* Namespaced objects are rendered unless resourceScope is "cluster"; cluster-scoped unless "namespace". */}}
{{- define "ztunnel.namespaced" -}}
{{- if ne .Values.resourceScope "cluster" }}true{{ end -}}
{{- end }}
{{- define "ztunnel.cluster-scoped" -}}
{{- if ne .Values.resourceScope "namespace" }}true{{ end -}}
{{- end }}
