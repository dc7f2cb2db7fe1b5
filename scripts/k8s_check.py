"""Offline checks of rendered Kubernetes manifests, used by scripts/k8s-validate.sh.

Runs with the Python of the kubernetes-validate virtualenv (it has PyYAML). Subcommands:

  split RENDER OUTDIR      write a `helm template` output as the kustomize base (one file per
                           service, one for the suite-wide objects)
  check NAME RENDER OUT    classify every object of RENDER: objects of built-in kinds go to OUT
                           (for `kubernetes-validate --strict`), the CRDs of the allow-list get a
                           structural check here, anything else fails; then the suite's rules
                           (security context, probes, secrets only from Secrets, the Scheduler's
                           replicas and partitions, PDBs, HPAs, default deny)
  observability ROOT       k8s/observability and the chart's copies say the same
  committed-secrets ROOT   every overlay's secretGenerator sources are git-ignored and untracked
                           (the dev overlay's are written by scripts/k8s-dev-secrets.sh)
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml

# Built-in kinds the suite uses, with the API version Kubernetes 1.30 serves them at. Anything
# else (a typo in apiVersion or kind, a CRD nobody listed) is an error, because
# kubernetes-validate only warns when it has no schema.
BUILTIN = {
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("batch/v1", "Job"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("networking.k8s.io/v1", "Ingress"),
}
# Custom resources (Prometheus Operator) have no schema in kubernetes-validate: checked here.
CRDS = {
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
# Settings that hold secrets: only ever from a Secret.
SECRET_SETTINGS = {
    "APP_DATABASE__URL",
    "APP_AUTH__SERVICE_TOKEN",
    "APP_AUTH__JWT_SECRET",
    "APP_MESSAGING__URL",
    "APP_DOWNSTREAM__SERVICE_TOKEN",
}
STATELESS = {"ingestion", "account", "package", "thirdparty", "drone", "delivery"}

# What an Ingress may route to the Supervisor: its dashboard (services/supervisor/src/dashboard.rs)
# — `/`, the login and logout forms, the two static assets, and the pages under /dashboard.
DASHBOARD_EXACT = {"/", "/login", "/logout", "/assets/app.css", "/assets/app.js"}
DASHBOARD_PREFIXES = ("/dashboard",)
# The dashboard must stay reachable through it.
DASHBOARD_NEEDED = ("/login", "/logout", "/dashboard", "/dashboard/sagas", "/assets/app.css")
# The Supervisor's paths that stay inside the cluster, probed against every routed path.
SUPERVISOR_INTERNAL = ("/api", "/api/overview", "/api/sagas", "/api/parked", "/api/audit",
                       "/metrics", "/readyz", "/healthz", "/openapi.json", "/docs")
# ingress-nginx annotations that route or rewrite paths other than the listed ones.
REROUTING_ANNOTATIONS = ("use-regex", "rewrite-target", "app-root", "server-snippet",
                         "configuration-snippet")
# The Supervisor runs at least this many replicas (sessions and read model are in its database).
SUPERVISOR_MIN_REPLICAS = 2


def prefix_covers(prefix, path):
    """Kubernetes `Prefix` matching: element-wise on `/`-separated segments."""
    p = prefix.rstrip("/")
    return p == "" or path == p or path.startswith(p + "/")


def path_routes(rule_path, path):
    """Whether an Ingress path sends `path` to its backend. `ImplementationSpecific` counts as
    a prefix (what ingress-nginx does without regex annotations)."""
    p = rule_path.get("path") or "/"
    if rule_path.get("pathType") == "Exact":
        return path == p
    return prefix_covers(p, path)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(obj):
    return (obj.get("metadata") or {}).get("name", "?")


def split(render, outdir):
    """Helm output → k8s/base/<service>.yaml (+ suite.yaml), stable order, no helm comments."""
    outdir = Path(outdir)
    groups = {}
    for obj in load_all(render):
        labels = (obj.get("metadata") or {}).get("labels") or {}
        svc = labels.get("app.kubernetes.io/name", "suite")
        groups.setdefault(svc, []).append(obj)
    order = ["ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet",
             "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "Ingress"]
    files = []
    for svc, objs in sorted(groups.items()):
        objs.sort(key=lambda o: (order.index(o["kind"]) if o["kind"] in order else 99, name_of(o)))
        path = outdir / f"{svc}.yaml"
        header = (
            "# GENERATED from helm/drone-delivery (default values) by `make k8s-base`; do not edit.\n"
            "# `make k8s-validate` fails when this file and the chart disagree.\n"
        )
        body = "---\n".join(yaml.safe_dump(o, sort_keys=False, width=100) for o in objs)
        path.write_text(header + "---\n" + body, encoding="utf-8")
        files.append(path.name)
    return files


class Checker:
    def __init__(self, name):
        self.name = name
        self.errors = []

    def fail(self, obj, msg):
        where = f"{obj['kind']}/{name_of(obj)}" if isinstance(obj, dict) else str(obj)
        self.errors.append(f"{self.name}: {where}: {msg}")

    # -- custom resources --------------------------------------------------------------------
    def prometheus_rule(self, obj):
        spec = obj.get("spec")
        if not isinstance(spec, dict) or set(spec) != {"groups"}:
            return self.fail(obj, "spec must have exactly `groups`")
        if not isinstance(spec["groups"], list) or not spec["groups"]:
            return self.fail(obj, "spec.groups must be a non-empty list")
        for g in spec["groups"]:
            extra = set(g) - {"name", "rules", "interval", "limit", "partial_response_strategy"}
            if extra or not isinstance(g.get("name"), str):
                self.fail(obj, f"group {g.get('name')!r}: needs a name, unknown keys {sorted(extra)}")
            for r in g.get("rules") or []:
                extra = set(r) - {"alert", "record", "expr", "for", "keep_firing_for", "labels",
                                  "annotations"}
                if extra:
                    self.fail(obj, f"rule {r.get('alert') or r.get('record')}: unknown keys {sorted(extra)}")
                if ("alert" in r) == ("record" in r):
                    self.fail(obj, f"rule {r}: exactly one of alert/record")
                if not isinstance(r.get("expr"), (str, int)) or str(r.get("expr")).strip() == "":
                    self.fail(obj, f"rule {r.get('alert')}: expr missing")
                if "alert" in r and "severity" not in (r.get("labels") or {}):
                    self.fail(obj, f"alert {r['alert']}: labels.severity missing")

    def service_monitor(self, obj):
        spec = obj.get("spec") or {}
        extra = set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel",
                             "targetLabels", "podTargetLabels", "sampleLimit"}
        if extra:
            self.fail(obj, f"unknown spec keys {sorted(extra)}")
        if not isinstance(spec.get("selector"), dict):
            self.fail(obj, "spec.selector missing")
        eps = spec.get("endpoints")
        if not isinstance(eps, list) or not eps:
            return self.fail(obj, "spec.endpoints must be a non-empty list")
        for ep in eps:
            extra = set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme",
                               "relabelings", "metricRelabelings", "honorLabels"}
            if extra or "port" not in ep:
                self.fail(obj, f"endpoint {ep}: needs port, unknown keys {sorted(extra)}")

    # -- the suite's rules -------------------------------------------------------------------
    def workload(self, obj, configmaps):
        pod = obj["spec"]["template"]["spec"]
        if pod.get("automountServiceAccountToken") is not False:
            self.fail(obj, "automountServiceAccountToken must be false")
        if not pod.get("serviceAccountName"):
            self.fail(obj, "serviceAccountName missing")
        if (pod.get("securityContext") or {}).get("runAsNonRoot") is not True:
            self.fail(obj, "pod securityContext.runAsNonRoot must be true")
        for c in pod.get("containers", []):
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                self.fail(obj, f"container {c['name']}: readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                self.fail(obj, f"container {c['name']}: allowPrivilegeEscalation must be false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                self.fail(obj, f"container {c['name']}: capabilities must drop ALL")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(kind) or {}):
                        self.fail(obj, f"container {c['name']}: resources.{kind}.{r} missing")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
                if got != path:
                    self.fail(obj, f"container {c['name']}: {probe} must GET {path}, has {got}")
            for e in c.get("env") or []:
                if (e["name"] in SECRET_SETTINGS or e["name"].startswith("APP_USERS__")) and "secretKeyRef" not in (e.get("valueFrom") or {}):
                    self.fail(obj, f"{e['name']} must come from a Secret (secretKeyRef)")
            for ref in c.get("envFrom") or []:
                cm = (ref.get("configMapRef") or {}).get("name")
                if cm is not None and cm not in configmaps:
                    self.fail(obj, f"envFrom ConfigMap {cm} is not rendered")

    def env_value(self, container, name, configmaps):
        """The literal value of an env var: a value, or the ConfigMap key it refers to."""
        for e in container.get("env") or []:
            if e["name"] != name:
                continue
            if "value" in e:
                return e["value"], "value"
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                cm = configmaps.get(ref["name"])
                if cm is None:
                    return None, f"ConfigMap {ref['name']} not rendered"
                return (cm.get("data") or {}).get(ref["key"]), f"{ref['name']}/{ref['key']}"
            field = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if field:
                return None, f"fieldRef:{field}"
        for ref in container.get("envFrom") or []:
            cm = configmaps.get((ref.get("configMapRef") or {}).get("name"))
            if cm and name in (cm.get("data") or {}):
                return cm["data"][name], f"{name_of(cm)} (envFrom)"
        return None, "unset"

    def scheduler(self, objs, configmaps):
        sts = [o for o in objs if o["kind"] == "StatefulSet"]
        if len(sts) != 1:
            return self.fail("StatefulSet", f"expected exactly one (the scheduler), found {len(sts)}")
        s = sts[0]
        replicas = s["spec"].get("replicas", 1)
        c = next((c for c in s["spec"]["template"]["spec"]["containers"] if c["name"] == "scheduler"), None)
        if c is None:
            return self.fail(s, "no container named scheduler")
        _, host_src = self.env_value(c, "HOSTNAME", configmaps)
        if host_src != "fieldRef:metadata.name":
            self.fail(s, f"HOSTNAME must come from the Downward API (metadata.name), is {host_src}")
        r_env, src = self.env_value(c, "APP_SCHEDULER__REPLICAS", configmaps)
        if str(r_env) != str(replicas):
            self.fail(s, f"APP_SCHEDULER__REPLICAS ({r_env}, {src}) != spec.replicas ({replicas})")
        p_sched, src_s = self.env_value(c, "APP_SCHEDULER__PARTITIONS", configmaps)
        ing = [o for o in objs if o["kind"] == "Deployment"
               and (o["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == "ingestion"]
        if len(ing) != 1:
            return self.fail("Deployment", "expected exactly one ingestion Deployment")
        ic = ing[0]["spec"]["template"]["spec"]["containers"][0]
        p_ing, src_i = self.env_value(ic, "APP_INGESTION__PARTITIONS", configmaps)
        if p_sched is None or str(p_sched) != str(p_ing):
            self.fail(s, f"partitions differ: scheduler {p_sched} ({src_s}), ingestion {p_ing} ({src_i})")
            return
        partitions = int(p_sched)
        sup = [o for o in objs if o["kind"] == "Deployment"
               and (o["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == "supervisor"]
        if len(sup) == 1:
            sc = sup[0]["spec"]["template"]["spec"]["containers"][0]
            got, src = self.env_value(sc, "APP_SCHEDULER__REPLICAS", configmaps)
            if str(got) != str(replicas):
                self.fail(sup[0], f"APP_SCHEDULER__REPLICAS ({got}, {src}) != scheduler replicas ({replicas})")
            got, src = self.env_value(sc, "APP_SUPERVISOR__PARTITIONS", configmaps)
            if str(got) != str(partitions):
                self.fail(sup[0], f"APP_SUPERVISOR__PARTITIONS ({got}, {src}) != partitions ({partitions})")
        dlv = [o for o in objs if o["kind"] == "Deployment"
               and (o["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == "delivery"]
        if len(dlv) == 1:
            dc = dlv[0]["spec"]["template"]["spec"]["containers"][0]
            got, src = self.env_value(dc, "APP_TRACKING__PARTITIONS", configmaps)
            if str(got) != str(partitions):
                self.fail(dlv[0], f"APP_TRACKING__PARTITIONS ({got}, {src}) != partitions ({partitions}): "
                                  "tracking events would land on other partitions than their bookings'")
        owners = {}
        for i in range(int(replicas)):
            for p in range(partitions):
                if p % int(replicas) == i:
                    owners.setdefault(p, []).append(i)
        if sorted(owners) != list(range(partitions)) or any(len(v) != 1 for v in owners.values()):
            self.fail(s, "partitions are not each owned exactly once")
        if int(replicas) > partitions:
            self.fail(s, f"{replicas} replicas for {partitions} partitions: some own nothing")
        print(f"  {self.name}: scheduler {replicas} replicas x {partitions} partitions "
              f"(from {src_s}), pod i owns p % {replicas} == i")

    def suite(self, objs):
        configmaps = {name_of(o): o for o in objs if o["kind"] == "ConfigMap"}
        for cm in configmaps.values():
            leaked = {k for k in (cm.get("data") or {})
                      if k in SECRET_SETTINGS or k.startswith("APP_USERS__")}
            if leaked:
                self.fail(cm, f"secret settings in a ConfigMap: {sorted(leaked)}")
        workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
        for w in workloads:
            self.workload(w, configmaps)
        for sa in (o for o in objs if o["kind"] == "ServiceAccount"):
            if sa.get("automountServiceAccountToken") is not False:
                self.fail(sa, "automountServiceAccountToken must be false")
        self.scheduler(objs, configmaps)
        pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
        hpas = {o["spec"]["scaleTargetRef"]["name"]: o for o in objs if o["kind"] == "HorizontalPodAutoscaler"}
        for w in workloads:
            sel = w["spec"]["selector"]["matchLabels"]
            if not any(p["spec"]["selector"].get("matchLabels") == sel for p in pdbs):
                self.fail(w, "no PodDisruptionBudget selects it")
            app = w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name")
            if w["kind"] == "StatefulSet" and name_of(w) in hpas:
                self.fail(w, "the scheduler must not be autoscaled (ownership follows replicas)")
            if app in STATELESS and name_of(w) not in hpas:
                self.fail(w, "stateless service without a HorizontalPodAutoscaler")
        self.supervisor_replicas(objs, pdbs, hpas)
        self.ingress(objs, configmaps)
        nps = [o for o in objs if o["kind"] == "NetworkPolicy"]
        if not any(set(n["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
                   and not n["spec"].get("ingress") and not n["spec"].get("egress") for n in nps):
            self.fail("NetworkPolicy", "no default-deny (Ingress+Egress, no rules) policy")

    def supervisor_replicas(self, objs, pdbs, hpas):
        """Two Supervisors at least, and a PDB that never lets every one of them go at once."""
        sup = [o for o in objs if o["kind"] == "Deployment"
               and (o["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == "supervisor"]
        if len(sup) != 1:
            return self.fail("Deployment", f"expected exactly one supervisor Deployment, found {len(sup)}")
        d = sup[0]
        hpa = hpas.get(name_of(d))
        if hpa is not None:
            replicas, src = int(hpa["spec"].get("minReplicas", 1)), f"HorizontalPodAutoscaler/{name_of(hpa)} minReplicas"
        else:
            replicas, src = int(d["spec"].get("replicas", 1)), "spec.replicas"
        if replicas < SUPERVISOR_MIN_REPLICAS:
            self.fail(d, f"the Supervisor must run at least {SUPERVISOR_MIN_REPLICAS} replicas "
                         f"({src} is {replicas})")
        sel = d["spec"]["selector"]["matchLabels"]
        for p in pdbs:
            if p["spec"]["selector"].get("matchLabels") != sel:
                continue
            spec = p["spec"]
            if "minAvailable" in spec:
                keeps = percent_of(spec["minAvailable"], replicas) >= 1
            else:
                keeps = percent_of(spec.get("maxUnavailable", 1), replicas) < replicas
            if not keeps:
                self.fail(p, f"lets all {replicas} Supervisor replicas be evicted at once")

    def ingress(self, objs, configmaps):
        """Only the dashboard reaches the Supervisor from outside, over TLS, with Secure cookies."""
        sup_services = {name_of(o) for o in objs if o["kind"] == "Service"
                        and (o["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == "supervisor"}
        sup = [o for o in objs if o["kind"] == "Deployment" and name_of(o) in sup_services]
        secure = None
        if sup:
            c = next((c for c in sup[0]["spec"]["template"]["spec"]["containers"]
                      if c["name"] == "supervisor"), None)
            if c is not None:
                secure, _ = self.env_value(c, "APP_SUPERVISOR__SECURE_COOKIES", configmaps)

        def to_supervisor(backend):
            return ((backend or {}).get("service") or {}).get("name") in sup_services

        for ing in (o for o in objs if o["kind"] == "Ingress"):
            spec = ing.get("spec") or {}
            if to_supervisor(spec.get("defaultBackend")):
                self.fail(ing, "defaultBackend is the Supervisor: every path of it would be exposed")
            routed = {}  # host -> the paths that reach the Supervisor
            for rule in spec.get("rules") or []:
                for path in (rule.get("http") or {}).get("paths") or []:
                    if to_supervisor(path.get("backend")):
                        routed.setdefault(rule.get("host", "*"), []).append(path)
            if not routed:
                continue
            annotations = (ing.get("metadata") or {}).get("annotations") or {}
            for key in annotations:
                if any(key.endswith("/" + a) for a in REROUTING_ANNOTATIONS):
                    self.fail(ing, f"annotation {key} may route other paths to the Supervisor")
            tls_hosts = set()
            for t in spec.get("tls") or []:
                tls_hosts.update(t.get("hosts") or ["*"])
            for host, paths in routed.items():
                for p in paths:
                    where = f"host {host} path {p.get('path')} ({p.get('pathType')})"
                    leaked = [x for x in SUPERVISOR_INTERNAL if path_routes(p, x)]
                    if p.get("pathType") not in ("Exact", "Prefix"):
                        self.fail(ing, f"{where}: only Exact or Prefix paths may reach the Supervisor")
                    elif leaked:
                        self.fail(ing, f"{where} exposes the Supervisor's {', '.join(leaked)}: "
                                       "only the dashboard may be routed")
                    elif not (p.get("path") in DASHBOARD_EXACT and p.get("pathType") == "Exact"
                              or any(prefix_covers(d, p.get("path") or "/") for d in DASHBOARD_PREFIXES)):
                        self.fail(ing, f"{where} is not a dashboard path (allowed: Exact "
                                       f"{sorted(DASHBOARD_EXACT)}, anything under {DASHBOARD_PREFIXES})")
                missing = [n for n in DASHBOARD_NEEDED if not any(path_routes(p, n) for p in paths)]
                if missing:
                    self.fail(ing, f"host {host}: the dashboard's {', '.join(missing)} not routed")
                if host not in tls_hosts and "*" not in tls_hosts:
                    self.fail(ing, f"host {host} serves the dashboard (passwords, session "
                                   "cookies) without TLS")
                elif str(secure).lower() != "true":
                    self.fail(ing, f"host {host} has TLS but the Supervisor's "
                                   f"APP_SUPERVISOR__SECURE_COOKIES is {secure!r}: cookies must be Secure")

    def check(self, render, out):
        objs = load_all(render)
        builtin, skipped = [], []
        for o in objs:
            key = (o.get("apiVersion"), o.get("kind"))
            if key in BUILTIN:
                builtin.append(o)
            elif key in CRDS:
                skipped.append(f"{key[1]}/{name_of(o)}")
                (self.prometheus_rule if key[1] == "PrometheusRule" else self.service_monitor)(o)
            else:
                self.fail(o, f"apiVersion/kind {key} is neither a Kubernetes 1.30 built-in nor an allowed CRD")
        Path(out).write_text("---\n".join(yaml.safe_dump(o, sort_keys=False) for o in builtin),
                             encoding="utf-8")
        if skipped:
            print(f"  {self.name}: no Kubernetes schema, structural check only (allow-list): "
                  + ", ".join(skipped))
        self.suite(objs)
        print(f"  {self.name}: {len(objs)} objects, {len(builtin)} for kubernetes-validate")
        return self.errors


def observability(root):
    root = Path(root)
    errors = []
    k8s_rules = yaml.safe_load((root / "k8s/observability/prometheus-rules.yaml").read_text())
    chart_rules = yaml.safe_load((root / "helm/drone-delivery/files/prometheus-rules.yaml").read_text())
    if k8s_rules["spec"] != chart_rules:
        errors.append("helm/drone-delivery/files/prometheus-rules.yaml differs from "
                      "k8s/observability/prometheus-rules.yaml (spec)")
    a = (root / "k8s/observability/grafana-dashboard.json").read_text()
    b = (root / "helm/drone-delivery/files/grafana-dashboard.json").read_text()
    if a != b:
        errors.append("helm/drone-delivery/files/grafana-dashboard.json differs from k8s/observability/")
    dash = json.loads(a)
    if not dash.get("panels") or not dash.get("uid"):
        errors.append("grafana-dashboard.json has no panels or uid")
    return errors


def percent_of(value, replicas):
    """A PDB's minAvailable/maxUnavailable as a pod count (percentages round up, as Kubernetes
    does)."""
    if isinstance(value, str) and value.endswith("%"):
        return -(-int(value[:-1]) * replicas // 100)
    return int(value)


def committed_secrets(root):
    """Every file an overlay's secretGenerator reads must be git-ignored and not tracked: the
    dev overlay's are generated at deploy time (scripts/k8s-dev-secrets.sh)."""
    root = Path(root)
    errors = []
    for kfile in sorted((root / "k8s/overlays").glob("*/kustomization.yaml")):
        k = yaml.safe_load(kfile.read_text()) or {}
        for gen in k.get("secretGenerator") or []:
            sources = list(gen.get("envs") or []) + list(gen.get("files") or [])
            if gen.get("literals"):
                errors.append(f"{kfile.relative_to(root)}: secretGenerator {gen.get('name')} has "
                              "literals: working values would be committed")
            for src in sources:
                src = src.split("=", 1)[-1]
                rel = (kfile.parent / src).resolve().relative_to(root.resolve())
                tracked = subprocess.run(["git", "-C", str(root), "ls-files", "--", str(rel)],
                                         capture_output=True, text=True)
                ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q",
                                          "--no-index", "--", str(rel)], capture_output=True)
                if tracked.returncode != 0 or ignored.returncode not in (0, 1):
                    errors.append(f"{rel}: git cannot tell whether it is committed "
                                  f"({(tracked.stderr or '').strip()})")
                elif tracked.stdout.strip():
                    errors.append(f"{rel} is committed: secret sources are generated at deploy "
                                  "time (scripts/k8s-dev-secrets.sh), never committed")
                elif ignored.returncode != 0:
                    errors.append(f"{rel} is not git-ignored: a generated secret could be committed")
    return errors


def main(argv):
    if len(argv) >= 3 and argv[1] == "split":
        print("\n".join(split(argv[2], argv[3])))
        return 0
    if len(argv) == 5 and argv[1] == "check":
        errors = Checker(argv[2]).check(argv[3], argv[4])
    elif len(argv) == 3 and argv[1] == "observability":
        errors = observability(argv[2])
    elif len(argv) == 3 and argv[1] == "committed-secrets":
        errors = committed_secrets(argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
