//! Stash's AppBinding CRD, from the tests' own copy (`tests/data/appcatalog/appbindings.yaml`):
//! stash never installs it, so tests choose whether it is there. Tests needing it present and the one
//! needing it absent take turns through one lock per test binary, and the CRD is removed when a test
//! that installed it ends: a later test, of this binary or another, finds the cluster without it.

use super::TestNamespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::time::Duration;

const CRD_NAME: &str = "appbindings.appcatalog.appscode.com";
const GROUP_VERSION: &str = "appcatalog.appscode.com/v1alpha1";

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This test's turn with the CRD in the state it asked for; removes an installed CRD when dropped.
pub struct Crd {
    installed: bool,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

/// Whether the API server serves AppBindings (what the operator asks discovery).
async fn served(client: &kube::Client) -> bool {
    client
        .list_api_group_resources(GROUP_VERSION)
        .await
        .is_ok_and(|l| l.resources.iter().any(|r| r.name == "appbindings"))
}

async fn wait_gone(crds: &Api<CustomResourceDefinition>, client: &kube::Client) {
    super::eventually("the AppBinding CRD to be gone", Duration::from_secs(120), || async {
        let gone = crds.get_opt(CRD_NAME).await.ok()?.is_none() && !served(client).await;
        gone.then_some(())
    })
    .await;
}

/// The CRD installed (idempotently: server-side apply of our copy) and served.
pub async fn installed() -> Crd {
    let turn = TURN.lock().await;
    let client = super::client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    // A CRD still being deleted (by an earlier test) cannot be applied again until it is gone.
    if crds.get_opt(CRD_NAME).await.expect("get CRD").is_some_and(|c| c.metadata.deletion_timestamp.is_some()) {
        wait_gone(&crds, &client).await;
    }
    let path = super::repo_root().join("tests/data/appcatalog/appbindings.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("the AppBinding CRD parses");
    let params = PatchParams::apply(super::FIELD_MANAGER).force();
    crds.patch(CRD_NAME, &params, &Patch::Apply(&crd)).await.expect("the AppBinding CRD applies");
    super::eventually("the AppBinding CRD to be served", Duration::from_secs(60), || async {
        served(&client).await.then_some(())
    })
    .await;
    Crd { installed: true, _turn: turn }
}

/// The CRD absent (deleted if an earlier run left it) and no longer served.
pub async fn absent() -> Crd {
    let turn = TURN.lock().await;
    let client = super::client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let _ = crds.delete(CRD_NAME, &DeleteParams::default()).await;
    wait_gone(&crds, &client).await;
    Crd { installed: false, _turn: turn }
}

impl Drop for Crd {
    fn drop(&mut self) {
        if !self.installed {
            return;
        }
        let kubeconfig = super::cluster().kubeconfig.clone();
        super::block_on(async move {
            let client = super::client_for(&kubeconfig).await;
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            let _ = crds.delete(CRD_NAME, &DeleteParams::default()).await;
            wait_gone(&crds, &client).await;
        });
    }
}

/// Creates AppBinding `name` with `spec` in `ns`.
pub async fn create(ns: &TestNamespace, name: &str, spec: Value) {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("appcatalog.appscode.com", "v1alpha1", "AppBinding"));
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": GROUP_VERSION, "kind": "AppBinding",
        "metadata": {"name": name, "namespace": ns.name}, "spec": spec,
    }))
    .expect("an AppBinding");
    api.create(&PostParams::default(), &object).await.expect("the AppBinding is created");
}
