//! The webhook's certificate as platform teams manage it, on the real node, with the operator installed
//! by `kubectl apply -k` of the shipped overlay (plus only `deploy/components/test-node`: the node's image
//! and toleration) and tasks creating Pods through the API server back to back meanwhile; no admission
//! may fail or miss the sidecar, and no operator container may restart. The delays from a new Secret to
//! every replica serving it are printed (`cargo test --test certificates_on_node -- --nocapture`).
//!
//! - cert-manager (built from its Go module, installed with its own chart: `support::cert_manager`)
//!   with `deploy/overlays/cert-manager` as written, but a serving certificate renewed every 30 s: it
//!   issues the CA and the serving certificate, its CA injector fills the caBundle, the replicas become
//!   ready and Pods get the sidecar; then it renews the serving certificate and rotates the CA, and each
//!   replica's certificate-expiry metric follows.
//! - Bring your own (`deploy/overlays/existing-secret`): the Secret replaced by hand in the three steps of
//!   certs/README.md, as a PKI job would.
//!
//! The two install the same operator, one after the other. Without a node (`STASH_NODE_IP` unset) they
//! say so and pass; `scripts/test.sh` always runs them with one.

mod support;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::json;
use stash::certs::{PemPair, generate_ca, issue_serving};
use std::time::{Duration, Instant};
use support::cert_manager::CertManager;
use support::node::{self, kubectl};
use support::webhook::{AdmissionLoad, ca_bundle, create_app_batch, webhook_is_effective};
use support::{TestNamespace, eventually};

const NAMESPACE: &str = support::OPERATOR_NAMESPACE;
/// Guards against hangs only.
const LIMIT: Duration = Duration::from_secs(180);
/// cert-manager's shortest accepted duration is 1h and renewBefore must stay under it: the serving
/// certificate is renewed 30 s after each issuance.
const LEAF_DURATION: &str = "1h";
const LEAF_RENEW_BEFORE: &str = "59m30s";
/// Leaf renewals before the CA rotates (whose leaf is one more).
const LEAF_RENEWALS: usize = 2;
const CERT_NOT_AFTER: &str = "stash_webhook_certificate_not_after_seconds";
const BUNDLE_NOT_AFTER: &str = "stash_webhook_ca_bundle_not_after_seconds";
const HELD: &str = "stash_webhook_certificate_held";

/// One operator install at a time: both tests install into `stash`.
static INSTALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The operator as `kubectl apply -k` of an overlay installs it on the node; everything but the CRDs
/// (which every test binary shares) removed when dropped.
struct Overlay {
    dir: tempfile::TempDir,
}

