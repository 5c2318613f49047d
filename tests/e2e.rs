//! End to end on the real node, as a user runs it: the operator installed with `helm install` of
//! `charts/stash` (two replicas, the shipped RBAC, self-managed webhook certificates, the webhook reached
//! through its Service); an application in a namespace enforcing Pod Security `restricted` (a Deployment writing to
//! a PVC, a standalone PVC, PostgreSQL and MariaDB as StatefulSets); one BackupBatch whose CronJob fires, with exec
//! hooks in the application's container; the sidecar, a PVC Job, a pg_dump and a mysqldump Job backing up for real
//! into a REST server on the host, while the leading operator Pod is killed and the other replica
//! finishes the session; then a RestoreBatch in a fresh namespace that brings every file back byte for
//! byte and both databases' rows back identical.
//! Without a node (`STASH_NODE_IP` unset: plain `cargo test`) it says so and passes; `scripts/test.sh`
//! always runs it with one.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use stash::api::backup_session::{BackupSessionPhase, BackupSessionStatus, HostPhase};
use stash::api::restore_batch::RestorePhase;
use stash::api::{BackupBatch, BackupSession, RestoreBatch};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::backends;
use support::fixtures;
use support::node::{self, kubectl};
use support::{TestNamespace, eventually};

const CHART: &str = "charts/stash";
const APP_IMAGE: &str = "stash.local/toolbox:dev";
/// Guards against hangs only: a CronJob fires within a minute, Pods start in seconds.
const LIMIT: Duration = Duration::from_secs(240);

/// The installed operator; uninstalled when dropped, so the next test binary finds no operator.
struct Installed;

