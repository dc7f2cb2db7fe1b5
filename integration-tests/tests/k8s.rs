//! The deployment and the Scheduler agree on partition ownership: for every way the suite is
//! deployed (the kustomize base and its overlays, the Helm chart with its default and prod
//! values) the StatefulSet's replicas and the partition count it configures, fed to the
//! Scheduler's own `ownership` functions for each pod name, cover every partition exactly once,
//! and Ingestion appends to the same partition count.
//!
//! `k8s/base` is the chart rendered with its default values (`make k8s-base`; `make k8s-validate`
//! fails when it drifts), so the base also stands for the chart's templates.
//!
//! Also what an operator relies on at the edge: the Ingress reaches only the Supervisor's
//! dashboard, over TLS with Secure cookies; two Supervisors under a PodDisruptionBudget; the dev
//! overlay's Secrets generated at deploy time, never committed; every service on its port with a
//! database of its own, and ThirdParty reachable only from the Scheduler and the Supervisor.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use scheduler::ownership::{ordinal_from_hostname, owned_partitions};
use serde_norway::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn yaml_docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(path))
        .unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn yaml(path: &str) -> Value {
    yaml_docs(path).into_iter().next().unwrap()
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no env {name}"))
}

fn as_u32(v: &Value) -> u32 {
    match v {
        Value::Number(n) => u32::try_from(n.as_u64().unwrap()).unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("not a number: {other:?}"),
    }
}

/// `partitions=N` from a kustomization's `partitioning` configMapGenerator, if it has one.
fn generated_partitions(kustomization: &Value) -> Option<u32> {
    kustomization["configMapGenerator"]
        .as_sequence()?
        .iter()
        .find(|g| g["name"].as_str() == Some("partitioning"))?["literals"]
        .as_sequence()?
        .iter()
        .find_map(|l| l.as_str()?.strip_prefix("partitions="))
        .map(|n| n.parse().unwrap())
}

fn overlay_replicas(kustomization: &Value) -> Option<u32> {
    kustomization["replicas"]
        .as_sequence()?
        .iter()
        .find(|r| r["name"].as_str() == Some("scheduler"))
        .map(|r| as_u32(&r["count"]))
}

/// Whether a kustomization copies the StatefulSet's `spec.replicas` into the container's
/// `APP_SCHEDULER__REPLICAS` with a replacement.
fn replica_setting_follows_statefulset(kustomization: &Value) -> bool {
    let seq = |v: &Value| v.as_sequence().cloned().unwrap_or_default();
    seq(&kustomization["replacements"]).iter().any(|r| {
        r["source"]["kind"].as_str() == Some("StatefulSet")
            && r["source"]["fieldPath"].as_str() == Some("spec.replicas")
            && seq(&r["targets"])
                .iter()
                .flat_map(|t| seq(&t["fieldPaths"]))
                .any(|f| {
                    f.as_str()
                        .is_some_and(|f| f.ends_with("[name=APP_SCHEDULER__REPLICAS].value"))
                })
    })
}

/// Pods `scheduler-0..R` as the StatefulSet names them: each learns its ordinal from its name
/// and owns `p % R == i`; together they own every partition exactly once, none idle.
fn assert_ownership(deployment: &str, statefulset: &str, replicas: u32, partitions: u32) {
    assert!(replicas >= 1 && partitions >= 1, "{deployment}: empty");
    let mut owners: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for i in 0..replicas {
        let pod = format!("{statefulset}-{i}");
        let ordinal = ordinal_from_hostname(&pod)
            .unwrap_or_else(|| panic!("{deployment}: no ordinal in pod name {pod}"));
        assert_eq!(ordinal, i, "{deployment}: pod {pod}");
        let owned = owned_partitions(ordinal, replicas, partitions);
        assert!(
            !owned.is_empty(),
            "{deployment}: pod {pod} owns no partition ({replicas} replicas, {partitions} partitions)"
        );
        for p in owned {
            owners.entry(p).or_default().push(i);
        }
    }
    let all: Vec<u32> = (0..partitions).collect();
    assert_eq!(
        owners.keys().copied().collect::<Vec<_>>(),
        all,
        "{deployment}: partitions without an owner"
    );
    for (p, pods) in owners {
        assert_eq!(
            pods.len(),
            1,
            "{deployment}: partition {p} owned by {pods:?}"
        );
    }
}

