{{/* The chart name, trimmed to a DNS label. */}}
{{- define "finetune-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, prefixed with the chart name unless it holds it. */}}
{{- define "finetune-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* `finetune operator` flags; the operator's CLI is the contract (see docs/install.md). */}}
{{- define "finetune-operator.args" -}}
- operator
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
- --health-port={{ .Values.health.port }}
- --metrics-port={{ .Values.metrics.port }}
- --log-format={{ .Values.logFormat }}
{{- end }}

{{/*
What the operator does with the API, verb by verb; the same rules go into a Role per watched
namespace or into one ClusterRole. No wildcards. Deliberately absent:
  - namespaces: kopf lists them only to resolve glob patterns in namespaced mode; the chart passes
    exact names, and with --all-namespaces kopf never reads them.
  - customresourcedefinitions: kopf finds resources through API discovery (no RBAC needed); the
    CRD watch only notices CRDs installed after it started (it logs a warning and goes on without).
    Install KubeRay first, or restart the operator after installing it.
  - secrets: none at all. The operator never reads a Secret: a job's credentials reach its pods as
    secretKeyRef, and its progress comes through the job's ConfigMap (docs/security.md).
  - rayclusters: KubeRay owns them; the operator reads only its RayJobs' status.
  - update on finetunejobs (and get/update on their status): kopf and the handlers only patch.
  - kopfpeerings: --standalone.
  - ingresses list/watch/patch/delete: a job's dashboard Ingress (spec.cluster.dashboard.ingress)
    is got by its deterministic name or created, never changed, and Kubernetes' garbage collector
    deletes it with the FineTuneJob that owns it. The same for networkpolicies (the job's
    NetworkPolicy), granted only with networkPolicy.enabled, and for the job's progress objects
    (ServiceAccount, ConfigMap, Role, RoleBinding: trainer_access.py). configmaps `patch` is there
    only because RBAC lets nobody grant a right it lacks: the job's Role may patch its one ConfigMap.
*/}}
{{- define "finetune-operator.rules" -}}
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  verbs: ["get", "create"]
{{- if .Values.networkPolicy.enabled }}
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
{{- end }}
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
{{- end }}