impl Installed {
    /// What `kubectl apply -k deploy/overlays/test-node` installs (tests/helm_chart.rs compares the two):
    /// the chart with the node's values, in the operator's namespace opted into the node. Every test binary
    /// applies deploy/base/rbac.yaml first (`support::cluster`): `--take-ownership` adopts those objects.
    async fn install() -> Installed {
        let client = support::client().await;
        node::schedule_namespace_on_node(&client, "stash").await;
        let installed =
            node::helm(&["install", "stash", CHART, "-n", "stash", "--take-ownership", "--set", node::CHART_VALUES]);
        assert!(installed.status.success(), "helm install {CHART}: {}", String::from_utf8_lossy(&installed.stderr));
        let deployments: Api<Deployment> = Api::namespaced(client, "stash");
        eventually("two ready operator replicas", LIMIT, || {
            let deployments = deployments.clone();
            async move {
                let ready = deployments.get("stash-operator").await.ok()?.status?.ready_replicas?;
                (ready == 2).then_some(())
            }
        })
        .await;
        Installed
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let uninstalled =
            node::helm(&["uninstall", "stash", "-n", "stash", "--ignore-not-found", "--wait", "--timeout=120s"]);
        if !uninstalled.status.success() {
            eprintln!("helm uninstall: {}", String::from_utf8_lossy(&uninstalled.stderr));
        }
        // Also when the uninstall failed: the namespace takes what the operator made there (its Lease,
        // the certificate Secret); the webhook configuration would otherwise keep sending the API server
        // to a Service that is gone.
        for args in [
            &["delete", "mutatingwebhookconfiguration", "stash", "--ignore-not-found"][..],
            &["delete", "namespace", "stash", "--ignore-not-found", "--timeout=120s"][..],
        ] {
            let out = kubectl(args);
            if !out.status.success() {
                eprintln!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
}

/// A namespace that enforces `restricted` and whose Pods run on the node.
async fn restricted_namespace(prefix: &str) -> TestNamespace {
    let ns = TestNamespace::restricted(prefix).await;
    node::schedule_on_node(&ns).await;
    ns
}

/// A PersistentVolumeClaim bound to a hostPath volume in `dir` (writable by any user: the test's Pods
/// run as non-root users of their own).
async fn claim_on(ns: &TestNamespace, name: &str, dir: &Path) {
    std::fs::create_dir_all(dir).expect("volume dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let pv = format!("{}-{name}", ns.name);
    let volumes: Api<PersistentVolume> = Api::all(ns.client.clone());
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv, "labels": {"stash-tests/namespace": ns.name}},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-manual",
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": dir.display().to_string(), "type": "Directory"},
            "claimRef": {"namespace": ns.name, "name": name},
        },
    }))
    .expect("a PersistentVolume");
    volumes.create(&Default::default(), &volume).await.expect("create the PersistentVolume");
    fixtures::create::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(
        ns,
        json!({"metadata": {"name": name}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-manual",
            "volumeName": pv, "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;
}

/// The repository Secret and Repository `name` at `path` of the REST server on the host.
async fn repository(ns: &TestNamespace, name: &str, node_ip: Ipv4Addr, port: u16, path: &str) {
    fixtures::secret(ns, true).await;
    fixtures::create::<stash::api::Repository>(
        ns,
        json!({"apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
               "metadata": {"name": name, "namespace": ns.name},
               "spec": {"backend": {"storageSecretName": "repo-secret",
                                    "rest": {"url": format!("http://{node_ip}:{port}/{path}")}}}}),
    )
    .await;
}

/// What `restricted` asks of a container that runs as the application's own non-root user.
fn restricted_pod(containers: Value, volumes: Value) -> Value {
    json!({
        "terminationGracePeriodSeconds": 1,
        "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": containers,
        "volumes": volumes,
    })
}

fn app_container(script: &str) -> Value {
    json!({
        "name": "app", "image": APP_IMAGE, "imagePullPolicy": "Never", "command": ["sh", "-c", script],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
    })
}

/// A WordPress-like Deployment: it writes its site into the PVC `uploads` once, then serves nothing.
fn web(replicas: i32) -> Value {
    let script = "mkdir -p /data/site && cd /data/site && [ -f index.html ] || { echo '<h1>e2e</h1>' > index.html; \
                  head -c 3000000 /dev/urandom > blob.bin; mkdir -p 2026/11 && seq 1 5000 > 2026/11/rows.txt; }; \
                  exec sleep infinity";
    json!({"metadata": {"name": "web"}, "spec": {
        "replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": restricted_pod(
            json!([app_container(script)]),
            json!([{"name": "data", "persistentVolumeClaim": {"claimName": "uploads"}}]))}}})
}

const PG_PASSWORD: &str = "e2e-pg-password-7c1d";

/// PostgreSQL 15 as a one-replica StatefulSet behind Service `pg`, and Secret `pg-conn` saying how to
/// reach it by its DNS name (the database member).
async fn postgres(ns: &TestNamespace) {
    let container = json!({
        "image": "stash.local/postgres:dev",
        "env": [{"name": "POSTGRES_PASSWORD", "value": PG_PASSWORD}, {"name": "POSTGRES_DB", "value": "shop"}],
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
        "readinessProbe": {"exec": {"command": ["pg_isready", "-h", "127.0.0.1"]}, "periodSeconds": 1},
    });
    database(ns, "pg", 5432, container, "postgres").await;
}

/// Database `name` as a StatefulSet of one restricted Pod (`container` completed with its name, port
/// and securityContext) with a Service, and Secret `<name>-conn` connecting `username` to its `shop`
/// database (the member); waits until it is ready.
async fn database(ns: &TestNamespace, name: &str, port: u16, mut container: Value, username: &str) {
    container["name"] = json!(name);
    container["imagePullPolicy"] = json!("Never");
    container["ports"] = json!([{"containerPort": port}]);
    container["securityContext"] = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    let mut pod = restricted_pod(json!([container]), json!([{"name": "data", "emptyDir": {}}]));
    pod["securityContext"]["runAsUser"] = json!(65532);
    pod["securityContext"]["runAsGroup"] = json!(65532);
    pod["securityContext"]["fsGroup"] = json!(65532);
    fixtures::create::<k8s_openapi::api::apps::v1::StatefulSet>(
        ns,
        json!({"metadata": {"name": name}, "spec": {"serviceName": name, "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod}}}),
    )
    .await;
    fixtures::create::<k8s_openapi::api::core::v1::Service>(
        ns,
        json!({"metadata": {"name": name}, "spec": {"selector": {"app": name}, "ports": [{"port": port}]}}),
    )
    .await;
    let connection = json!({"host": format!("{name}.{}.svc.cluster.local", ns.name), "port": port.to_string(),
                            "username": username, "password": PG_PASSWORD, "database": "shop"});
    fixtures::create::<k8s_openapi::api::core::v1::Secret>(
        ns,
        json!({"metadata": {"name": format!("{name}-conn")}, "stringData": connection}),
    )
    .await;
    let pods = ns.api::<Pod>();
    let pod_name = format!("{name}-0");
    eventually(&format!("database {name} ready"), LIMIT, || {
        let (pods, pod_name) = (pods.clone(), pod_name.clone());
        async move {
            let pod = pods.get(&pod_name).await.ok()?;
            let ready = pod.status?.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())
        }
    })
    .await;
}

/// `psql` in the database's own Pod (local socket), printing the result only.
fn psql(ns: &TestNamespace, sql: &str) -> String {
    let out = kubectl(&["-n", &ns.name, "exec", "pg-0", "--", "psql", "-U", "postgres", "-d", "shop", "-tAc", sql]);
    assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// MariaDB 10.11 as a StatefulSet with a Service, and Secret `maria-conn` (the database member).
async fn mariadb(ns: &TestNamespace) {
    let container = json!({
        "image": "stash.local/mariadb:dev",
        "env": [{"name": "MARIADB_ROOT_PASSWORD", "value": PG_PASSWORD}, {"name": "MARIADB_DATABASE", "value": "shop"}],
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/mysql"}],
        "readinessProbe": {"exec": {"command": ["mariadb-admin", "--no-defaults", "-h", "127.0.0.1", "ping"]},
                           "periodSeconds": 1},
    });
    database(ns, "maria", 3306, container, "root").await;
}

/// `mariadb` in the database's own Pod, printing the result only.
fn maria_sql(ns: &TestNamespace, sql: &str) -> String {
    let password = format!("-p{PG_PASSWORD}");
    let args = ["-n", &ns.name, "exec", "maria-0", "--", "mariadb", "--no-defaults", "-h", "127.0.0.1", "-uroot"];
    let out = kubectl(&[&args[..], &[password.as_str(), "shop", "-NBe", sql]].concat());
    assert!(out.status.success(), "mariadb {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Table `items` of MariaDB's `shop` with `count` rows named `<name> <n>`; returns its checksum.
fn seed_maria(ns: &TestNamespace, name: &str, count: u32) -> String {
    maria_sql(
        ns,
        &format!(
            "CREATE TABLE items (id INT PRIMARY KEY AUTO_INCREMENT, name TEXT, qty INT); \
             INSERT INTO items (name, qty) SELECT CONCAT('{name} ', seq), seq % 17 FROM seq_1_to_{count}"
        ),
    );
    maria_sql(ns, MARIA_CHECKSUM)
}

const MARIA_CHECKSUM: &str =
    "SELECT CONCAT(COUNT(*), ':', MD5(GROUP_CONCAT(CONCAT_WS('|', id, name, qty) ORDER BY id))) FROM items";

const ROWS_CHECKSUM: &str = "SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM items t";

/// A StatefulSet of two replicas, each with its own claim `data-ledger-<ordinal>`, writing its own
/// data once. `runs: false` keeps its Pods from ever being scheduled (a restore target only).
fn ledger(runs: bool) -> Value {
    let script = "[ -f /data/owner ] || { hostname > /data/owner; head -c 200000 /dev/urandom > /data/blob.bin; }; \
                  exec sleep infinity";
    let mut pod = restricted_pod(json!([app_container(script)]), json!([]));
    if !runs {
        pod["nodeSelector"] = json!({"stash-tests/no-such-node": "true"});
    }
    json!({"metadata": {"name": "ledger"}, "spec": {
        "replicas": 2, "serviceName": "ledger", "selector": {"matchLabels": {"app": "ledger"}},
        "template": {"metadata": {"labels": {"app": "ledger"}}, "spec": pod},
        "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-manual",
            "resources": {"requests": {"storage": "1Gi"}}}}]}})
}

/// The Pod of `app` (label `app=<app>`) running with the injected sidecar.
async fn running_with_sidecar(ns: &TestNamespace, app: &str) -> Pod {
    let pods = ns.api::<Pod>();
    eventually(&format!("the {app} Pod running with the sidecar"), LIMIT, || {
        let pods = pods.clone();
        async move {
            // The webhook may learn of the batch just after the first Pod was admitted: the
            // operator's one restart then brings a Pod with the sidecar.
            let list = pods.list(&ListParams::default().labels(&format!("app={app}"))).await.ok()?;
            let injected = |p: &Pod| p.spec.iter().flat_map(|s| &s.containers).any(|c| c.name == "stash");
            let running = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            list.items.into_iter().find(|p| running(p) && injected(p))
        }
    })
    .await
}

/// A BackupSession of `batch`, as `stash trigger` makes one: its name and its status once final.
async fn session_run(ns: &TestNamespace, batch: &str) -> (String, BackupSessionStatus) {
    let session = stash::session::create_backup_session(ns.client.clone(), &ns.name, batch, None)
        .await
        .unwrap_or_else(|e| panic!("a session of {batch}: {e}"));
    let name = kube::ResourceExt::name_any(&session);
    let sessions = ns.api::<BackupSession>();
    let status = eventually(&format!("the session of {batch} to finish"), LIMIT, || {
        let (sessions, name) = (sessions.clone(), name.clone());
        async move { sessions.get(&name).await.ok()?.status.filter(|s| s.phase.is_some_and(|p| p.is_final())) }
    })
    .await;
    (name, status)
}

/// Waits until RestoreBatch `name` is final, saying where it stood if it never is.
async fn restore_finished(ns: &TestNamespace, name: &str) -> RestoreBatch {
    let restores = ns.api::<RestoreBatch>();
    let started = std::time::Instant::now();
    loop {
        let restore = restores.get(name).await.expect("the RestoreBatch");
        let phase = restore.status.as_ref().and_then(|s| s.phase);
        if matches!(phase, Some(RestorePhase::Succeeded | RestorePhase::Failed | RestorePhase::Invalid)) {
            return restore;
        }
        // A hang guard that says where the restore stood.
        assert!(started.elapsed() < LIMIT, "the restore did not finish: {:#?}", restore.status);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every regular file under `dir`, by relative path, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).expect("under root").to_path_buf();
                out.insert(relative, std::fs::read(&path).expect("read file"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn file_names(files: &BTreeMap<PathBuf, Vec<u8>>) -> Vec<String> {
    files.keys().map(|p| p.display().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_backs_up_on_the_node_and_restores_into_a_fresh_namespace() {
    let Some(node_ip) = node::node_ip() else {
        eprintln!("skipped: no node (STASH_NODE_IP unset; scripts/test.sh brings one up)");
        return;
    };
    node::import_images(&["stash", "toolbox", "postgres", "mariadb"]);
    let rest = backends::rest_server_on(node_ip.into());
    let volumes = tempfile::tempdir().expect("volumes dir");
    let _operator = Installed::install().await;

    // The application, its standalone archive PVC, and the batch, in a restricted namespace.
    let app = restricted_namespace("e2e").await;
    repository(&app, "repo", node_ip, rest.port, "e2e").await;
    claim_on(&app, "uploads", &volumes.path().join("app-uploads")).await;
    claim_on(&app, "archive", &volumes.path().join("app-archive")).await;
    std::fs::create_dir_all(volumes.path().join("app-archive/2025")).expect("archive dir");
    std::fs::write(volumes.path().join("app-archive/2025/ledger.csv"), "id,amount\n1,100\n2,250\n").expect("file");
    // Batch hooks run in every member workload's Pods that have the container: web's and ledger's.
    let hook = |name: &str| {
        let script = format!("mkdir -p /data/.hooks && date +%s > /data/.hooks/{name}");
        json!({"exec": {"command": ["sh", "-c", script]}, "containerName": "app"})
    };
    let mut post = hook("post-hook");
    post["executionPolicy"] = json!("Always");
    fixtures::batch(
        &app,
        "site",
        vec![
            json!({"target": {"alias": "web", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                   "paths": ["/data"], "volumeMounts": [{"name": "data", "mountPath": "/data"}]}}),
            json!({"target": {"alias": "ledger", "ref": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "ledger"},
                   "paths": ["/data"], "volumeMounts": [{"name": "data", "mountPath": "/data"}]}}),
            json!({"target": {"alias": "archive", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "archive"}}}),
            json!({"target": {"alias": "shop-db", "ref": {"apiVersion": "v1", "kind": "Secret", "name": "pg-conn"}},
                   "task": {"name": "postgres-backup-15"}}),
            json!({"target": {"alias": "shop-maria", "ref": {"apiVersion": "v1", "kind": "Secret", "name": "maria-conn"}},
                   "task": {"name": "mariadb-backup-10.11"}}),
        ],
        // Paused until the application runs: a pre-backup exec hook waits only 15 s for member Pods
        // that do not run yet, and the web Pod is restarted once to get its sidecar.
        json!({"schedule": "* * * * *", "paused": true, "executionOrder": "Sequential", "timeOut": "10m",
               "hooks": {"preBackup": hook("pre-hook"), "postBackup": post},
               "retentionPolicy": {"name": "last-3", "keepLast": 3, "prune": true}}),
    )
    .await;
    fixtures::create::<Deployment>(&app, web(1)).await;
    for ordinal in 0..2 {
        claim_on(&app, &format!("data-ledger-{ordinal}"), &volumes.path().join(format!("app-ledger-{ordinal}"))).await;
    }
    fixtures::create::<k8s_openapi::api::apps::v1::StatefulSet>(&app, ledger(true)).await;
    postgres(&app).await;
    psql(
        &app,
        "CREATE TABLE items (id serial PRIMARY KEY, name text, qty int); \
         INSERT INTO items (name, qty) SELECT 'item ' || g, g % 17 FROM generate_series(1, 5000) g",
    );
    let checksum = psql(&app, ROWS_CHECKSUM);
    mariadb(&app).await;
    let maria_checksum = seed_maria(&app, "item", 5000);

    // The webhook injected the sidecar when the Deployment's Pod was created.
    let pods = app.api::<Pod>();
    let pod = running_with_sidecar(&app, "web").await;
    let containers: Vec<String> = pod.spec.expect("spec").containers.into_iter().map(|c| c.name).collect();
    assert_eq!(containers, ["app", "stash"], "the webhook injected the sidecar");
    eventually("the site and both ledgers written", LIMIT, || async {
        let written = volumes.path().join("app-uploads/site/2026/11/rows.txt").exists()
            && (0..2).all(|n| volumes.path().join(format!("app-ledger-{n}/blob.bin")).exists());
        written.then_some(())
    })
    .await;
    let ledgers = pods.list(&ListParams::default().labels("app=ledger")).await.expect("ledger Pods").items;
    for pod in &ledgers {
        let names: Vec<&str> = pod.spec.iter().flat_map(|s| &s.containers).map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app", "stash"], "{} got the sidecar", kube::ResourceExt::name_any(pod));
    }
    let resume = json!({"spec": {"paused": false}});
    app.api::<BackupBatch>().patch("site", &PatchParams::default(), &Patch::Merge(&resume)).await.expect("resume");

    // The CronJob fires; its session runs the sidecar, then the archive's Job, then finalizes.
    let sessions = app.api::<BackupSession>();
    let session = eventually("a session from the CronJob", LIMIT, || {
        let sessions = sessions.clone();
        async move { sessions.list(&ListParams::default()).await.ok()?.items.into_iter().next() }
    })
    .await;
    let pause = json!({"spec": {"paused": true}});
    app.api::<BackupBatch>().patch("site", &PatchParams::default(), &Patch::Merge(&pause)).await.expect("pause");
    let name = kube::ResourceExt::name_any(&session);

    // Mid-session, the leader's Pod dies at once; the other replica takes the Lease and finishes.
    let started = eventually("the session running (or already over)", LIMIT, || {
        let (sessions, name) = (sessions.clone(), name.clone());
        async move {
            let status = sessions.get(&name).await.ok()?.status?;
            matches!(status.phase?, BackupSessionPhase::Running | BackupSessionPhase::Failed).then_some(status)
        }
    })
    .await;
    assert_eq!(started.phase, Some(BackupSessionPhase::Running), "{started:#?}");
    let leases: Api<Lease> = Api::namespaced(support::client().await, "stash");
    let holder = |lease: Lease| lease.spec.and_then(|s| s.holder_identity).filter(|h| !h.is_empty());
    let leader = holder(leases.get("stash-operator").await.expect("the operator's Lease")).expect("a leader");
    let killed = kubectl(&["-n", "stash", "delete", "pod", &leader, "--grace-period=0", "--force", "--wait=false"]);
    assert!(killed.status.success(), "kill the leader: {}", String::from_utf8_lossy(&killed.stderr));
    let successor = eventually("another replica to lead", LIMIT, || {
        let (leases, leader) = (leases.clone(), leader.clone());
        async move { holder(leases.get("stash-operator").await.ok()?).filter(|h| *h != leader) }
    })
    .await;
    eprintln!("leader {leader} killed mid-session; {successor} took over");

    let done = eventually("the session to finish", LIMIT, || {
        let (sessions, name) = (sessions.clone(), name.clone());
        async move {
            let session = sessions.get(&name).await.ok()?;
            session.status.as_ref()?.phase.filter(|p| p.is_final())?;
            Some(session)
        }
    })
    .await;
    let status = done.status.expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "{status:#?}");
    for target in &status.targets {
        assert!(!target.stats.is_empty(), "{target:?}");
        for host in &target.stats {
            assert_eq!(host.phase, Some(HostPhase::Succeeded), "{host:?}");
            assert!(!host.snapshots.is_empty(), "host {} names its snapshot", host.hostname);
        }
    }
    for volume in ["app-uploads", "app-ledger-0", "app-ledger-1"] {
        let hooked = volumes.path().join(volume).join(".hooks/post-hook");
        assert!(hooked.exists(), "the post-backup hook ran in the Pod of {volume}");
    }
    eventually("the session finalized", LIMIT, || {
        let (sessions, name) = (sessions.clone(), name.clone());
        async move {
            let status = sessions.get(&name).await.ok()?.status?;
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "SessionFinalized" && c.status == stash::api::common::ConditionStatus::True)
                .then_some(())
        }
    })
    .await;

    // The plugin's repository verbs run as Jobs in real Pods of the namespace, as its executor
    // identity, and hand their result back: the session's snapshots, with no restic or credentials here.
    let kubeconfig = support::cluster().kubeconfig.clone();
    let listed = support::kubectl_stash(&kubeconfig, &["snapshots", "site", "-n", &app.name, "-o", "json"])
        .output()
        .expect("kubectl runs");
    let problem = String::from_utf8_lossy(&listed.stderr);
    assert!(listed.status.success(), "kubectl stash snapshots: {problem}");
    let snapshots: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    assert!(snapshots.to_string().contains(&name), "the session's snapshots are listed: {snapshots}");
    let described = support::kubectl_stash(&kubeconfig, &["describe", "site", "-n", &app.name]).output().expect("runs");
    let text = String::from_utf8_lossy(&described.stdout);
    assert!(described.status.success() && text.contains(&name), "kubectl stash describe: {text}");

    // A batch's tcp hook is sent from a Pod of its own namespace, as its executor identity: the
    // Service's short name resolves there, and nowhere else.
    let tcp_hook = json!({"tcpSocket": {"host": "pg", "port": 5432}});
    fixtures::batch(
        &app,
        "pinged",
        vec![json!({"target": {"alias": "archive", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "archive"}}})],
        json!({"hooks": {"preBackup": tcp_hook}}),
    )
    .await;
    let (pinged, status) = session_run(&app, "pinged").await;
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "{status:#?}");
    let hook = status.conditions.iter().find(|c| c.type_ == "PreBackupHookExecutionSucceeded").expect("its record");
    assert_eq!(hook.status, stash::api::common::ConditionStatus::True, "{hook:?}");
    let job = app.api::<Job>().get(&format!("{pinged}-pre-backup")).await.expect("the hook's Job");
    let account = job.spec.and_then(|s| s.template.spec).and_then(|p| p.service_account_name);
    assert_eq!(account.as_deref(), Some("stash-backup"));

    secret_missing(node_ip, rest.port, volumes.path()).await;
    shared_repository(node_ip, rest.port, volumes.path()).await;

    // A fresh namespace: its own Repository (same password), empty claims, the Deployment (scaled to
    // zero) whose volumes say which claim each path goes to.
    let fresh = restricted_namespace("e2e-restore").await;
    repository(&fresh, "repo", node_ip, rest.port, "e2e").await;
    claim_on(&fresh, "uploads", &volumes.path().join("fresh-uploads")).await;
    claim_on(&fresh, "archive", &volumes.path().join("fresh-archive")).await;
    fixtures::create::<Deployment>(&fresh, web(0)).await;
    for ordinal in 0..2 {
        claim_on(&fresh, &format!("data-ledger-{ordinal}"), &volumes.path().join(format!("fresh-ledger-{ordinal}")))
            .await;
    }
    fixtures::create::<k8s_openapi::api::apps::v1::StatefulSet>(&fresh, ledger(false)).await;
    postgres(&fresh).await;
    mariadb(&fresh).await;
    fixtures::create::<RestoreBatch>(
        &fresh,
        json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "RestoreBatch",
               "metadata": {"name": "clone", "namespace": fresh.name},
               "spec": {"repository": {"name": "repo"}, "restoreFrom": {"namespace": app.name, "batch": "site"},
                        "members": [
            {"target": {"alias": "web", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}},
            {"target": {"alias": "ledger", "ref": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "ledger"},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}},
            {"target": {"alias": "archive", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "archive"}}},
            {"target": {"alias": "shop-db", "ref": {"apiVersion": "v1", "kind": "Secret", "name": "pg-conn"}},
             "task": {"name": "postgres-restore-15"}},
            {"target": {"alias": "shop-maria", "ref": {"apiVersion": "v1", "kind": "Secret", "name": "maria-conn"}},
             "task": {"name": "mariadb-restore-10.11"}}]}}),
    )
    .await;
    let restored = restore_finished(&fresh, "clone").await;
    let status = restored.status.expect("status");
    assert_eq!(status.phase, Some(RestorePhase::Succeeded), "{status:#?}");
    assert_eq!(status.restored_session.as_deref(), Some(name.as_str()));

    // Without what the post-backup hook wrote after the backup: not part of the set.
    let backed_up = |volume: &str| {
        let mut files = files(&volumes.path().join(volume));
        files.remove(Path::new(".hooks/post-hook"));
        files
    };
    let brought_back = files(&volumes.path().join("fresh-uploads"));
    let backed_up_site = backed_up("app-uploads");
    assert_eq!(file_names(&brought_back), file_names(&backed_up_site));
    assert!(brought_back == backed_up_site, "the site's files are byte-identical");
    assert!(brought_back.contains_key(Path::new(".hooks/pre-hook")), "the pre-backup hook ran before the backup");
    for ordinal in 0..2 {
        let (source, restored) = (format!("app-ledger-{ordinal}"), format!("fresh-ledger-{ordinal}"));
        let original = backed_up(&source);
        assert_eq!(original.get(Path::new("owner")).map(Vec::as_slice), Some(format!("ledger-{ordinal}\n").as_bytes()));
        assert!(files(&volumes.path().join(restored)) == original, "ledger-{ordinal}'s claim is byte-identical");
    }
    assert!(
        files(&volumes.path().join("fresh-archive")) == files(&volumes.path().join("app-archive")),
        "the archive PVC is byte-identical"
    );
    assert_eq!(psql(&fresh, ROWS_CHECKSUM), checksum, "the table's rows are identical");
    assert_eq!(maria_sql(&fresh, MARIA_CHECKSUM), maria_checksum, "MariaDB's rows are identical");

    stash_docs_wordpress(node_ip, rest.port, volumes.path()).await;
}