/// What the base StatefulSet wires: the ordinal from the pod name, the replica setting, and the
/// partition count from the same ConfigMap key as Ingestion. Returns (name, replicas, env replicas).
fn base_wiring() -> (String, u32, u32) {
    let sched = yaml_docs("k8s/base/scheduler.yaml");
    let sts = object(&sched, "StatefulSet", "scheduler");
    let name = sts["metadata"]["name"].as_str().unwrap().to_owned();
    let c = container(sts, "scheduler");
    for downward in ["HOSTNAME", "APP_SCHEDULER__INSTANCE_ID"] {
        assert_eq!(
            env(c, downward)["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            Some("metadata.name"),
            "{downward} must be the pod name (Downward API)"
        );
    }
    let sched_ref = &env(c, "APP_SCHEDULER__PARTITIONS")["valueFrom"]["configMapKeyRef"];
    let ing = yaml_docs("k8s/base/ingestion.yaml");
    let ing_ref = &env(
        container(object(&ing, "Deployment", "ingestion"), "ingestion"),
        "APP_INGESTION__PARTITIONS",
    )["valueFrom"]["configMapKeyRef"];
    assert_eq!(sched_ref["name"].as_str(), Some("partitioning"));
    assert_eq!(sched_ref["key"].as_str(), Some("partitions"));
    assert_eq!(
        sched_ref, ing_ref,
        "Scheduler and Ingestion must read one partition count"
    );
    let replicas = as_u32(&sts["spec"]["replicas"]);
    let env_replicas = as_u32(&env(c, "APP_SCHEDULER__REPLICAS")["value"]);
    (name, replicas, env_replicas)
}

#[test]
fn kustomize_base_and_overlays_own_every_partition_once() {
    let (sts, base_replicas, env_replicas) = base_wiring();
    assert_eq!(
        base_replicas, env_replicas,
        "base: APP_SCHEDULER__REPLICAS != spec.replicas"
    );
    let base = yaml("k8s/base/kustomization.yaml");
    let base_partitions = generated_partitions(&base).expect("base generates `partitioning`");
    assert_ownership("k8s/base", &sts, base_replicas, base_partitions);

    for overlay in ["dev", "prod"] {
        let path = format!("k8s/overlays/{overlay}/kustomization.yaml");
        let k = yaml(&path);
        let replicas = overlay_replicas(&k).unwrap_or(base_replicas);
        let partitions = generated_partitions(&k).unwrap_or(base_partitions);
        // The replica setting follows spec.replicas through a replacement in the overlay (it
        // must run after the overlay's `replicas`), never a second literal.
        let follows = replica_setting_follows_statefulset(&k);
        assert!(
            follows,
            "{path}: no replacement copying spec.replicas to APP_SCHEDULER__REPLICAS"
        );
        assert_ownership(&path, &sts, replicas, partitions);
    }
}

#[test]
fn helm_values_own_every_partition_once() {
    let defaults = yaml("helm/drone-delivery/values.yaml");
    let (sts, base_replicas, _) = base_wiring();
    let base_partitions =
        generated_partitions(&yaml("k8s/base/kustomization.yaml")).expect("base partitions");
    let replicas = as_u32(&defaults["scheduler"]["replicas"]);
    let partitions = as_u32(&defaults["partitions"]);
    // k8s/base is the chart rendered with these values, except the hand-written generator.
    assert_eq!(
        replicas, base_replicas,
        "values.yaml and k8s/base disagree on replicas"
    );
    assert_eq!(
        partitions, base_partitions,
        "values.yaml and k8s/base/kustomization.yaml disagree on partitions"
    );
    assert_ownership("helm default values", &sts, replicas, partitions);

    let prod = yaml("helm/drone-delivery/values-prod.yaml");
    let replicas = prod["scheduler"]["replicas"]
        .as_u64()
        .map_or(replicas, |r| u32::try_from(r).unwrap());
    let partitions = prod["partitions"]
        .as_u64()
        .map_or(partitions, |p| u32::try_from(p).unwrap());
    assert_ownership("helm values-prod.yaml", &sts, replicas, partitions);
}

#[test]
fn ownership_covers_what_an_operator_may_configure() {
    // Any replicas <= partitions the chart accepts (it refuses more replicas than partitions).
    for partitions in 1..=32 {
        for replicas in 1..=partitions {
            assert_ownership("chart range", "scheduler", replicas, partitions);
        }
    }
    // A name prefix (`namePrefix`) keeps the ordinal readable from the pod name.
    assert_eq!(ordinal_from_hostname("prod-scheduler-3"), Some(3));
}

/// An Ingress path's backend Service name.
fn backend_service(path: &Value) -> Option<&str> {
    path["backend"]["service"]["name"].as_str()
}

/// Whether an Ingress path sends `url_path` to its backend (Kubernetes `Exact`, or `Prefix`
/// matched element-wise; anything else is counted as a prefix).
fn ingress_routes(path: &Value, url_path: &str) -> bool {
    let p = path["path"].as_str().unwrap_or("/");
    if path["pathType"].as_str() == Some("Exact") {
        return url_path == p;
    }
    let p = p.trim_end_matches('/');
    p.is_empty() || url_path == p || url_path.starts_with(&format!("{p}/"))
}

#[test]
fn ingress_exposes_only_the_supervisor_dashboard_over_tls() {
    let suite = yaml_docs("k8s/base/suite.yaml");
    let ingress = object(&suite, "Ingress", "drone-delivery");
    let rules = ingress["spec"]["rules"].as_sequence().unwrap();
    let mut dashboard_hosts = Vec::new();
    for rule in rules {
        let paths: Vec<&Value> = rule["http"]["paths"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|p| backend_service(p) == Some("supervisor"))
            .collect();
        if paths.is_empty() {
            continue;
        }
        let host = rule["host"].as_str().unwrap().to_owned();
        for inside in [
            "/api/overview",
            "/api/sagas",
            "/api/parked",
            "/api/audit",
            "/metrics",
            "/readyz",
            "/healthz",
            "/openapi.json",
            "/docs",
        ] {
            assert!(
                !paths.iter().any(|p| ingress_routes(p, inside)),
                "{host}: the Supervisor's {inside} must stay inside the cluster"
            );
        }
        for dashboard in [
            "/",
            "/login",
            "/logout",
            "/dashboard",
            "/dashboard/sagas/0b9f86c0-0000-4000-8000-000000000000",
            "/assets/app.css",
            "/assets/app.js",
        ] {
            assert!(
                paths.iter().any(|p| ingress_routes(p, dashboard)),
                "{host}: the dashboard's {dashboard} must be reachable"
            );
        }
        dashboard_hosts.push(host);
    }
    assert!(
        !dashboard_hosts.is_empty(),
        "the Ingress serves the dashboard"
    );
    assert!(
        ingress["spec"]["defaultBackend"].is_null(),
        "no default backend"
    );

    // TLS by default on the dashboard's host, and the Supervisor's cookies are Secure with it.
    let tls_hosts: Vec<&str> = ingress["spec"]["tls"]
        .as_sequence()
        .expect("TLS on by default")
        .iter()
        .flat_map(|t| t["hosts"].as_sequence().unwrap())
        .filter_map(Value::as_str)
        .collect();
    for host in &dashboard_hosts {
        assert!(tls_hosts.contains(&host.as_str()), "{host} without TLS");
    }
    let sup = yaml_docs("k8s/base/supervisor.yaml");
    let config = object(&sup, "ConfigMap", "supervisor-config");
    assert_eq!(
        config["data"]["APP_SUPERVISOR__SECURE_COOKIES"].as_str(),
        Some("true"),
        "cookies must be Secure behind TLS"
    );
    let values = yaml("helm/drone-delivery/values.yaml");
    assert_eq!(values["ingress"]["tls"]["enabled"].as_bool(), Some(true));
}

#[test]
fn two_supervisors_under_a_disruption_budget() {
    let values = yaml("helm/drone-delivery/values.yaml");
    assert!(
        as_u32(&values["supervisor"]["replicas"]) >= 2,
        "the chart runs 2 Supervisors by default"
    );
    let sup = yaml_docs("k8s/base/supervisor.yaml");
    let deployment = object(&sup, "Deployment", "supervisor");
    let replicas = as_u32(&deployment["spec"]["replicas"]);
    assert!(replicas >= 2, "k8s/base runs {replicas} Supervisor(s)");
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    let pdb = sup
        .iter()
        .find(|d| {
            d["kind"].as_str() == Some("PodDisruptionBudget")
                && &d["spec"]["selector"]["matchLabels"] == selector
        })
        .expect("a PodDisruptionBudget selects the Supervisor");
    let max_unavailable = as_u32(&pdb["spec"]["maxUnavailable"]);
    assert!(
        max_unavailable < replicas,
        "the PDB lets {max_unavailable} of {replicas} Supervisors go at once"
    );
}

/// Every object of `k8s/base`, from the files its kustomization lists.
fn base_objects() -> Vec<Value> {
    yaml("k8s/base/kustomization.yaml")["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .flat_map(|f| yaml_docs(&format!("k8s/base/{}", f.as_str().unwrap())))
        .collect()
}

/// The `app.kubernetes.io/name` of every pod a NetworkPolicy peer list selects by label.
fn peer_apps(peers: &Value) -> Vec<String> {
    peers
        .as_sequence()
        .map(|p| {
            p.iter()
                .filter_map(|p| p["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_service_is_deployed_on_its_port() {
    let objects = base_objects();
    for (svc, port) in [
        ("ingestion", 8080),
        ("account", 8081),
        ("package", 8082),
        ("drone", 8083),
        ("delivery", 8084),
        ("scheduler", 8085),
        ("supervisor", 8086),
        ("thirdparty", 8087),
    ] {
        let service = object(&objects, "Service", svc);
        assert_eq!(as_u32(&service["spec"]["ports"][0]["port"]), port, "{svc}");
        let kind = if svc == "scheduler" {
            "StatefulSet"
        } else {
            "Deployment"
        };
        let c = container(object(&objects, kind, svc), svc);
        assert_eq!(as_u32(&c["ports"][0]["containerPort"]), port, "{svc}");
        assert_eq!(
            env(c, "APP_DATABASE__URL")["valueFrom"]["secretKeyRef"]["key"].as_str(),
            Some(format!("{svc}-database-url").as_str()),
            "{svc}: its own database, from the Secret"
        );
    }
}

/// The carriers' legs are booked by the Scheduler (ArrangeThirdParty) and cancelled by the
/// Supervisor (compensation): both know where ThirdParty is, and nothing else may reach it.
#[test]
fn only_the_scheduler_and_the_supervisor_reach_thirdparty() {
    let objects = base_objects();
    for caller in ["scheduler", "supervisor"] {
        let config = object(&objects, "ConfigMap", &format!("{caller}-config"));
        assert_eq!(
            config["data"]["APP_DOWNSTREAM__THIRDPARTY_URL"].as_str(),
            Some("http://thirdparty:8087"),
            "{caller}"
        );
    }
    let ingress = object(&objects, "NetworkPolicy", "thirdparty-ingress");
    let mut callers: Vec<String> = ingress["spec"]["ingress"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|rule| peer_apps(&rule["from"]))
        .collect();
    callers.sort();
    assert_eq!(callers, ["scheduler", "supervisor"]);
    let mut egress: Vec<String> = objects
        .iter()
        .filter(|o| o["kind"].as_str() == Some("NetworkPolicy"))
        .filter(|o| {
            o["spec"]["egress"].as_sequence().is_some_and(|rules| {
                rules
                    .iter()
                    .any(|r| peer_apps(&r["to"]).iter().any(|a| a == "thirdparty"))
            })
        })
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    egress.sort();
    assert_eq!(egress, ["scheduler-egress", "supervisor-egress"]);
}

/// `git` in the repository; panics with its error output when it cannot run.
fn git(args: &[&str]) -> std::process::Output {
    std::process::Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("git {args:?}: {e}"))
}

#[test]
fn dev_overlay_secrets_are_generated_never_committed() {
    let dev = yaml("k8s/overlays/dev/kustomization.yaml");
    let generators = dev["secretGenerator"]
        .as_sequence()
        .expect("secretGenerator");
    assert!(!generators.is_empty());
    for g in generators {
        assert!(
            g["literals"].is_null(),
            "{}: literals would be committed values",
            g["name"].as_str().unwrap_or("?")
        );
        for source in g["envs"].as_sequence().expect("envs") {
            let rel = format!("k8s/overlays/dev/{}", source.as_str().unwrap());
            let tracked = git(&["ls-files", "--", &rel]);
            assert!(tracked.status.success(), "git ls-files: {tracked:?}");
            assert!(
                tracked.stdout.is_empty(),
                "{rel} is committed: the dev Secrets must be generated at deploy time"
            );
            let ignored = git(&["check-ignore", "-q", "--no-index", "--", &rel]);
            assert_eq!(
                ignored.status.code(),
                Some(0),
                "{rel} must be git-ignored (it holds generated credentials)"
            );
        }
    }
    // Nothing else with working credentials sits in the overlay either (a file deleted but
    // not yet committed as deleted is gone already).
    let committed = git(&["ls-files", "--", "k8s/overlays/dev"]);
    let env_files: Vec<String> = String::from_utf8(committed.stdout)
        .unwrap()
        .lines()
        .filter(|f| f.ends_with(".env") && repo().join(f).exists())
        .map(str::to_owned)
        .collect();
    assert!(
        env_files.is_empty(),
        "committed env files in the dev overlay: {env_files:?}"
    );
    // The generator the overlay and the README name.
    assert!(repo().join("scripts/k8s-dev-secrets.sh").is_file());
}
