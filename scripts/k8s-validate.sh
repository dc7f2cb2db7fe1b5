#!/usr/bin/env bash
# Renders every way the suite is deployed and validates each object offline:
#   kubectl kustomize k8s/overlays/{dev,prod}; helm template with the default values and with
#   values-prod.yaml; `kubernetes-validate --strict` against Kubernetes 1.30 for built-in kinds,
#   a structural check for the allowed CRDs (PrometheusRule, ServiceMonitor), the suite's own
#   rules (scripts/k8s_check.py: among them, only the dashboard of the Supervisor behind the
#   Ingress, over TLS with Secure cookies, and at least two Supervisors under a PDB),
#   `helm lint --strict`, that k8s/base is what the chart renders, and that no overlay's Secret
#   source is committed. The dev overlay is rendered from a copy whose Secret sources
#   scripts/k8s-dev-secrets.sh fills with throwaway values (a checkout has none).
#
#   scripts/k8s-validate.sh               validate (then run the self-test)
#   scripts/k8s-validate.sh --self-test   only prove that broken manifests and values fail
#   scripts/k8s-validate.sh --update-base regenerate k8s/base from the chart (`make k8s-base`)
#
# Tools come from scripts/k8s-tools.sh (cached in target/k8s-tools); nothing is downloaded after.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="${K8S_TOOLS_DIR:-$ROOT/target/k8s-tools}"
KUBE_VERSION="1.30.0"
OUT="$ROOT/target/k8s-rendered"

log() { printf '[k8s-validate] %s\n' "$*"; }

bash "$ROOT/scripts/k8s-tools.sh"
HELM="$TOOLS/bin/helm"
KUBECTL="$TOOLS/bin/kubectl"
KV="$TOOLS/venv/bin/kubernetes-validate"
PY="$TOOLS/venv/bin/python"
# No tool may reach the network from here on: helm keeps its state under the cache, and there
# is no repository to update.
export HELM_CACHE_HOME="$TOOLS/helm/cache" HELM_CONFIG_HOME="$TOOLS/helm/config" \
  HELM_DATA_HOME="$TOOLS/helm/data"