/// Batch `site` (with `spec`) of the web Deployment's `/data`, then the Deployment, until its Pod runs
/// with the sidecar.
async fn web_site(ns: &TestNamespace, spec: Value) {
    fixtures::batch(
        ns,
        "site",
        vec![json!({"target": {"alias": "web", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                               "paths": ["/data"], "volumeMounts": [{"name": "data", "mountPath": "/data"}]}})],
        spec,
    )
    .await;
    fixtures::create::<Deployment>(ns, web(1)).await;
    running_with_sidecar(ns, "web").await;
}

/// A batch whose Repository Secret is missing from the namespace: the application's Pod still starts
/// with the sidecar (its Secret volume is optional), and the sidecar's backup fails naming the Secret.
async fn secret_missing(node_ip: Ipv4Addr, rest_port: u16, volumes: &Path) {
    let ns = restricted_namespace("e2e-nosecret").await;
    repository(&ns, "repo", node_ip, rest_port, "e2e-nosecret").await;
    ns.api::<Secret>().delete("repo-secret", &Default::default()).await.expect("the Secret deleted");
    claim_on(&ns, "uploads", &volumes.join("nosecret-uploads")).await;
    web_site(&ns, json!({})).await;
    let (_, status) = session_run(&ns, "site").await;
    assert_eq!(status.phase, Some(BackupSessionPhase::Failed), "{status:#?}");
    let errors: Vec<_> = status.targets.iter().flat_map(|t| &t.stats).filter_map(|h| h.error.as_deref()).collect();
    assert!(
        errors.iter().any(|e| e.contains("repository Secret \"repo-secret\" is missing")),
        "the sidecar names the missing Secret: {status:#?}"
    );
}

