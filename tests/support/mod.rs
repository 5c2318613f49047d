//! Shared by the integration tests: one real control plane per test binary, a namespace per test.
//!
//! The cluster comes from `KUBECONFIG` when that points at a live API server, otherwise from
//! `tests/cluster/cluster.sh up` (which reuses a running one). The CRDs are applied once.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::Value;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub mod backends;
pub mod executors;
pub mod fixtures;
pub mod operator;
pub mod webhook;

pub const FIELD_MANAGER: &str = "stash-tests";

/// Where the test control plane's admin kubeconfig is.
pub struct TestCluster {
    pub kubeconfig: PathBuf,
}

static CLUSTER: OnceLock<TestCluster> = OnceLock::new();

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Brings the cluster up (once per test binary) and installs the CRDs.
pub fn cluster() -> &'static TestCluster {
    CLUSTER.get_or_init(|| {
        let kubeconfig = match std::env::var_os("KUBECONFIG").map(PathBuf::from) {
            Some(path) if block_on(api_reachable(path.clone())) => path,
            _ => start_local_cluster(),
        };
        block_on(install_crds(kubeconfig.clone()));
        TestCluster { kubeconfig }
    })
}

fn start_local_cluster() -> PathBuf {
    let script = repo_root().join("tests/cluster/cluster.sh");
    let up = Command::new(&script).arg("up").status().expect("cluster.sh runs");
    assert!(up.success(), "tests/cluster/cluster.sh up failed");
    let out = Command::new(&script).arg("kubeconfig").output().expect("cluster.sh runs");
    PathBuf::from(String::from_utf8(out.stdout).expect("UTF-8 path").trim())
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
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("kubeconfig is readable");
    let config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig is valid");
    Client::try_from(config).expect("a client")
}

/// A client for the test cluster, bound to the calling test's runtime.
pub async fn client() -> Client {
    client_for(&cluster().kubeconfig).await
}

async fn api_reachable(kubeconfig: PathBuf) -> bool {
    let Ok(kubeconfig) = Kubeconfig::read_from(&kubeconfig) else {
        return false;
    };
    let Ok(config) = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await else {
        return false;
    };
    let Ok(client) = Client::try_from(config) else {
        return false;
    };
    client.apiserver_version().await.is_ok()
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
        let namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("a namespace");
        namespaces.create(&PostParams::default(), &namespace).await.expect("namespace is created");
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        eventually("the default ServiceAccount", Duration::from_secs(60), || {
            let accounts = accounts.clone();
            async move { accounts.get_opt("default").await.ok().flatten() }
        })
        .await;
        Self { name, client }
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
