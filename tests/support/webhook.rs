//! Webhook test helpers: register the local webhook configuration, create a batch, probe injection.

use super::{TestNamespace, eventually, load_yaml};
use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use stash::api::{BackupBatch, Repository};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `webhook-config/local.yaml` named `name`, pointed at `port`, trusting `ca_pem` (none: left for the
/// operator to fill), limited to the test's namespace.
pub async fn register_webhook(
    ns: &TestNamespace,
    name: &str,
    port: u16,
    ca_pem: Option<&[u8]>,
) -> Api<MutatingWebhookConfiguration> {
    let mut config = load_yaml("../../webhook-config/local.yaml");
    config["metadata"]["name"] = name.into();
    let webhook = &mut config["webhooks"][0];
    webhook["clientConfig"]["url"] = format!("https://127.0.0.1:{port}/mutate-pods").into();
    match ca_pem {
        Some(ca) => webhook["clientConfig"]["caBundle"] = base64::engine::general_purpose::STANDARD.encode(ca).into(),
        None => drop(webhook["clientConfig"].as_object_mut().expect("clientConfig").remove("caBundle")),
    }
    webhook["namespaceSelector"] = json!({"matchLabels": {"kubernetes.io/metadata.name": ns.name}});
    let config: MutatingWebhookConfiguration = serde_json::from_value(config).expect("a webhook configuration");
    let api: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
    api.create(&PostParams::default(), &config).await.expect("webhook configuration is created");
    api
}

/// A REST Repository and BackupBatch `app-backup` whose members are the Deployments `targets`.
pub async fn create_app_batch(ns: &TestNamespace, targets: &[&str]) {
    let mut repository = load_yaml("valid/repository-rest.yaml");
    repository["metadata"]["namespace"] = ns.name.clone().into();
    let repository: Repository = serde_json::from_value(repository).expect("a Repository");
    ns.api::<Repository>().create(&PostParams::default(), &repository).await.expect("repository");
    let members: Vec<_> = targets
        .iter()
        .map(|name| {
            json!({"target": {"alias": name, "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                              "paths": ["/data"], "volumeMounts": [{"name": "data", "mountPath": "/data"}]}})
        })
        .collect();
    let batch: BackupBatch = serde_json::from_value(json!({
        "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
        "metadata": {"name": "app-backup", "namespace": ns.name},
        "spec": {"repository": {"name": "rest-repo"}, "schedule": "0 * * * *", "members": members}
    }))
    .expect("a BackupBatch");
    ns.api::<BackupBatch>().create(&PostParams::default(), &batch).await.expect("batch");
}

/// A Deployment of `replicas` Pods labelled `app=<name>` that mount an emptyDir `data` at /data.
pub fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [{"name": "app", "image": "registry.invalid/app:1",
                                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}]
                }
            }
        }
    }))
    .expect("a Deployment")
}

pub fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| s.containers.iter().any(|c| c.name == "stash"))
}

/// The first Pod labelled `app=<app>`, once there is one.
pub async fn pod_of(pods: &Api<Pod>, app: &str) -> Pod {
    eventually(&format!("a Pod of {app}"), Duration::from_secs(60), || {
        let pods = pods.clone();
        let selector = format!("app={app}");
        async move { pods.list(&ListParams::default().labels(&selector)).await.ok()?.items.into_iter().next() }
    })
    .await
}

/// A dry-run Pod that claims a ReplicaSet of Deployment `app` comes back with the sidecar: the API
/// server calls the webhook, trusts its certificate, and the operator's caches hold the batch.
pub async fn mutates_dry_run_pod(pods: &Api<Pod>) -> bool {
    dry_run_probe(pods).await.is_ok_and(|injected| injected)
}

/// Creates (dry run) a Pod that claims a ReplicaSet of Deployment `app`; whether it came back with the
/// sidecar. The webhook fails open, so a call the API server could not make shows as `Ok(false)`.
pub async fn dry_run_probe(pods: &Api<Pod>) -> kube::Result<bool> {
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "probe", "labels": {"pod-template-hash": "probe1"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "app-probe1",
                                 "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]
        },
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}],
                 "volumes": [{"name": "data", "emptyDir": {}}]}
    }))
    .expect("a Pod");
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    pods.create(&dry_run, &probe).await.map(|pod| has_sidecar(&pod))
}

/// Waits until [`mutates_dry_run_pod`] holds (the API server picks up configurations asynchronously).
pub async fn webhook_is_effective(pods: &Api<Pod>) {
    eventually("the webhook to mutate a dry-run Pod", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { mutates_dry_run_pod(&pods).await.then_some(()) }
    })
    .await;
}

/// The caBundle of the first webhook of the configuration `name`, unless unset or empty.
pub async fn ca_bundle(api: &Api<MutatingWebhookConfiguration>, name: &str) -> Option<Vec<u8>> {
    let configuration = api.get(name).await.ok()?;
    let bundle = configuration.webhooks?.into_iter().next()?.client_config.ca_bundle?;
    (!bundle.0.is_empty()).then_some(bundle.0)
}

/// Handshakes with 127.0.0.1 trusting exactly `bundle`; returns the leaf served.
pub async fn handshake(addr: SocketAddr, bundle: &[u8]) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().ok_or("no chain")?[0].clone().into_owned())
}

/// What an [`AdmissionLoad`] saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Admissions {
    /// Admitted with the sidecar: the API server called the webhook and trusted its certificate.
    pub injected: usize,
    /// Admitted without it: the call failed and the webhook's `failurePolicy: Ignore` let the Pod in.
    pub not_injected: usize,
    /// Refused, or the API server did not answer.
    pub errors: usize,
}

impl Admissions {
    pub fn total(self) -> usize {
        self.injected + self.not_injected + self.errors
    }

    pub fn failed(self) -> usize {
        self.not_injected + self.errors
    }
}

/// Dry-run Pod creations through the API server, back to back on a few tasks, until stopped: each
/// one is an admission the webhook must answer with the sidecar ([`dry_run_probe`]).
pub struct AdmissionLoad {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Admissions>>,
}

impl AdmissionLoad {
    pub fn start(pods: &Api<Pod>, workers: usize) -> Self {
        let stop = CancellationToken::new();
        let tasks = (0..workers)
            .map(|_| {
                let (pods, stop) = (pods.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut seen = Admissions::default();
                    while !stop.is_cancelled() {
                        match dry_run_probe(&pods).await {
                            Ok(true) => seen.injected += 1,
                            Ok(false) => seen.not_injected += 1,
                            Err(err) => {
                                eprintln!("admission failed: {err}");
                                seen.errors += 1;
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        Self { stop, tasks }
    }

    pub async fn stop(self) -> Admissions {
        self.stop.cancel();
        let mut all = Admissions::default();
        for task in self.tasks {
            let seen = task.await.expect("a load task");
            all.injected += seen.injected;
            all.not_injected += seen.not_injected;
            all.errors += seen.errors;
        }
        all
    }
}
