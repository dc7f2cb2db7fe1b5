{{/*
Facts about the services that are not configuration: port, whether it uses the broker (Delivery
publishes its tracking events, Account its account changes), whether it calls the domain services (Drone calls only Delivery,
see the drone-egress policy), whether it verifies/mints client JWTs. Ports are the services'
defaults (DESIGN §3).
*/}}
{{- define "dd.services" -}}
ingestion:  {port: 8080, messaging: true,  downstream: false, jwt: true,  component: api}
account:    {port: 8081, messaging: true,  downstream: false, jwt: true,  component: domain}
package:    {port: 8082, messaging: false, downstream: false, jwt: false, component: domain}
thirdparty: {port: 8087, messaging: false, downstream: false, jwt: false, component: domain}
drone:      {port: 8083, messaging: false, downstream: false, jwt: false, component: domain}
delivery:   {port: 8084, messaging: true,  downstream: false, jwt: false, component: domain}
scheduler:  {port: 8085, messaging: true,  downstream: true,  jwt: false, component: workflow}
supervisor: {port: 8086, messaging: true,  downstream: true,  jwt: false, component: operations}
{{- end -}}

{{/* Services run as Deployments, in a stable order. */}}
{{- define "dd.deployments" -}}
[ingestion, account, package, thirdparty, drone, delivery, supervisor]
{{- end -}}

{{/* The domain services, which only the Scheduler and the Supervisor may call. */}}
{{- define "dd.domain" -}}
[account, package, thirdparty, drone, delivery]
{{- end -}}

{{/*
The Supervisor's paths the Ingress routes: the dashboard only (services/supervisor/src/
dashboard.rs): `/` (redirects to /dashboard), the login and logout forms, the pages and their
JSON under /dashboard, the two static assets. Exact where the dashboard has one path, Prefix
only for /dashboard, whose pages take ids.
*/}}
{{- define "dd.dashboardPaths" -}}
- {path: /, pathType: Exact}
- {path: /login, pathType: Exact}
- {path: /logout, pathType: Exact}
- {path: /dashboard, pathType: Prefix}
- {path: /assets/app.css, pathType: Exact}
- {path: /assets/app.js, pathType: Exact}
{{- end -}}

{{/* Object name of a service: `dd.name (list $ "scheduler")`. */}}
{{- define "dd.name" -}}
{{- $root := index . 0 -}}
{{- printf "%s%s" $root.Values.namePrefix (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dd.partitioningName" -}}
{{- printf "%spartitioning" .Values.namePrefix -}}
{{- end -}}

{{- define "dd.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/part-of: drone-delivery
{{- end -}}

{{- define "dd.labels" -}}
{{- $root := index . 0 -}}
{{ include "dd.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Values.image.tag | quote }}
app.kubernetes.io/component: {{ (index (include "dd.services" $root | fromYaml) (index . 1)).component }}
{{- end -}}

{{/* Labels of objects that belong to the suite as a whole. */}}
{{- define "dd.commonLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: drone-delivery
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
{{- end -}}

{{/*
The environment of a service's container: non-secret settings come from its ConfigMap
(envFrom), secrets one key at a time from the Secret, the partition count from the one
partitioning ConfigMap both Ingestion and the Scheduler read.
*/}}
{{- define "dd.secretEnv" -}}
{{- $root := index . 0 -}}
{{- $svc := index . 1 -}}
{{- $facts := index (include "dd.services" $root | fromYaml) $svc -}}
- name: APP_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.secrets.name }}
      key: {{ $svc }}-database-url
- name: APP_AUTH__SERVICE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.secrets.name }}
      key: service-token
{{- if $facts.jwt }}
- name: APP_AUTH__JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.secrets.name }}
      key: jwt-secret
{{- end }}
{{- if $facts.messaging }}
- name: APP_MESSAGING__URL
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.secrets.name }}
      key: amqp-url
{{- end }}
{{- end -}}

{{/* The pod template shared by the Deployments and the StatefulSet. */}}
{{- define "dd.podTemplate" -}}
{{- $root := index . 0 -}}
{{- $svc := index . 1 -}}
{{- $extraEnv := index . 2 -}}
{{- $facts := index (include "dd.services" $root | fromYaml) $svc -}}
{{- $values := index $root.Values $svc -}}
metadata:
  labels:
    {{- include "dd.labels" (list $root $svc) | nindent 4 }}
  annotations:
    kubectl.kubernetes.io/default-container: {{ $svc }}
    {{- if not $root.Values.kustomizeBase }}
    checksum/config: {{ include (print $root.Template.BasePath "/configmaps.yaml") $root | sha256sum }}
    {{- if $root.Values.secrets.create }}
    checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
    {{- end }}
    {{- end }}
spec:
  serviceAccountName: {{ include "dd.name" (list $root $svc) }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: 30
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    fsGroup: 65532
    seccompProfile:
      type: RuntimeDefault
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "dd.selectorLabels" (list $root $svc) | nindent 10 }}
  containers:
    - name: {{ $svc }}
      image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["/usr/local/bin/{{ $svc }}"]
      ports:
        - name: http
          containerPort: {{ $facts.port }}
          protocol: TCP
      envFrom:
        - configMapRef:
            name: {{ include "dd.name" (list $root $svc) }}-config
        {{- if eq $svc "supervisor" }}
        # Dashboard users: APP_USERS__<NAME>__ROLE and APP_USERS__<NAME>__PASSWORD_HASH (argon2).
        - secretRef:
            name: {{ $root.Values.secrets.supervisorUsersName }}
        {{- end }}
      env:
        {{- include "dd.secretEnv" (list $root $svc) | nindent 8 }}
        {{- with $extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      # Migrations run before the listener binds: the startup probe gives them time.
      startupProbe:
        httpGet: {path: /healthz, port: http}
        periodSeconds: 5
        failureThreshold: 60
      livenessProbe:
        httpGet: {path: /healthz, port: http}
        periodSeconds: 10
        timeoutSeconds: 3
        failureThreshold: 3
      readinessProbe:
        httpGet: {path: /readyz, port: http}
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 2
      resources:
        {{- toYaml $values.resources | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        runAsNonRoot: true
        capabilities:
          drop: [ALL]
      volumeMounts:
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
{{- end -}}
