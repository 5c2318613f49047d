//! The test cluster's real node (`tests/cluster/cluster.sh up --node`; `scripts/test.sh` brings it up):
//! what a test needs to run Pods there.
//!
//! The node is tainted so that the other tests' Pods stay Pending as they did without a node; a test opts
//! its namespace in with [`schedule_on_node`]. Images are never pulled: [`import_images`] builds them with
//! `tests/images/build.sh` and imports them into the node's containerd (Pods use `imagePullPolicy: Never`).

use super::{TestNamespace, repo_root};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

/// The node's taint: only Pods tolerating it run there.
pub const TAINT: &str = "stash.local/test-node";

/// `helm --set` values under which the chart installs what `deploy/overlays/test-node` does: the locally
/// built image (never pulled) for the operator and its sidecars. The overlay's other change, the default
/// toleration of the operator's namespace, is no chart value: Helm makes the namespace, not the chart.
pub const CHART_VALUES: &str =
    "image.repository=stash.local/stash,image.tag=dev,sidecarImage.repository=stash.local/stash,sidecarImage.tag=dev";

/// The node's IP (its Pod bridge's gateway), where Pods reach servers on the host; `None` without a node.
pub fn node_ip() -> Option<Ipv4Addr> {
    let ip = std::env::var("STASH_NODE_IP").ok()?;
    Some(ip.parse().unwrap_or_else(|e| panic!("STASH_NODE_IP={ip:?}: {e}")))
}

/// Every Pod created in `ns` from now on tolerates the node's taint (PodTolerationRestriction adds it),
/// the Pods of Jobs and workloads the operator creates included.
pub async fn schedule_on_node(ns: &TestNamespace) {
    schedule_namespace_on_node(&ns.client, &ns.name).await;
}

/// [`schedule_on_node`] for a namespace that is not a test's own (the operator's).
pub async fn schedule_namespace_on_node(client: &Client, namespace: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let tolerations = json!([{"key": TAINT, "operator": "Exists"}]).to_string();
    let patch = json!({"metadata": {"annotations": {"scheduler.alpha.kubernetes.io/defaultTolerations": tolerations}}});
    namespaces.patch(namespace, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("namespace annotated");
}

/// Builds the named images (`tests/images/build.sh`, cached) and imports those this test binary has not
/// imported yet into the node.
pub fn import_images(images: &[&str]) {
    static IMPORTED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut imported = IMPORTED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let missing: Vec<&str> = images.iter().copied().filter(|image| !imported.contains(*image)).collect();
    if missing.is_empty() {
        return;
    }
    let built = Command::new(repo_root().join("tests/images/build.sh")).args(&missing).output().expect("build.sh runs");
    assert!(built.status.success(), "tests/images/build.sh failed: {}", String::from_utf8_lossy(&built.stderr));
    let archives = String::from_utf8(built.stdout).expect("UTF-8 paths");
    let import =
        Command::new(repo_root().join("tests/cluster/cluster.sh")).arg("import").args(archives.lines()).output();
    let import = import.expect("cluster.sh runs");
    assert!(import.status.success(), "cluster.sh import failed: {}", String::from_utf8_lossy(&import.stderr));
    imported.extend(missing.iter().map(|image| image.to_string()));
}

/// `kubectl ARGS` against the test cluster, as the admin.
pub fn kubectl(args: &[&str]) -> Output {
    Command::new(super::kubectl_path())
        .arg("--kubeconfig")
        .arg(&super::cluster().kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs")
}

/// `helm ARGS` against the test cluster, from the repository's root (chart paths are relative to it).
pub fn helm(args: &[&str]) -> Output {
    Command::new(super::helm_path())
        .current_dir(repo_root())
        .args(args)
        .env("KUBECONFIG", &super::cluster().kubeconfig)
        .output()
        .expect("helm runs")
}

/// Waits until the Pod runs, and returns it; panics with its status after `limit`.
pub async fn running(pods: &Api<Pod>, name: &str, limit: Duration) -> Pod {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let pod = pods.get(name).await.expect("get Pod");
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        if phase == "Running" {
            return pod;
        }
        assert!(tokio::time::Instant::now() < deadline, "Pod {name} is not Running: {:?}", pod.status);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
