{{- /* With the operator on, the chart leaves the floor field (HPA minReplicas, ScaledObject
minReplicaCount) to it: the operator owns that one field by server-side apply, so neither Helm 4
(server-side apply) nor Helm 3 (three-way merge) ever fights it on upgrade. The chart's floor
goes to the operator as this annotation: it holds that floor until a policy enforces its own, and
starts its hysteresis there. docs/operations.md#who-owns-the-floor. */ -}}
{{- define "chatfleet.chartFloor" -}}
{{- if .Values.operator.enabled }}
annotations:
  chatfleet.io/chart-floor: {{ .Values.autoscaling.minReplicas | quote }}
{{- end }}
{{- end }}

{{- /* The namespaces the operator serves, as a JSON list: operator.watchNamespaces, else the
release namespace; [] (all, with a ClusterRole) only with operator.clusterWide, since a ClusterRole
lets it patch the floor of every HPA and ScaledObject in the cluster. */ -}}
{{- define "chatfleet.operatorNamespaces" -}}
{{- $op := .Values.operator -}}
{{- if and $op.clusterWide $op.watchNamespaces -}}
{{- fail "operator.clusterWide serves every namespace: leave operator.watchNamespaces empty, or set clusterWide: false" -}}
{{- end -}}
{{- if $op.clusterWide -}}[]{{- else -}}{{ default (list .Release.Namespace) $op.watchNamespaces | toJson }}{{- end -}}
{{- end }}