/// Namespace `e2e-platform`'s Repository allows every namespace (usagePolicy). A tenant's workload
/// backs up into it on the node: its sidecar, as the workload's own ServiceAccount, and its finalize
/// Job, as the tenant's `stash-backup`, reach the platform's Repository and Lease only through the
/// grant the operator keeps there.
async fn shared_repository(node_ip: Ipv4Addr, rest_port: u16, volumes: &Path) {
    let platform = restricted_namespace("e2e-platform").await;
    repository(&platform, "shared", node_ip, rest_port, "e2e-shared").await;
    let allow_all = json!({"spec": {"usagePolicy": {"allowedNamespaces": {"from": "All"}}}});
    let shared = platform.api::<stash::api::Repository>();
    shared.patch("shared", &PatchParams::default(), &Patch::Merge(allow_all)).await.expect("shared");
    let tenant = restricted_namespace("e2e-tenant").await;
    fixtures::secret(&tenant, true).await;
    claim_on(&tenant, "uploads", &volumes.join("tenant-uploads")).await;
    web_site(&tenant, json!({"repository": {"name": "shared", "namespace": platform.name}})).await;
    let (name, status) = session_run(&tenant, "site").await;
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "{status:#?}");
    let sessions = tenant.api::<BackupSession>();
    let finalized = eventually("the tenant's session finalized", LIMIT, || {
        let (sessions, name) = (sessions.clone(), name.clone());
        async move {
            let status = sessions.get(&name).await.ok()?.status?;
            status.conditions.into_iter().find(|c| c.type_ == "SessionFinalized")
        }
    })
    .await;
    assert_eq!(finalized.status, stash::api::common::ConditionStatus::True, "{finalized:?}");
}

