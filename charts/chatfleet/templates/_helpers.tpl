{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "chatfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the Deployment, Service, HPA and the Prometheus job share it. */}}
{{- define "chatfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chatfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chatfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chatfleet.labels" -}}
helm.sh/chart: {{ include "chatfleet.chart" . }}
{{ include "chatfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatfleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "chatfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Engine slots the gateway admits: vLLM's max-num-seqs unless set explicitly. */}}
{{- define "chatfleet.engineSlots" -}}
{{- default .Values.engine.maxNumSeqs .Values.gateway.admission.engineSlots }}
{{- end }}

{{/* The model id clients send: vLLM's served name, or engine-sim's fixed id. */}}
{{- define "chatfleet.servedModel" -}}
{{- if eq .Values.engine.kind "sim" }}
{{- printf "chatfleet-sim/%s" .Values.engine.sim.profile }}
{{- else }}
{{- default .Values.engine.vllm.model .Values.engine.vllm.servedModelName }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is given, else repository:tag. */}}
{{- define "chatfleet.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{- define "chatfleet.gatewayImage" -}}
{{- $image := .Values.gateway.image -}}
{{- include "chatfleet.image" (dict "repository" $image.repository "digest" $image.digest "tag" (default .Chart.AppVersion $image.tag)) }}
{{- end }}

{{/* Name of the Secret holding the Hugging Face token, if any. */}}
{{- define "chatfleet.hfSecretName" -}}
{{- if .Values.engine.vllm.hfToken.existingSecret }}
{{- .Values.engine.vllm.hfToken.existingSecret }}
{{- else if .Values.engine.vllm.hfToken.value }}
{{- printf "%s-hf-token" (include "chatfleet.fullname" .) }}
{{- end }}
{{- end }}

{{- define "chatfleet.modelCacheClaim" -}}
{{- default (printf "%s-model-cache" (include "chatfleet.fullname" .)) .Values.engine.vllm.modelCache.existingClaim }}
{{- end }}

{{/* The operator's name: its Deployment, ServiceAccount, RBAC and peering object. */}}
{{- define "chatfleet.operatorName" -}}
{{- printf "%s-operator" (include "chatfleet.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* The operator pods' labels: apart from the gateway's, so the Service, PDB, NetworkPolicy and
ServiceMonitor never select them. */}}
{{- define "chatfleet.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "chatfleet.name" . | trunc 54 | trimSuffix "-" }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's image: its own if set, else the gateway image (which has `chatfleet operator`). */}}
{{- define "chatfleet.operatorImage" -}}
{{- $image := .Values.operator.image -}}
{{- if $image.repository }}
{{- include "chatfleet.image" (dict "repository" $image.repository "digest" $image.digest "tag" (default .Chart.AppVersion $image.tag)) }}
{{- else }}
{{- include "chatfleet.gatewayImage" . }}
{{- end }}
{{- end }}

{{/* The peering object's name (ClusterKopfPeering, or KopfPeering per watched namespace). */}}
{{- define "chatfleet.operatorPeering" -}}
{{- default (include "chatfleet.operatorName" .) .Values.operator.peering.name }}
{{- end }}

{{/* What the operator may do in a namespace it serves; nothing on Deployments, nothing else. */}}
{{- define "chatfleet.operatorNamespacedRules" -}}
# Its policies: watched by kopf, which also keeps a finalizer on each (so a policy's timer stops
# before the policy goes); the decision is written to the status.
- apiGroups: [chatfleet.io]
  resources: [chatfleetpolicies]
  verbs: [get, list, watch, patch]
- apiGroups: [chatfleet.io]
  resources: [chatfleetpolicies/status]
  verbs: [patch]
# The targets: read, and a server-side apply of spec.minReplicas / minReplicaCount only.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, patch]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, patch]
# Each decision and each problem as an Event on the policy (kopf creates them; never updates).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* The knowledge-base claim: the one named, or the chart's own. */}}
{{- define "chatfleet.kbClaim" -}}
{{- default (printf "%s-kb" (include "chatfleet.fullname" .)) .Values.knowledgeBase.local.persistence.existingClaim }}
{{- end }}

{{/* Refuse knowledge-base values the gateway would refuse at start (KnowledgeSettings), with the
fix, so a bad install fails here and not as a crash loop. The schema cannot say these. */}}
{{- define "chatfleet.validateKnowledgeBase" -}}
{{- $kb := .Values.knowledgeBase -}}
{{- if and (eq $kb.store "pgvector") (not $kb.pgvector.existingSecret) }}
{{- fail (printf "knowledgeBase.store is pgvector but knowledgeBase.pgvector.existingSecret is empty: create a Secret holding the DSN (kubectl create secret generic chatfleet-pg --from-literal=%s=postgresql://USER:PASSWORD@HOST:5432/DB) and set knowledgeBase.pgvector.existingSecret=chatfleet-pg" $kb.pgvector.secretKey) }}
{{- end }}
{{- if ge (int $kb.chunkOverlap) (int $kb.chunkSize) }}
{{- fail (printf "knowledgeBase.chunkOverlap (%d) must be smaller than knowledgeBase.chunkSize (%d)" (int $kb.chunkOverlap) (int $kb.chunkSize)) }}
{{- end }}
{{- if and $kb.embeddings.url (not $kb.embeddings.model) }}
{{- fail "knowledgeBase.embeddings.url is set but knowledgeBase.embeddings.model is empty: set it to the embedding model the endpoint serves" }}
{{- end }}
{{- end }}

{{/* Refuse auth values the gateway would refuse at start (Settings), with the fix. */}}
{{- define "chatfleet.validateAuth" -}}
{{- $auth := .Values.auth -}}
{{- if and (gt (float64 $auth.rateLimit.requestsPerSecond) 0.0) (not $auth.existingSecret) }}
{{- fail (printf "auth.rateLimit.requestsPerSecond is set but auth.existingSecret is empty: the limit counts requests per API key; create a Secret holding the keys (kubectl create secret generic chatfleet-api-keys --from-literal=%s=KEY1,KEY2) and set auth.existingSecret=chatfleet-api-keys, or set auth.rateLimit.requestsPerSecond=0" $auth.secretKey) }}
{{- end }}
{{- end }}

{{/* The most gateway pods that can run at once: replicaCount without an autoscaler, else maxReplicas. */}}
{{- define "chatfleet.maxPods" -}}
{{- if eq .Values.autoscaling.mode "none" }}
{{- .Values.replicaCount | int }}
{{- else }}
{{- .Values.autoscaling.maxReplicas | int }}
{{- end }}
{{- end }}

{{/* Millicores of a CPU quantity (2, 1.5, "2", "1500m"); 0 for none or one it cannot read. */}}
{{- define "chatfleet.cpuMillis" -}}
{{- $q := toString (default "" .) -}}
{{- if hasSuffix "m" $q }}
{{- trimSuffix "m" $q | int }}
{{- else }}
{{- mulf (float64 $q) 1000 | ceil | int }}
{{- end }}
{{- end }}

{{/* A CPU quantity as a count of cores, or fail saying which value to fix. */}}
{{- define "chatfleet.gatewayCpuCores" -}}
{{- $millis := include "chatfleet.cpuMillis" .cpu | int }}
{{- if le $millis 0 }}
{{- fail (printf "%s (%v) is no CPU quantity the chart can count cores in: give it as cores (2) or millicores (1500m)" .name .cpu) }}
{{- end }}
{{- divf $millis 1000 }}
{{- end }}

{{/* The gateway's worker processes: gateway.workers, or with auto what the gateway's own auto
would take from a CPU limit (its whole cores, at least 1), else one per core of the CPU request
(rounded up), else 2. The chart resolves auto itself: it sets no CPU limit by default, and the
gateway's auto would then see the whole node. */}}
{{- define "chatfleet.gatewayWorkers" -}}
{{- $gw := .Values.gateway -}}
{{- if eq (toString $gw.workers) "auto" }}
{{- $workers := 2 }}
{{- with dig "limits" "cpu" "" $gw.resources }}
{{- $workers = include "chatfleet.gatewayCpuCores" (dict "cpu" . "name" "gateway.resources.limits.cpu") | float64 | floor | int | max 1 }}
{{- else }}
{{- with dig "requests" "cpu" "" $gw.resources }}
{{- $workers = include "chatfleet.gatewayCpuCores" (dict "cpu" . "name" "gateway.resources.requests.cpu") | float64 | ceil | int }}
{{- end }}
{{- end }}
{{- if gt $workers 64 }}
{{- fail (printf "gateway.workers is auto and the gateway's CPU makes %d workers, more than the 64 a pod may run: set gateway.workers to a number (docs/operations.md#gateway-workers sizes it)" $workers) }}
{{- end }}
{{- $workers }}
{{- else }}
{{- $gw.workers | int }}
{{- end }}
{{- end }}

{{/* The gateway container's resources: gateway.resources, completed from the workers. CPU: the
request given, else one core per worker (a worker is one event loop), never above a given limit;
no limit unless given. Memory: neither given, 256Mi per worker plus 256Mi for the supervisor as
the request and twice that as the limit; one given, the other equal to it. Ephemeral storage:
a request of tmpSize (the pod's /tmp emptyDir) unless given. */}}
{{- define "chatfleet.gatewayResources" -}}
{{- $workers := include "chatfleet.gatewayWorkers" . | int -}}
{{- $given := .Values.gateway.resources -}}
{{- $requests := deepCopy (default dict $given.requests) -}}
{{- $limits := deepCopy (default dict $given.limits) -}}
{{- if not $requests.cpu }}
{{- $_ := set $requests "cpu" (toString $workers) }}
{{- end }}
{{- with $limits.cpu }}
{{- $limitCores := include "chatfleet.gatewayCpuCores" (dict "cpu" . "name" "gateway.resources.limits.cpu") | float64 }}
{{- if lt $limitCores (float64 $workers) }}
{{- if ne (toString $.Values.gateway.workers) "auto" }}
{{- fail (printf "gateway.resources.limits.cpu (%v) is below gateway.workers (%d) cores: each worker is an event loop that may use a whole core, and a CPU limit under that throttles them all (stalled streams). Raise the limit to %d, remove it, or lower gateway.workers" . $workers $workers) }}
{{- end }}
{{- if not (dig "requests" "cpu" "" $given) }}
{{- $_ := set $requests "cpu" . }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (hasKey $requests "ephemeral-storage") }}
{{- $_ := set $requests "ephemeral-storage" .Values.tmpSize }}
{{- end }}
{{- if and (not $requests.memory) (not $limits.memory) }}
{{- $_ := set $requests "memory" (printf "%dMi" (mul 256 (add1 $workers))) }}
{{- $_ := set $limits "memory" (printf "%dMi" (mul 512 (add1 $workers))) }}
{{- else if not $requests.memory }}
{{- $_ := set $requests "memory" $limits.memory }}
{{- else if not $limits.memory }}
{{- $_ := set $limits "memory" $requests.memory }}
{{- end }}
{{- toYaml (dict "requests" $requests "limits" $limits) }}
{{- end }}

{{/* Refuse admission values the gateway would refuse at start (AdmissionSettings), with the fix. */}}
{{- define "chatfleet.validateAdmission" -}}
{{- $reserved := .Values.gateway.admission.interactiveReservedSlots -}}
{{- $slots := include "chatfleet.engineSlots" . | int -}}
{{- if and (not (kindIs "invalid" $reserved)) (ge (int $reserved) $slots) }}
{{- fail (printf "gateway.admission.interactiveReservedSlots (%d) must be smaller than the engine slots (%d: gateway.admission.engineSlots, else engine.maxNumSeqs), or batch requests could never run: lower it" (int $reserved) $slots) }}
{{- end }}
{{- end }}

{{/* routing.mode inferencepool: the InferencePool is named like the release's gateway objects;
the endpoint picker's Deployment, Service, ServiceAccount and RBAC share <fullname>-epp. */}}
{{- define "chatfleet.eppName" -}}
{{- printf "%s-epp" (include "chatfleet.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{/* The picker pods' labels: apart from the gateway's, so no gateway selector (nor the
InferencePool) picks them up. */}}
{{- define "chatfleet.eppSelectorLabels" -}}
app.kubernetes.io/name: {{ include "chatfleet.name" . | trunc 59 | trimSuffix "-" }}-epp
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The InferencePool's selector: the gateway pods' selector labels and their component, so
neither the helm test pod (component test) nor any other release pod joins the pool. */}}
{{- define "chatfleet.poolSelectorLabels" -}}
{{ include "chatfleet.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/* The Deployment's spec.replicas. Without an autoscaler: replicaCount. With one: nothing on a
fresh install (the HPA or KEDA owns the count), but the live Deployment's count while it exists:
switching autoscaling.mode from none to hpa/keda would otherwise drop the field the last release
set, and the API server would default it to 1 (Helm 3's three-way merge deletes it; Helm 4's
server-side apply removes a field its manager stops applying) until the new HPA scales back up.
Rendering the live count changes nothing, and leaves nothing for a later release to remove.
`helm template` and the k8s/ manifests cannot look it up and leave the field out. */}}
{{- define "chatfleet.deploymentReplicas" -}}
{{- if eq .Values.autoscaling.mode "none" }}
{{- .Values.replicaCount }}
{{- else }}
{{- with lookup "apps/v1" "Deployment" .Release.Namespace (include "chatfleet.fullname" .) }}
{{- dig "spec" "replicas" "" . }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when the chart itself creates the Hugging Face token Secret (hfToken.value). */}}
{{- define "chatfleet.hfSecretCreated" -}}
{{- if and (eq .Values.engine.kind "vllm") .Values.engine.vllm.hfToken.value (not .Values.engine.vllm.hfToken.existingSecret) }}true{{ end }}
{{- end }}

{{/* Refuse storage that cannot work with the pods that may run, with the values that fix it, so
`helm install` fails here instead of reporting success over Pending pods or split data:
- a local knowledge base with more than one pod (each its own knowledge bases), unless
  knowledgeBase.local.perPodStores says that is intended (then never on one shared claim);
- a chart-made ReadWriteMany model cache on the default StorageClass (ReadWriteOnce on most
  clusters: the claim never binds), or a claim that is not ReadWriteMany with more than one pod. */}}
{{- define "chatfleet.validateStorage" -}}
{{- $maxPods := include "chatfleet.maxPods" . | int -}}
{{- $podsValue := ternary "replicaCount" "autoscaling.maxReplicas" (eq .Values.autoscaling.mode "none") -}}
{{- $kb := .Values.knowledgeBase -}}
{{- if and (eq $kb.store "local") (gt $maxPods 1) }}
{{- if not $kb.local.perPodStores }}
{{- fail (printf "knowledgeBase.store is local but up to %d gateway pods may run (%s=%d): each pod would keep its own separate knowledge bases, and a document uploaded through one pod would be invisible to the others. Keep them in PostgreSQL with pgvector, shared by every pod (kubectl create secret generic chatfleet-pg --from-literal=%s=postgresql://USER:PASSWORD@HOST:5432/DB, then set knowledgeBase.store=pgvector and knowledgeBase.pgvector.existingSecret=chatfleet-pg); or run one pod (%s=1); or, for a fleet that never uploads documents, set knowledgeBase.local.perPodStores=true and knowledgeBase.local.persistence.enabled=false" $maxPods $podsValue $maxPods $kb.pgvector.secretKey $podsValue) }}
{{- else if $kb.local.persistence.enabled }}
{{- fail (printf "knowledgeBase.local.perPodStores is true but so is knowledgeBase.local.persistence.enabled: up to %d pods would share one claim, which a ReadWriteOnce volume cannot do across nodes and which gives no pod the others' indexes. Set knowledgeBase.local.persistence.enabled=false (an emptyDir per pod), or knowledgeBase.store=pgvector" $maxPods) }}
{{- end }}
{{- end }}
{{- $cache := .Values.engine.vllm.modelCache -}}
{{- if and (eq .Values.engine.kind "vllm") $cache.enabled (not $cache.existingClaim) }}
{{- if and (has "ReadWriteMany" $cache.accessModes) (not $cache.storageClassName) }}
{{- fail "engine.vllm.modelCache asks for a ReadWriteMany claim of the cluster's default StorageClass, which provides only ReadWriteOnce on most clusters: the claim would never bind and the pods would stay Pending. Set engine.vllm.modelCache.storageClassName to a class that provides ReadWriteMany (NFS, EFS, Filestore, CephFS...), or engine.vllm.modelCache.existingClaim to a claim you made, or engine.vllm.modelCache.enabled=false (each pod downloads the model into its own emptyDir)" }}
{{- else if and (not (has "ReadWriteMany" $cache.accessModes)) (gt $maxPods 1) }}
{{- fail (printf "engine.vllm.modelCache.accessModes is %v but up to %d pods may run (%s=%d): a claim that is not ReadWriteMany attaches to one node, and pods on the others would stay Pending. Set engine.vllm.modelCache.accessModes=[ReadWriteMany] with a storageClassName that provides it, or an existingClaim, or engine.vllm.modelCache.enabled=false" $cache.accessModes $maxPods $podsValue $maxPods) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The helm test pod's labels: the release's, but a name of its own, so no selector of the
gateway (Deployment, Service, PodDisruptionBudget, NetworkPolicy, InferencePool) matches it. */}}
{{- define "chatfleet.testLabels" -}}
helm.sh/chart: {{ include "chatfleet.chart" . }}
app.kubernetes.io/name: {{ include "chatfleet.name" . | trunc 58 | trimSuffix "-" }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatfleet
app.kubernetes.io/component: test
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}
