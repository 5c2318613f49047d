//! `--self-signed-certs` against the real API server: the operator creates its CA and leaf in a Secret,
//! fills the webhook configuration's caBundle, and rotates leaf and CA (briefly trusting both CAs)
//! without a single handshake failing for a client that trusts the published caBundle.

mod support;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use stash::operator::CertificateSource;
use stash::webhook::self_signed::SelfSignedConfig;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use support::webhook::{ca_bundle, create_app_batch, handshake, mutates_dry_run_pod, register_webhook};
use support::{TestNamespace, eventually};

#[tokio::test]
async fn self_managed_certificates_rotate_without_a_failed_handshake() {
    let ns = TestNamespace::new("selfsigned").await;
    let configuration = format!("stash-selfsigned-{}", ns.name);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let webhooks = register_webhook(&ns, &configuration, port, None).await;
    create_app_batch(&ns, &["app"]).await;

    // Lifetimes short enough to see CA rotations and several leaf renewals within seconds.
    let config = SelfSignedConfig {
        namespace: ns.name.clone(),
        secret_name: "stash-webhook-certs".into(),
        webhook_configuration: configuration.clone(),
        dns_names: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().expect("IP")],
        leaf_lifetime: Duration::from_secs(4),
        ca_lifetime: Duration::from_secs(12),
        check_interval: Duration::from_millis(200),
        propagation_delay: Duration::from_secs(1),
    };
    let operator = support::operator::start_on(Some(port), Some(CertificateSource::SelfSigned(config)), None).await;

    let secret = ns.api::<Secret>().get("stash-webhook-certs").await.expect("the operator created its Secret");
    let keys: BTreeSet<String> = secret.data.unwrap_or_default().into_keys().collect();
    assert_eq!(keys, BTreeSet::from(["ca-bundle.crt", "ca.crt", "ca.key", "tls.crt", "tls.key"].map(String::from)));

    let api: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
    eventually("caBundle to be filled", Duration::from_secs(30), || ca_bundle(&api, &configuration)).await;
    let pods = ns.api::<Pod>();
    eventually("the API server to call the webhook", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { mutates_dry_run_pod(&pods).await.then_some(()) }
    })
    .await;

    let (mut leaves, mut cas, mut max_bundle) = (BTreeSet::new(), BTreeSet::new(), 0);
    let mut handshakes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        let bundle = ca_bundle(&api, &configuration).await.expect("caBundle stays set");
        let in_bundle: Vec<_> = CertificateDer::pem_slice_iter(&bundle).collect::<Result<_, _>>().expect("PEM");
        max_bundle = max_bundle.max(in_bundle.len());
        cas.extend(in_bundle.into_iter().map(|c| c.to_vec()));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let leaf = handshake(addr, &bundle).await.unwrap_or_else(|e| panic!("handshake {handshakes} failed: {e}"));
        leaves.insert(leaf.to_vec());
        handshakes += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(leaves.len() >= 4, "the leaf was renewed repeatedly ({} leaves)", leaves.len());
    assert!(cas.len() >= 2, "the CA was rotated ({} CAs seen)", cas.len());
    assert_eq!(max_bundle, 2, "old and new CA were trusted together during a rotation");
    assert!(mutates_dry_run_pod(&pods).await, "the API server still trusts the webhook after rotations");

    operator.stop().await;
    webhooks.delete(&configuration, &DeleteParams::default()).await.expect("cleanup");
}