/// One of Stash's docs manifests (`../shared/stash-manifests`), verbatim but for its namespace.
fn stash_docs_manifest(file: &str, ns: &TestNamespace) -> Value {
    let path = support::repo_root().join("../shared/stash-manifests").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut document: Value = serde_yaml::from_str(&text).expect("a YAML document");
    document["metadata"]["namespace"] = json!(ns.name);
    document
}

/// Stash's WordPress Deployment, as its docs run it: the site in PVC `wordpress-storage` at
/// /var/www/html (here our toolbox image writes a small site there once).
fn wordpress_app() -> Value {
    let script = "cd /var/www/html && [ -f index.php ] || { echo '<?php echo 1;' > index.php; \
                  mkdir -p wp-content/uploads && head -c 500000 /dev/urandom > wp-content/uploads/photo.jpg; }; \
                  exec sleep infinity";
    let mut container = app_container(script);
    container["volumeMounts"] = json!([{"name": "storage", "mountPath": "/var/www/html"}]);
    json!({"metadata": {"name": "wordpress-app"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "wordpress"}},
        "template": {"metadata": {"labels": {"app": "wordpress"}}, "spec": restricted_pod(
            json!([container]),
            json!([{"name": "storage", "persistentVolumeClaim": {"claimName": "wordpress-storage"}}]))}}})
}