# render_base CHART_DIR OUTDIR: the kustomize base is the chart rendered with default values.
render_base() {
  local chart="$1" dir="$2" tmp
  tmp="$(mktemp)"
  "$HELM" template drone-delivery "$chart" --set kustomizeBase=true >"$tmp"
  rm -f "$dir"/*.yaml.new
  mkdir -p "$dir"
  local files
  files="$("$PY" "$ROOT/scripts/k8s_check.py" split "$tmp" "$dir")"
  rm -f "$tmp"
  echo "$files"
}

# validate NAME RENDERED_FILE: every object checked; non-zero on any problem.
validate() {
  local name="$1" file="$2" builtin="$2.builtin.yaml" kv_out
  "$PY" "$ROOT/scripts/k8s_check.py" check "$name" "$file" "$builtin" || return 1
  # kubernetes-validate exits 0 on a kind it has no schema for (it only warns): fail on warnings.
  if ! kv_out="$("$KV" --strict --quiet -k "$KUBE_VERSION" "$builtin" 2>&1)"; then
    printf '%s\n' "$kv_out" >&2
    return 1
  fi
  if [ -n "$kv_out" ]; then
    printf '%s\n' "$kv_out" >&2
    return 1
  fi
  log "$name: every object valid against Kubernetes $KUBE_VERSION (strict)"
}

# prepare_k8s SRC DEST: a copy of k8s/ whose dev overlay has throwaway Secret sources (the real
# ones are generated at deploy time and git-ignored; any a developer has are left out, so no
# working credential lands in the rendered files under target/).
prepare_k8s() {
  local src="$1" dest="$2"
  rm -rf "$dest"
  cp -r "$src" "$dest"
  rm -f "$dest"/overlays/dev/*.env
  bash "$ROOT/scripts/k8s-dev-secrets.sh" --dir "$dest/overlays/dev" --force --quiet
}

# render_all K8S_DIR CHART_DIR DEST: the four renderings.
render_all() {
  local k8s="$1" chart="$2" dest="$3"
  mkdir -p "$dest"
  "$KUBECTL" kustomize "$k8s/overlays/dev" >"$dest/kustomize-dev.yaml"
  "$KUBECTL" kustomize "$k8s/overlays/prod" >"$dest/kustomize-prod.yaml"
  "$HELM" template drone-delivery "$chart" --namespace drone-delivery >"$dest/helm-default.yaml"
  "$HELM" template drone-delivery "$chart" --namespace drone-delivery \
    -f "$chart/values-prod.yaml" >"$dest/helm-prod.yaml"
}

validate_all() {
  local dest="$1" f failed=0
  for f in kustomize-dev kustomize-prod helm-default helm-prod; do
    validate "$f" "$dest/$f.yaml" || failed=1
  done
  return "$failed"
}

# expect_failure WHAT COMMAND...: the self-test passes a case only when the command fails.
self_test_failures=0
expect_failure() {
  local what="$1"
  shift
  local out
  if out="$("$@" 2>&1)"; then
    log "SELF-TEST FAILED: $what was accepted"
    self_test_failures=$((self_test_failures + 1))
  else
    log "self-test: $what is rejected: $(printf '%s\n' "$out" | grep -m1 -iE 'error|fail|invalid|not allowed|differ' || printf '%s\n' "$out" | tail -n 1)"
  fi
}

self_test() {
  local work
  work="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  log "self-test: broken copies under $work must fail"

  # 1. An unknown field in a manifest (strict schema validation).
  prepare_k8s "$ROOT/k8s" "$work/k8s-unknown-field"
  sed -i 's/^  podManagementPolicy: Parallel$/  podManagementPolicy: Parallel\n  replica: 3/' \
    "$work/k8s-unknown-field/base/scheduler.yaml"
  grep -q '^  replica: 3$' "$work/k8s-unknown-field/base/scheduler.yaml"
  "$KUBECTL" kustomize "$work/k8s-unknown-field/overlays/dev" >"$work/unknown-field.yaml"
  expect_failure "a StatefulSet with an unknown field (spec.replica)" \
    validate broken-unknown-field "$work/unknown-field.yaml"

  # 2. A wrong type (a port as a word).
  sed 's/containerPort: 8080/containerPort: eighty/' "$OUT/kustomize-prod.yaml" >"$work/wrong-type.yaml"
  expect_failure "a containerPort that is not a number" validate broken-wrong-type "$work/wrong-type.yaml"

  # 3. An apiVersion kubernetes-validate has no schema for (it would only warn).
  sed 's#^apiVersion: apps/v1$#apiVersion: apps/v1beta9#' "$OUT/helm-default.yaml" >"$work/bad-api.yaml"
  expect_failure "an unknown apiVersion (apps/v1beta9)" validate broken-api-version "$work/bad-api.yaml"

  # 4. A Scheduler whose replica setting disagrees with the StatefulSet (ownership gaps).
  prepare_k8s "$ROOT/k8s" "$work/k8s-replicas"
  sed -i '/replacements:/,$d' "$work/k8s-replicas/overlays/prod/kustomization.yaml"
  "$KUBECTL" kustomize "$work/k8s-replicas/overlays/prod" >"$work/replicas.yaml"
  expect_failure "APP_SCHEDULER__REPLICAS not following spec.replicas" \
    validate broken-replicas "$work/replicas.yaml"

  # 5. A secret setting put in a ConfigMap.
  cp -r "$ROOT/helm/drone-delivery" "$work/chart-secret-env"
  expect_failure "a secret setting in a ConfigMap" bash -c \
    "'$HELM' template x '$work/chart-secret-env' --set-string account.env.APP_DATABASE__URL=postgres://u:p@h/db >'$work/secret-env.yaml' && \
     '$PY' '$ROOT/scripts/k8s_check.py' check broken-secret-env '$work/secret-env.yaml' '$work/secret-env.builtin.yaml'"

  # 5b. A Delivery that does not publish on the suite's partition count (its setting dropped).
  sed 's/APP_TRACKING__PARTITIONS/APP_TRACKING__PARTITION/' "$OUT/helm-default.yaml" >"$work/tracking.yaml"
  expect_failure "a Delivery without APP_TRACKING__PARTITIONS = partitions" \
    validate broken-tracking-partitions "$work/tracking.yaml"

  # 6. A typo in the chart's values (the schema forbids unknown keys).
  expect_failure "a typo in values (scheduler.replica)" \
    "$HELM" template x "$ROOT/helm/drone-delivery" --set scheduler.replica=3
  # 7. More Scheduler replicas than partitions.
  expect_failure "scheduler.replicas > partitions" \
    "$HELM" template x "$ROOT/helm/drone-delivery" --set scheduler.replicas=9 --set partitions=8
  # 8. A malformed PrometheusRule (the CRD check).
  sed 's/^\(\s*\)expr: sum(supervisor_stuck_sagas) > 0$/\1exp: sum(supervisor_stuck_sagas) > 0/' \
    "$OUT/kustomize-prod.yaml" >"$work/bad-rule.yaml"
  grep -q 'exp: sum(supervisor_stuck_sagas)' "$work/bad-rule.yaml"
  expect_failure "a PrometheusRule rule without expr" validate broken-rule "$work/bad-rule.yaml"

  # 9. An Ingress that routes the whole Supervisor (`/` as a Prefix): /api/*, /metrics, /readyz
  #    and /openapi.json would be reachable from outside.
  cp -r "$ROOT/helm/drone-delivery" "$work/chart-open-supervisor"
  sed -i 's#^- {path: /, pathType: Exact}$#- {path: /, pathType: Prefix}#' \
    "$work/chart-open-supervisor/templates/_helpers.tpl"
  "$HELM" template x "$work/chart-open-supervisor" >"$work/open-supervisor.yaml"
  grep -q 'pathType: Prefix' "$work/open-supervisor.yaml"
  expect_failure "an Ingress routing / (Prefix) to the Supervisor" \
    validate broken-open-supervisor "$work/open-supervisor.yaml"
  # 10. ... or only its API and metrics, next to the dashboard.
  cp -r "$ROOT/helm/drone-delivery" "$work/chart-supervisor-api"
  sed -i 's#^- {path: /logout, pathType: Exact}$#&\n- {path: /api, pathType: Prefix}\n- {path: /metrics, pathType: Exact}#' \
    "$work/chart-supervisor-api/templates/_helpers.tpl"
  "$HELM" template x "$work/chart-supervisor-api" >"$work/supervisor-api.yaml"
  grep -q 'path: /metrics' "$work/supervisor-api.yaml"
  expect_failure "an Ingress routing /api and /metrics to the Supervisor" \
    validate broken-supervisor-api "$work/supervisor-api.yaml"
  # 11. TLS on the Ingress but cookies without `Secure`.
  sed 's/^\(\s*\)APP_SUPERVISOR__SECURE_COOKIES: "true"$/\1APP_SUPERVISOR__SECURE_COOKIES: "false"/' \
    "$OUT/helm-default.yaml" >"$work/insecure-cookies.yaml"
  grep -q 'APP_SUPERVISOR__SECURE_COOKIES: "false"' "$work/insecure-cookies.yaml"
  expect_failure "TLS with APP_SUPERVISOR__SECURE_COOKIES false" \
    validate broken-insecure-cookies "$work/insecure-cookies.yaml"
  # 12. The dashboard (passwords, session cookies) served without TLS.
  "$HELM" template x "$ROOT/helm/drone-delivery" --set ingress.tls.enabled=false >"$work/no-tls.yaml"
  expect_failure "the dashboard without TLS" validate broken-no-tls "$work/no-tls.yaml"
  # 13. One Supervisor.
  "$HELM" template x "$ROOT/helm/drone-delivery" --set supervisor.replicas=1 >"$work/one-supervisor.yaml"
  expect_failure "a single Supervisor replica" validate broken-one-supervisor "$work/one-supervisor.yaml"
  # 14. No PodDisruptionBudget for the Supervisor.
  "$PY" - "$OUT/helm-default.yaml" "$work/no-supervisor-pdb.yaml" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
keep = [d for d in docs if not (d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "supervisor")]
assert len(keep) == len(docs) - 1
open(sys.argv[2], "w").write("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in keep))
PYEOF
  expect_failure "a Supervisor without a PodDisruptionBudget" \
    validate broken-no-supervisor-pdb "$work/no-supervisor-pdb.yaml"
  # 15. A dev Secret source committed to git (a throwaway repository holding a copy of k8s/).
  mkdir -p "$work/repo"
  git -C "$work/repo" init -q
  cp "$ROOT/.gitignore" "$work/repo/.gitignore"
  prepare_k8s "$ROOT/k8s" "$work/repo/k8s"
  git -C "$work/repo" add -A
  git -C "$work/repo" add -f k8s/overlays/dev/secrets.env
  expect_failure "a committed dev Secret source (k8s/overlays/dev/secrets.env)" \
    "$PY" "$ROOT/scripts/k8s_check.py" committed-secrets "$work/repo"

  if [ "$self_test_failures" -ne 0 ]; then
    log "self-test: $self_test_failures broken case(s) passed validation"
    return 1
  fi
  log "self-test: every broken case was rejected"
}

case "${1:-}" in
  --update-base)
    log "regenerating k8s/base from helm/drone-delivery"
    render_base "$ROOT/helm/drone-delivery" "$ROOT/k8s/base"
    exit 0
    ;;
  --self-test)
    mkdir -p "$OUT"
    prepare_k8s "$ROOT/k8s" "$OUT/k8s"
    render_all "$OUT/k8s" "$ROOT/helm/drone-delivery" "$OUT"
    self_test
    exit $?
    ;;
  "") ;;
  *)
    echo "usage: $0 [--self-test|--update-base]" >&2
    exit 2
    ;;
esac

failed=0
rm -rf "$OUT"
mkdir -p "$OUT/base"

log "helm lint --strict (default values, values-prod.yaml)"
"$HELM" lint --strict "$ROOT/helm/drone-delivery" >/dev/null || failed=1
"$HELM" lint --strict "$ROOT/helm/drone-delivery" -f "$ROOT/helm/drone-delivery/values-prod.yaml" >/dev/null || failed=1

log "k8s/base is what the chart renders"
render_base "$ROOT/helm/drone-delivery" "$OUT/base" >/dev/null
for f in "$OUT"/base/*.yaml; do
  if ! cmp -s "$f" "$ROOT/k8s/base/$(basename "$f")"; then
    log "k8s/base/$(basename "$f") is out of date with the chart: run 'make k8s-base'"
    failed=1
  fi
done

log "k8s/observability and the chart's copies agree"
"$PY" "$ROOT/scripts/k8s_check.py" observability "$ROOT" || failed=1

log "no overlay's Secret source is committed (the dev overlay's are generated at deploy time)"
"$PY" "$ROOT/scripts/k8s_check.py" committed-secrets "$ROOT" || failed=1

log "rendering kustomize dev/prod and helm default/prod into $OUT"
prepare_k8s "$ROOT/k8s" "$OUT/k8s"
render_all "$OUT/k8s" "$ROOT/helm/drone-delivery" "$OUT"
validate_all "$OUT" || failed=1

if [ "$failed" -ne 0 ]; then
  log "FAILED"
  exit 1
fi
self_test
log "OK"
