{{- /* Seconds a pod drains after SIGTERM (scale-down, rollout, node drain): what the longest
answer it accepts takes at the slowest decode speed it sees, after the longest queue wait, plus a
margin: admission.maxQueueWaitSeconds + ceil(longest / drain.minDecodeTokensPerSecond) +
drain.marginSeconds. The longest answer: a request may ask for up to limits.maxTokens, and one
that asks for none runs to the model's context (vLLM: engine.vllm.maxModelLen), so the longer of
the two. gateway.drainTimeoutSeconds, when set, is used instead. The grace period and the
engine's preStop hold follow from it (deployment.yaml). */ -}}
{{- define "chatfleet.longestAnswerTokens" -}}
{{- $longest := int .Values.gateway.limits.maxTokens -}}
{{- if eq .Values.engine.kind "vllm" }}{{ $longest = max $longest (int .Values.engine.vllm.maxModelLen) }}{{ end -}}
{{- $longest -}}
{{- end }}

{{- define "chatfleet.drainNeededSeconds" -}}
{{- $gw := .Values.gateway -}}
{{- $longest := include "chatfleet.longestAnswerTokens" . | atoi -}}
{{- add (ceil $gw.admission.maxQueueWaitSeconds) (ceil (divf $longest $gw.drain.minDecodeTokensPerSecond)) (ceil $gw.drain.marginSeconds) -}}
{{- end }}

{{- define "chatfleet.drainSeconds" -}}
{{- $gw := .Values.gateway -}}
{{- if kindIs "invalid" $gw.drainTimeoutSeconds -}}
{{- include "chatfleet.drainNeededSeconds" . -}}
{{- else -}}
{{- ceil $gw.drainTimeoutSeconds | int -}}
{{- end -}}
{{- end }}

{{- /* The engine container's preStop: wait while the gateway (same pod) accepts connections,
then 5 s more (the gateway stops listening when its drain ends and gives open connections 5 s
before it exits: server.py), all within .seconds. python3 is in both engine images (vLLM's, and
the gateway's for engine-sim). */ -}}
{{- define "chatfleet.engineHold" -}}
import socket, time
end = time.monotonic() + {{ .seconds }}
while time.monotonic() < end:
    try:
        socket.create_connection(("127.0.0.1", {{ .port }}), timeout=1).close()
    except OSError:
        break
    time.sleep(1)
time.sleep(max(0.0, min(5.0, end - time.monotonic())))
{{- end }}