/// Issue 12: Stash's docs WordPress batch and restore, their BackupBatch and RestoreBatch verbatim
/// (namespace aside): a Deployment's PVC through the sidecar and a MySQL-protocol database through
/// an `AppBinding` (the CRD from the tests' own copy) with Stash's task names, backed up together and
/// restored in place, file for file and row for row. Stash's docs keep the repository in GCS; ours is
/// the Repository of the same name on the REST server.
async fn stash_docs_wordpress(node_ip: Ipv4Addr, rest_port: u16, volumes: &Path) {
    let _crd = support::app_binding::installed().await;
    let wp = restricted_namespace("e2e-wp").await;
    repository(&wp, "gcs-repo", node_ip, rest_port, "e2e-wordpress").await;
    claim_on(&wp, "wordpress-storage", &volumes.join("wp-storage")).await;
    mariadb(&wp).await;
    let rows = seed_maria(&wp, "post", 2000);
    let service = json!({"name": "maria", "port": 3306, "scheme": "mysql", "path": "/shop"});
    let binding = json!({"type": "kubedb.com/mysql", "version": "8.0.14", "secret": {"name": "maria-conn"},
                         "clientConfig": {"service": service}});
    support::app_binding::create(&wp, "wordpress-db", binding).await;
    let batch = stash_docs_manifest("docs-batch-backup-wordpress-backup-backupbatch.yaml", &wp);
    fixtures::create::<BackupBatch>(&wp, batch).await;
    fixtures::create::<Deployment>(&wp, wordpress_app()).await;
    running_with_sidecar(&wp, "wordpress").await;
    let site = volumes.join("wp-storage");
    eventually("the site written", LIMIT, || async {
        site.join("wp-content/uploads/photo.jpg").exists().then_some(())
    })
    .await;

    // An instant backup, as Stash's docs take one: a BackupSession of the batch.
    let session = stash::session::create_backup_session(wp.client.clone(), &wp.name, "wordpress-backup", None)
        .await
        .expect("a session");
    let name = kube::ResourceExt::name_any(&session);
    let sessions = wp.api::<BackupSession>();
    let status = eventually("the WordPress session finalized", LIMIT, || {
        let (sessions, name) = (sessions.clone(), name.clone());
        async move {
            let status = sessions.get(&name).await.ok()?.status?;
            let finalized = status.conditions.iter().any(|c| c.type_ == "SessionFinalized");
            (status.phase.is_some_and(|p| p.is_final()) && finalized).then_some(status)
        }
    })
    .await;
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "{status:#?}");
    let backed_up = files(&site);

    std::fs::write(site.join("index.php"), "defaced").expect("deface the site");
    std::fs::remove_file(site.join("wp-content/uploads/photo.jpg")).expect("lose an upload");
    maria_sql(&wp, "DELETE FROM items WHERE id % 2 = 0");
    assert_ne!(maria_sql(&wp, MARIA_CHECKSUM), rows);
    let restore = stash_docs_manifest("docs-batch-backup-wordpress-backup-restorebatch.yaml", &wp);
    fixtures::create::<RestoreBatch>(&wp, restore).await;
    let restored = restore_finished(&wp, "wordpress-restore").await;
    let status = restored.status.expect("status");
    assert_eq!(status.phase, Some(RestorePhase::Succeeded), "{status:#?}");
    assert_eq!(status.restored_session.as_deref(), Some(name.as_str()));
    assert!(files(&site) == backed_up, "the site is back, byte for byte");
    assert_eq!(maria_sql(&wp, MARIA_CHECKSUM), rows, "the posts are back, row for row");
}
