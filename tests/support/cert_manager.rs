//! A real cert-manager on the test node: its controller, CA injector and webhook built from its Go module
//! (`tests/cluster/build.sh cert-manager`, cached), in images of their own, installed with its own Helm
//! chart, CRDs and RBAC from the same module into the namespace `cert-manager`.

use super::node::{self, helm, kubectl};
use super::{client, cluster_tool, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

const NAMESPACE: &str = "cert-manager";
const IMAGES: [&str; 3] = ["cert-manager-controller", "cert-manager-cainjector", "cert-manager-webhook"];
/// Guards against hangs only: the three Deployments start in seconds.
const LIMIT: Duration = Duration::from_secs(180);

/// The chart, with its version and CRDs filled in as cert-manager's release tooling does.
fn chart() -> &'static Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| cluster_tool(&["cert-manager"], "chart"))
}

/// The installed cert-manager; uninstalled when dropped, so the next test binary finds none.
pub struct CertManager;

impl CertManager {
    /// Installs cert-manager on the node and waits until its webhook admits a cert-manager object.
    pub async fn install() -> CertManager {
        node::import_images(&IMAGES);
        let out = kubectl(&["create", "namespace", NAMESPACE]);
        assert!(out.status.success(), "create namespace {NAMESPACE}: {}", String::from_utf8_lossy(&out.stderr));
        let client = client().await;
        node::schedule_namespace_on_node(&client, NAMESPACE).await;
        // The images are the local ones (never pulled); the startup check Job would need cmctl's image.
        let values = IMAGES
            .iter()
            .map(|image| {
                let key = match image.trim_start_matches("cert-manager-") {
                    "controller" => "image".to_string(),
                    component => format!("{component}.image"),
                };
                format!("{key}.repository=stash.local/{image},{key}.pullPolicy=Never")
            })
            .collect::<Vec<_>>()
            .join(",");
        let chart = chart().to_str().expect("a UTF-8 path");
        let installed = helm(&[
            "install",
            NAMESPACE,
            chart,
            "-n",
            NAMESPACE,
            "--set",
            &values,
            "--set",
            "startupapicheck.enabled=false",
        ]);
        assert!(
            installed.status.success(),
            "helm install cert-manager: {}",
            String::from_utf8_lossy(&installed.stderr)
        );
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
        for name in ["cert-manager", "cert-manager-cainjector", "cert-manager-webhook"] {
            eventually(&format!("{name} to be ready"), LIMIT, || {
                let deployments = deployments.clone();
                async move { (deployments.get(name).await.ok()?.status?.ready_replicas? >= 1).then_some(()) }
            })
            .await;
        }
        // Ready is not yet serving through the API server: its webhook must answer a dry-run create.
        let gvk = GroupVersionKind::gvk("cert-manager.io", "v1", "Issuer");
        let issuers: Api<DynamicObject> = Api::namespaced_with(client, NAMESPACE, &ApiResource::from_gvk(&gvk));
        let mut probe = DynamicObject::new("probe", &ApiResource::from_gvk(&gvk));
        probe.data = serde_json::json!({"spec": {"selfSigned": {}}});
        let dry_run = PostParams { dry_run: true, ..Default::default() };
        eventually("cert-manager's webhook to admit an Issuer", LIMIT, || async {
            issuers.create(&dry_run, &probe).await.ok().map(drop)
        })
        .await;
        CertManager
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        let out = helm(&["uninstall", NAMESPACE, "-n", NAMESPACE, "--ignore-not-found", "--wait", "--timeout=120s"]);
        if !out.status.success() {
            eprintln!("helm uninstall cert-manager: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = kubectl(&["delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=120s"]);
        if !out.status.success() {
            eprintln!("delete namespace {NAMESPACE}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
