//! Shared by the integration tests: one real control plane per test binary, a namespace per test.
//!
//! The cluster comes from `KUBECONFIG` when that is set (it must answer within a minute), otherwise from
//! `tests/cluster/cluster.sh up` (which reuses a running one). The CRDs are applied once.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::Deserialize;
use serde_json::Value;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub mod app_binding;
pub mod audit;
pub mod backends;
pub mod cert_manager;
pub mod data;
pub mod executors;
pub mod fixtures;
pub mod node;
pub mod operator;
pub mod throttle;
pub mod volume;
pub mod webhook;

pub const FIELD_MANAGER: &str = "stash-tests";

/// Where the test control plane's admin kubeconfig is, and the other facts `cluster.sh up` exports.
pub struct TestCluster {
    pub kubeconfig: PathBuf,
    /// The CA of the client certificate the API server presents to admission webhooks
    /// (`STASH_WEBHOOK_CLIENT_CA`); unknown for a cluster that does not export it.
    pub webhook_client_ca: Option<PathBuf>,
}

const WEBHOOK_CLIENT_CA: &str = "STASH_WEBHOOK_CLIENT_CA";

static CLUSTER: OnceLock<TestCluster> = OnceLock::new();

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target` as seen from `dir`, both absolute: kustomize refuses absolute paths.
pub fn relative_to(dir: &Path, target: &Path) -> PathBuf {
    let up: PathBuf = dir.components().skip(1).map(|_| std::path::Component::ParentDir).collect();
    up.join(target.strip_prefix("/").expect("an absolute path"))
}

/// Brings the cluster up (once per test binary) and installs the CRDs.
pub fn cluster() -> &'static TestCluster {
    CLUSTER.get_or_init(|| {
        // A set KUBECONFIG that does not answer is an error, not a reason to start another cluster: under
        // scripts/test.sh that `up` would replace the busy node cluster with a plain one.
        let cluster = match std::env::var_os("KUBECONFIG").map(PathBuf::from) {
            Some(kubeconfig) => {
                block_on(answers(kubeconfig.clone()));
                TestCluster { kubeconfig, webhook_client_ca: std::env::var_os(WEBHOOK_CLIENT_CA).map(PathBuf::from) }
            }
            None => start_local_cluster(),
        };
        block_on(install_crds(cluster.kubeconfig.clone()));
        block_on(install_rbac(cluster.kubeconfig.clone()));
        block_on(refuse_beside_another_operator(cluster.kubeconfig.clone()));
        cluster
    })
}

/// `cluster.sh up` prints the cluster's facts as the `export NAME=value` lines a shell evaluates.
fn start_local_cluster() -> TestCluster {
    let script = repo_root().join("tests/cluster/cluster.sh");
    let up = Command::new(&script).arg("up").stderr(Stdio::inherit()).output().expect("cluster.sh runs");
    assert!(up.status.success(), "tests/cluster/cluster.sh up failed");
    let exports = String::from_utf8(up.stdout).expect("UTF-8 exports");
    let exported = |name: &str| {
        exports
            .lines()
            .find_map(|line| line.strip_prefix("export ")?.strip_prefix(name)?.strip_prefix('='))
            .map(PathBuf::from)
    };
    TestCluster {
        kubeconfig: exported("KUBECONFIG").expect("cluster.sh up exports KUBECONFIG"),
        webhook_client_ca: exported(WEBHOOK_CLIENT_CA),
    }
}

/// Runs a future to completion on a runtime of its own, on a thread of its own, so that it works
/// both inside and outside the tests' tokio runtimes.
pub fn block_on<F: Future + Send + 'static>(future: F) -> F::Output
where
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(future)
    })
    .join()
    .expect("the helper thread finished")
}

pub async fn client_for(kubeconfig: &Path) -> Client {
    Client::try_from(config_for(kubeconfig).await).expect("a client")
}

pub async fn config_for(kubeconfig: &Path) -> Config {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("kubeconfig is readable");
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig is valid")
}

/// A client for the test cluster, bound to the calling test's runtime.
pub async fn client() -> Client {
    client_for(&cluster().kubeconfig).await
}

/// Waits for the API server `kubeconfig` names to answer `/version` (a loaded machine may miss one
/// request); a minute without an answer fails the test binary, naming the kubeconfig.
async fn answers(kubeconfig: PathBuf) {
    let client = client_for(&kubeconfig).await;
    let what = format!("KUBECONFIG={} to answer (unset it to let the tests start a cluster)", kubeconfig.display());
    eventually(&what, Duration::from_secs(60), || {
        let client = client.clone();
        async move { client.apiserver_version().await.ok() }
    })
    .await;
}

async fn install_crds(kubeconfig: PathBuf) {
    let client = client_for(&kubeconfig).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in stash::api::crds() {
        let name = crd.metadata.name.clone().expect("CRDs are named");
        crds.patch(&name, &params, &Patch::Apply(&crd)).await.expect("CRD applies");
    }
    for crd in stash::api::crds() {
        let name = crd.metadata.name.clone().expect("CRDs are named");
        eventually(&format!("CRD {name} Established"), Duration::from_secs(60), || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let crd = crds.get(&name).await.ok()?;
                let conditions = crd.status?.conditions?;
                conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
            }
        })
        .await;
    }
}

/// Everything of deploy/base/rbac.yaml (the operator's identity in `stash`, its roles, and the
/// ClusterRoles it binds its executors to), so that the operator and the executors run here under
/// the rights they get in production.
async fn install_rbac(kubeconfig: PathBuf) {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let client = client_for(&kubeconfig).await;
    operator_namespace(&client).await;
    let path = repo_root().join("deploy/base/rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let objects: Vec<DynamicObject> = serde_yaml::Deserializer::from_str(&text)
        .map(|document| DynamicObject::deserialize(document).expect("rbac.yaml parses"))
        .collect();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for object in objects {
        let types = object.types.clone().expect("apiVersion and kind");
        let (group, version) = types.api_version.rsplit_once('/').unwrap_or(("", &types.api_version));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
        let api: Api<DynamicObject> = match &object.metadata.namespace {
            Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let name = object.metadata.name.clone().expect("named");
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("{} {name}: {e}", types.kind));
    }
}

/// The operator's namespace, live: the end-to-end test deletes it when it uninstalls, and a test
/// binary started meanwhile waits for that to finish before making it again.
async fn operator_namespace(client: &Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    eventually("namespace stash to be usable", Duration::from_secs(180), || {
        let namespaces = namespaces.clone();
        async move {
            match namespaces.get_opt(OPERATOR_NAMESPACE).await.ok()? {
                Some(existing) => existing.metadata.deletion_timestamp.is_none().then_some(()),
                None => {
                    let namespace = Namespace {
                        metadata: kube::api::ObjectMeta { name: Some(OPERATOR_NAMESPACE.into()), ..Default::default() },
                        ..Default::default()
                    };
                    namespaces.create(&PostParams::default(), &namespace).await.ok().map(drop)
                }
            }
        }
    })
    .await;
}

/// A binary of the test cluster's tools, built (once, then cached) by `tests/cluster/build.sh [mode]`.
fn cluster_tool(mode: &[&str], name: &str) -> PathBuf {
    let script = repo_root().join("tests/cluster/build.sh");
    let out = Command::new(script).args(mode).output().expect("tests/cluster/build.sh runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tests/cluster/build.sh {} failed: {stderr}", mode.join(" "));
    PathBuf::from(String::from_utf8(out.stdout).expect("UTF-8 path").trim()).join(name)
}

/// The control plane's kubectl.
pub fn kubectl_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| cluster_tool(&[], "kubectl"))
}

/// helm, for the chart's tests (`scripts/test.sh` builds it before the tests run).
/// `kubectl stash <args>` through the real kubectl, with the built plugin first on PATH.
pub fn kubectl_stash(kubeconfig: &Path, args: &[&str]) -> Command {
    let plugin = PathBuf::from(env!("CARGO_BIN_EXE_kubectl-stash"));
    let dir = plugin.parent().expect("the plugin's directory");
    let path = std::env::join_paths(
        std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .expect("PATH");
    let mut command = Command::new(kubectl_path());
    command.arg("stash").args(args).env("PATH", path).env("KUBECONFIG", kubeconfig).env("RUST_LOG", "warn");
    command
}

pub fn helm_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| cluster_tool(&["helm"], "helm"))
}

/// promtool, for the monitoring tests' rule checks (`scripts/test.sh` builds it before the tests run).
pub fn promtool_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| cluster_tool(&["promtool"], "promtool"))
}

/// Where deploy/ installs the operator, and where the tests' operators keep their Leases.
pub const OPERATOR_NAMESPACE: &str = "stash";

/// A client configuration with the `stash-operator` ServiceAccount's credentials (a fresh TokenRequest token):
/// the tests' operators run with exactly the shipped RBAC.
pub async fn operator_config() -> Config {
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = operator_kubeconfig(dir.path()).await;
    config_for(&kubeconfig).await
}

/// The same as a kubeconfig file in `dir`, for an operator process.
pub async fn operator_kubeconfig(dir: &Path) -> PathBuf {
    executors::service_account_kubeconfig(OPERATOR_NAMESPACE, "stash-operator", dir).await
}

/// Labels every test namespace: a Lease outside such namespaces belongs to an operator of the cluster.
const TEST_NAMESPACE_LABEL: &str = "stash-tests/namespace";

/// Tests run their own controllers, each limited to its test's namespace. An operator watching the
/// whole cluster (`scripts/demo.sh` leaves one running) would act on the tests' objects too — run
/// hooks, create Jobs — so the tests refuse to start beside one, and say which.
async fn refuse_beside_another_operator(kubeconfig: PathBuf) {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::all(client_for(&kubeconfig).await);
    let namespaces: Api<Namespace> = Api::all(client_for(&kubeconfig).await);
    let held = leases.list(&Default::default()).await.expect("list Leases").items;
    for lease in held.iter().filter(|l| l.metadata.name.as_deref() == Some("stash-operator")) {
        let spec = lease.spec.clone().unwrap_or_default();
        let Some(holder) = spec.holder_identity.filter(|h| !h.is_empty()) else { continue };
        let namespace = lease.metadata.namespace.clone().unwrap_or_default();
        let is_test = namespaces
            .get_opt(&namespace)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.metadata.labels)
            .is_some_and(|labels| labels.contains_key(TEST_NAMESPACE_LABEL));
        let fresh = spec.renew_time.is_some_and(|t| {
            k8s_openapi::jiff::Timestamp::now().duration_since(t.0) < k8s_openapi::jiff::SignedDuration::from_secs(60)
        });
        assert!(
            is_test || !fresh,
            "operator {holder:?} (Lease {namespace}/stash-operator) watches this cluster and would act on the \
             tests' objects too; run the tests on a cluster of their own (scripts/test.sh does) or stop it \
             (scripts/demo.sh down)"
        );
    }
}

/// Polls `probe` until it yields a value; panics naming `what` after `limit` (a hang guard, not a
/// performance assertion).
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A namespace of its own for one test, deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

impl TestNamespace {
    /// Creates `<prefix>-<pid>-<n>` and waits for its default ServiceAccount (Pods need it).
    pub async fn new(prefix: &str) -> Self {
        let client = client().await;
        let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = serde_json::from_value(
            serde_json::json!({"metadata": {"name": name, "labels": {TEST_NAMESPACE_LABEL: "true"}}}),
        )
        .expect("a namespace");
        namespaces.create(&PostParams::default(), &namespace).await.expect("namespace is created");
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        eventually("the default ServiceAccount", Duration::from_secs(60), || {
            let accounts = accounts.clone();
            async move { accounts.get_opt("default").await.ok().flatten() }
        })
        .await;
        Self { name, client }
    }

    /// Like `new`, for a namespace that enforces Pod Security `restricted`.
    pub async fn restricted(prefix: &str) -> Self {
        let ns = Self::new(prefix).await;
        let enforce = serde_json::json!({"metadata": {"labels": {
            "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}});
        Api::<Namespace>::all(ns.client.clone())
            .patch(&ns.name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&enforce))
            .await
            .expect("label the namespace");
        ns
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        let kubeconfig = cluster().kubeconfig.clone();
        block_on(async move {
            let namespaces: Api<Namespace> = Api::all(client_for(&kubeconfig).await);
            // Best effort: the namespace controller finishes the deletion in the background.
            let _ = namespaces.delete(&name, &DeleteParams::background()).await;
        });
    }
}

/// Reads a YAML file under `tests/data/`.
pub fn load_yaml(relative: &str) -> Value {
    let path = repo_root().join("tests/data").join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Drops what Go's `omitempty` drops (false, empty lists and maps, null), so both sides compare alike.
pub fn without_empty(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, without_empty(v))).filter(|(_, v)| !is_empty(v)).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(without_empty).collect()),
        other => other,
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(map) => map.is_empty(),
        _ => false,
    }
}