impl Overlay {
    /// `overlay` with the test node's component and JSON `patches` ({target, patch}).
    fn apply(overlay: &str, patches: serde_json::Value) -> Overlay {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = support::repo_root();
        let kustomization = json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [support::relative_to(dir.path(), &root.join(overlay))],
            "components": [support::relative_to(dir.path(), &root.join("deploy/components/test-node"))],
            "patches": patches,
        });
        std::fs::write(dir.path().join("kustomization.yaml"), kustomization.to_string()).expect("write");
        let dir_arg = dir.path().to_str().expect("UTF-8 path");
        let out = kubectl(&["apply", "--server-side", "--force-conflicts", "-k", dir_arg]);
        assert!(out.status.success(), "kubectl apply -k: {}", String::from_utf8_lossy(&out.stderr));
        Overlay { dir }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let rendered = kubectl(&["kustomize", self.dir.path().to_str().unwrap_or_default()]);
        let rendered = String::from_utf8_lossy(&rendered.stdout);
        let objects: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&rendered)
            .filter_map(|document| serde_json::Value::deserialize(document).ok())
            .filter(|object| object["kind"] != "CustomResourceDefinition" && object["kind"] != "Namespace")
            .collect();
        let file = self.dir.path().join("installed.json");
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        if std::fs::write(&file, list.to_string()).is_ok() {
            let file = file.to_str().unwrap_or_default();
            let out = kubectl(&["delete", "-f", file, "--ignore-not-found", "--timeout=120s"]);
            if !out.status.success() {
                eprintln!("kubectl delete: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let out = kubectl(&["delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=120s"]);
        if !out.status.success() {
            eprintln!("delete namespace {NAMESPACE}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

fn certificates(client: &kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate");
    Api::namespaced_with(client.clone(), NAMESPACE, &ApiResource::from_gvk(&gvk))
}

/// The Certificate `name` is Ready.
async fn certificate_ready(certificates: &Api<DynamicObject>, name: &str) {
    eventually(&format!("Certificate {name} to be Ready"), LIMIT, || async {
        let certificate = certificates.get(name).await.ok()?;
        let conditions = certificate.data["status"]["conditions"].as_array()?.clone();
        conditions.iter().any(|c| c["type"] == "Ready" && c["status"] == "True").then_some(())
    })
    .await;
}

/// Asks cert-manager to issue `name` again now, as `cmctl renew` does: the Issuing condition.
async fn renew(certificates: &Api<DynamicObject>, name: &str) {
    let certificate = certificates.get(name).await.expect("the Certificate");
    let mut conditions = certificate.data["status"]["conditions"].as_array().cloned().unwrap_or_default();
    conditions.push(json!({
        "type": "Issuing", "status": "True", "reason": "ManuallyTriggered",
        "message": "Certificate re-issuance manually triggered",
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second).expect("now").to_string(),
    }));
    let patch = json!({"status": {"conditions": conditions}});
    certificates.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("Issuing set");
}

fn not_after(pem: &[u8]) -> i64 {
    let der = CertificateDer::from_pem_slice(pem).expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    cert.validity().not_after.timestamp()
}

/// What an operator replica reports: the expiries of the certificate it serves and of the CA bundle it
/// published last, whether it holds a new certificate back, and its containers' restarts.
#[derive(Debug)]
struct Replica {
    serving: Option<i64>,
    bundle: Option<i64>,
    held: Option<i64>,
    restarts: i32,
}

async fn replicas(pods: &Api<Pod>) -> Vec<Replica> {
    let listed =
        pods.list(&ListParams::default().labels("app.kubernetes.io/name=stash-operator")).await.expect("list Pods");
    let mut replicas = Vec::new();
    for pod in listed {
        let Some(status) = pod.status else { continue };
        let Some(ip) = status.pod_ip else { continue };
        let restarts = status.container_statuses.iter().flatten().map(|c| c.restart_count).sum();
        let metrics = match reqwest::get(format!("http://{ip}:8080/metrics")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let gauge = |name: &str| {
            metrics.lines().find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok()).map(|s| s as i64)
        };
        replicas.push(Replica {
            serving: gauge(CERT_NOT_AFTER),
            bundle: gauge(BUNDLE_NOT_AFTER),
            held: gauge(HELD),
            restarts,
        });
    }
    replicas
}

/// The serving certificate cert-manager wrote: its PEM and its CA's.
struct Leaf {
    cert: Vec<u8>,
    ca: Vec<u8>,
}

async fn leaf(secrets: &Api<Secret>) -> Leaf {
    let data = secrets.get("stash-webhook-tls").await.expect("the Secret").data.unwrap_or_default();
    let key = |name: &str| data.get(name).map(|bytes| bytes.0.clone()).unwrap_or_default();
    Leaf { cert: key("tls.crt"), ca: key("ca.crt") }
}

/// Waits for the Secret's serving certificate to differ from `previous`; returns it and when seen.
async fn next_leaf(secrets: &Api<Secret>, previous: &Leaf) -> (Leaf, Instant) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let leaf = leaf(secrets).await;
        if !leaf.cert.is_empty() && leaf.cert != previous.cert {
            return (leaf, Instant::now());
        }
        assert!(Instant::now() < deadline, "no new serving certificate in {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long after `since` both replicas report what `done` accepts, and whether one held a new
/// certificate back meanwhile.
async fn every_replica(
    pods: &Api<Pod>,
    what: &str,
    since: Instant,
    done: impl Fn(&Replica) -> bool,
) -> (Duration, bool) {
    let mut held = false;
    loop {
        let replicas = replicas(pods).await;
        held |= replicas.iter().any(|replica| replica.held == Some(1));
        if replicas.len() >= 2 && replicas.iter().all(&done) {
            return (since.elapsed(), held);
        }
        assert!(since.elapsed() < LIMIT, "replicas do not {what}: {replicas:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long after `since` every replica serves a certificate expiring at `expiry` or later (cert-manager
/// may renew again before kubelet has projected the previous renewal).
async fn served_by_all(pods: &Api<Pod>, expiry: i64, since: Instant) -> (Duration, bool) {
    every_replica(pods, &format!("serve the certificate expiring at {expiry}"), since, |replica| {
        replica.serving.is_some_and(|served| served >= expiry)
    })
    .await
}

/// The operator's replicas are ready, and a dry-run Pod in a namespace with a batch gets the sidecar.
async fn operator_injects(client: &kube::Client, prefix: &str) -> TestNamespace {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    eventually("two ready operator replicas", LIMIT, || async {
        (deployments.get("stash-operator").await.ok()?.status?.ready_replicas? == 2).then_some(())
    })
    .await;
    let ns = TestNamespace::new(prefix).await;
    create_app_batch(&ns, &["app"]).await;
    webhook_is_effective(&ns.api::<Pod>()).await;
    ns
}

/// Stops the load and checks what it saw, and that no operator container restarted.
async fn no_failed_admission(load: AdmissionLoad, operator_pods: &Api<Pod>, during: &str) {
    let admissions = load.stop().await;
    eprintln!(
        "admissions during {during}: {} ({} with the sidecar, {} without, {} errors)",
        admissions.total(),
        admissions.injected,
        admissions.not_injected,
        admissions.errors
    );
    let replicas = replicas(operator_pods).await;
    assert!(replicas.iter().all(|replica| replica.restarts == 0), "an operator restarted: {replicas:?}");
    assert_eq!(admissions.failed(), 0, "no admission failed: {admissions:?}");
    assert!(admissions.injected >= 100, "the load kept the webhook busy: {admissions:?}");
}

/// With a node: this test's turn to install the operator, with its image on the node. Without one:
/// says so, and `None`.
async fn on_node() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    if node::node_ip().is_none() {
        eprintln!("skipped: no node (STASH_NODE_IP unset); scripts/test.sh runs this with one");
        return None;
    }
    let turn = INSTALL.lock().await;
    node::import_images(&["stash"]);
    Some(turn)
}

#[tokio::test(flavor = "multi_thread")]
async fn cert_manager_issues_injects_and_rotates_the_webhook_certificate_without_a_failed_admission() {
    let Some(_one_install) = on_node().await else { return };
    let _cert_manager = CertManager::install().await;
    let client = support::client().await;
    let started = Instant::now();
    let leaf_patch = json!([
        {"op": "replace", "path": "/spec/duration", "value": LEAF_DURATION},
        {"op": "replace", "path": "/spec/renewBefore", "value": LEAF_RENEW_BEFORE},
    ]);
    // A leaf from a new CA is served this long after the caBundle trusts it (default 1m).
    let delay_patch = json!([
        {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--ca-propagation-delay=5s"},
    ]);
    let _overlay = Overlay::apply(
        "deploy/overlays/cert-manager",
        json!([
            {"target": {"kind": "Certificate", "name": "stash-webhook"}, "patch": leaf_patch.to_string()},
            {"target": {"kind": "Deployment", "name": "stash-operator"}, "patch": delay_patch.to_string()},
        ]),
    );

    // The overlay as written: CA, serving certificate, caBundle, ready replicas, injected Pods.
    let certificates = certificates(&client);
    certificate_ready(&certificates, "stash-webhook-ca").await;
    certificate_ready(&certificates, "stash-webhook").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let ca = secrets.get("stash-webhook-ca").await.expect("the CA Secret").data.expect("data");
    let ca_pem = ca.get("tls.crt").expect("the CA certificate").0.clone();
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    eventually("the CA injector to fill caBundle with the CA", LIMIT, || async {
        (ca_bundle(&webhooks, "stash").await.as_deref() == Some(ca_pem.as_slice())).then_some(())
    })
    .await;
    let ns = operator_injects(&client, "cm-rotate").await;
    eprintln!("overlay applied -> Pods get the sidecar: {:.1} s", started.elapsed().as_secs_f64());

    // Renewals and a CA rotation under load.
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let load = AdmissionLoad::start(&ns.api::<Pod>(), 4);
    let mut current = leaf(&secrets).await;
    for renewal in 1..=LEAF_RENEWALS + 1 {
        let rotation = renewal == LEAF_RENEWALS + 1;
        if rotation {
            renew(&certificates, "stash-webhook-ca").await;
        }
        let (mut next, mut seen) = next_leaf(&secrets, &current).await;
        // A renewal already under way may still come from the old CA.
        while rotation && next.ca == current.ca {
            (next, seen) = next_leaf(&secrets, &next).await;
        }
        let (delay, held) = served_by_all(&operator_pods, not_after(&next.cert), seen).await;
        let what = if rotation { "leaf from a new CA" } else { "leaf renewed" };
        eprintln!("{what} ({renewal}): Secret updated -> served by every replica after {:.1} s", delay.as_secs_f64());
        // A renewal from the same CA is served at once; a leaf from a new CA waits for the caBundle.
        assert_eq!(held, rotation, "{what}: a replica held the new certificate back");
        // Wait for a renewal none serves yet: cert-manager renews faster than kubelet projects.
        let latest = leaf(&secrets).await;
        current = if rotation { next } else { latest };
    }
    // Old and new CA are trusted together until the old one expires.
    let published = ca_bundle(&webhooks, "stash").await.unwrap_or_default();
    no_failed_admission(load, &operator_pods, &format!("{LEAF_RENEWALS} renewals and a CA rotation")).await;
    assert_eq!(published, [current.ca.as_slice(), ca_pem.as_slice()].concat(), "caBundle: the new CA, then the old");
}

/// The Secret `stash-webhook-tls` as a platform team's tooling writes it: the pair and the CA bundle.
async fn write_tls_secret(secrets: &Api<Secret>, leaf: &PemPair, bundle: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "stash-webhook-tls", "namespace": NAMESPACE},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": bundle},
    }))
    .expect("a Secret");
    let params = PatchParams::apply("platform-pki").force();
    secrets.patch("stash-webhook-tls", &params, &Patch::Apply(&secret)).await.expect("Secret written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_replaced_by_hand_in_three_steps_rotates_the_ca_without_a_failed_admission() {
    let Some(_one_install) = on_node().await else { return };
    let client = support::client().await;
    const HOUR: Duration = Duration::from_secs(3600);
    // Different lifetimes tell the bundles apart by their earliest expiry (the replicas' metric).
    let (ca1, ca2) =
        (generate_ca("platform-ca-1", HOUR).expect("CA"), generate_ca("platform-ca-2", 2 * HOUR).expect("CA"));
    let names = ["stash-webhook.stash.svc".to_string(), "stash-webhook.stash.svc.cluster.local".to_string()];
    let leaf1 = issue_serving(&ca1, &names, &[], HOUR).expect("a leaf");
    // A later expiry tells the replicas' metric which leaf they serve.
    let leaf2 = issue_serving(&ca2, &names, &[], 2 * HOUR).expect("a leaf");
    let _overlay = Overlay::apply("deploy/overlays/existing-secret", json!([]));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    write_tls_secret(&secrets, &leaf1, &ca1.cert_pem).await;
    let ns = operator_injects(&client, "byo-rotate").await;
    // Kubelet updates a volume on the Pod's periodic sync once the Pod has settled (every minute by
    // default), but at once while its status still changes: rotate in the steady state users see.
    tokio::time::sleep(Duration::from_secs(30)).await;

    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let load = AdmissionLoad::start(&ns.api::<Pod>(), 4);
    let both = format!("{}{}", ca1.cert_pem, ca2.cert_pem);
    // 1. Both CAs: the caBundle is the API server's trust, whichever replica wrote it.
    write_tls_secret(&secrets, &leaf1, &both).await;
    let since = Instant::now();
    eventually("caBundle CA1+CA2", LIMIT, || async {
        (ca_bundle(&webhooks, "stash").await.as_deref() == Some(both.as_bytes())).then_some(())
    })
    .await;
    eprintln!("1. bundle CA1+CA2: Secret replaced -> caBundle after {:.1} s", since.elapsed().as_secs_f64());
    // 2. The leaf from CA2, on every replica.
    write_tls_secret(&secrets, &leaf2, &both).await;
    let (delay, _) = served_by_all(&operator_pods, not_after(leaf2.cert_pem.as_bytes()), Instant::now()).await;
    eprintln!("2. leaf from CA2: Secret replaced -> served by every replica after {:.1} s", delay.as_secs_f64());
    // 3. CA2 alone, once every replica has read it (none writes the old bundle back).
    write_tls_secret(&secrets, &leaf2, &ca2.cert_pem).await;
    let ca2_expiry = not_after(ca2.cert_pem.as_bytes());
    let (delay, _) = every_replica(&operator_pods, "publish CA2 alone", Instant::now(), |replica| {
        replica.bundle == Some(ca2_expiry)
    })
    .await;
    eprintln!("3. bundle CA2 only: Secret replaced -> read by every replica after {:.1} s", delay.as_secs_f64());
    // What a platform team waits before calling the rotation done: API servers read the caBundle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    no_failed_admission(load, &operator_pods, "a CA rotated by hand").await;
    assert_eq!(ca_bundle(&webhooks, "stash").await.as_deref(), Some(ca2.cert_pem.as_bytes()));
}
