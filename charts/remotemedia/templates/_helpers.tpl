{{/* Names and labels shared by every template. */}}

{{- define "remotemedia.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: remotemedia.name (dict "root" $ "component" "operator"). */}}
{{- define "remotemedia.name" -}}
{{- printf "%s-%s" (include "remotemedia.fullname" .root | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "remotemedia.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: remotemedia
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* What selects one component's pods; stable across upgrades, so it never changes a selector. */}}
{{- define "remotemedia.selectorLabels" -}}
app.kubernetes.io/name: remotemedia-{{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "remotemedia.componentLabels" -}}
{{ include "remotemedia.labels" .root }}
{{ include "remotemedia.selectorLabels" . }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: remotemedia.image (dict "root" $ "image" .Values.operator.image). */}}
{{- define "remotemedia.image" -}}
{{- $registry := .root.Values.image.registry -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
A memory quantity in bytes, for the sidecar's budget check: plain bytes, or a number with one of
Kubernetes' binary (Ki … Ei) or decimal (k … E) suffixes. values.schema.json admits only those.
*/}}
{{- define "remotemedia.bytes" -}}
{{- $quantity := toString . -}}
{{- $number := regexFind "^[0-9]+" $quantity -}}
{{- $suffix := trimPrefix $number $quantity -}}
{{- $factors := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "E" 1000000000000000000 -}}
{{- if not (hasKey $factors $suffix) -}}
{{- fail (printf "failed to read the memory quantity %q: use bytes or a whole number with Ki, Mi, Gi, Ti, k, M, G or T" $quantity) -}}
{{- end -}}
{{- mul (int64 $number) (get $factors $suffix) -}}
{{- end -}}

{{- define "remotemedia.podSecurityContext" -}}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The container security context of the restricted Pod Security profile. */}}
{{- define "remotemedia.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
