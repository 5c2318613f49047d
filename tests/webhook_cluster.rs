//! The webhook registered with the real kube-apiserver: Pods the ReplicaSet controller creates for a
//! targeted Deployment carry the sidecar, others do not, a stopped webhook fails open, and a webhook
//! started with a client CA answers the API server alone.

mod support;

use base64::Engine;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use stash::webhook::client_auth::ClientAuth;
use std::time::Duration;
use support::TestNamespace;
use support::operator::RunningOperator;
use support::webhook::{create_app_batch, deployment, has_sidecar, pod_of, register_webhook, webhook_is_effective};

#[tokio::test]
async fn targeted_deployment_pods_get_the_sidecar_and_a_stopped_webhook_fails_open() {
    let ns = TestNamespace::new("webhook").await;
    let operator = support::operator::start().await;
    let name = format!("stash-test-{}", ns.name);
    let webhooks = register_webhook(&ns, &name, operator.webhook_addr.port(), Some(&operator.ca_pem)).await;
    create_app_batch(&ns, &["app", "late"]).await;
    let pods = ns.api::<Pod>();
    webhook_is_effective(&pods).await;

    let deployments = ns.api::<Deployment>();
    for name in ["app", "other"] {
        deployments.create(&PostParams::default(), &deployment(name, 1)).await.expect("deployment");
    }
    let app = pod_of(&pods, "app").await;
    assert!(has_sidecar(&app), "the targeted Deployment's Pod carries the sidecar");
    let sidecar = app.spec.as_ref().expect("spec").containers.iter().find(|c| c.name == "stash").expect("sidecar");
    assert_eq!(sidecar.image.as_deref(), Some("stash:test"));
    let data = sidecar.volume_mounts.iter().flatten().find(|m| m.mount_path == "/data").expect("target mount");
    assert_eq!(data.read_only, Some(true));
    let annotations = app.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("stash.appscode.com/backup-batch").map(String::as_str), Some("app-backup"));
    let labels = app.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("stash.appscode.com/sidecar").map(String::as_str), Some("injected"));
    assert!(!has_sidecar(&pod_of(&pods, "other").await), "an untargeted Deployment's Pod does not");
    let metrics = operator.metrics().await;
    let mutated = "stash_webhook_requests_total{operation=\"CREATE\",result=\"Allowed\",mutated=\"true\"}";
    assert!(metrics.lines().any(|l| l.starts_with(mutated)), "mutations are counted:\n{metrics}");

    operator.stop().await;
    deployments.create(&PostParams::default(), &deployment("late", 1)).await.expect("deployment");
    let late = pod_of(&pods, "late").await;
    assert!(!has_sidecar(&late), "with the webhook down, Pods are still created, without the sidecar");

    webhooks.delete(&name, &DeleteParams::default()).await.expect("cleanup");
}

/// M7: a webhook started with a client CA answers the API server, which presents a certificate that CA
/// signed, and nobody else: a client in the cluster posting a crafted review for a member's Pod would
/// otherwise get back the patch, with the member's env values, Secret name and volumes.
#[tokio::test]
async fn with_a_client_ca_only_the_api_server_is_answered() {
    let ns = TestNamespace::new("webhook-auth").await;
    let ca_file = support::cluster().webhook_client_ca.clone().expect(
        "the cluster names the CA of the API server's webhook client certificate (STASH_WEBHOOK_CLIENT_CA, \
         exported by tests/cluster/cluster.sh up)",
    );
    let operator = support::operator::start_with_client_auth(ClientAuth { ca_file, names: Vec::new() }).await;
    let name = format!("stash-test-{}", ns.name);
    let webhooks = register_webhook(&ns, &name, operator.webhook_addr.port(), Some(&operator.ca_pem)).await;
    create_app_batch(&ns, &["app"]).await;
    let pods = ns.api::<Pod>();
    webhook_is_effective(&pods).await;
    ns.api::<Deployment>().create(&PostParams::default(), &deployment("app", 1)).await.expect("deployment");
    assert!(has_sidecar(&pod_of(&pods, "app").await), "the API server's own Pod creations are still mutated");

    let crafted = review_without_certificate(&operator, &ns.name).await;
    assert!(crafted.is_err(), "a client without a certificate was answered with the patch {crafted:?}");

    webhooks.delete(&name, &DeleteParams::default()).await.expect("cleanup");
}

/// POSTs, as any client that reaches the webhook could, a review of a Pod of the Deployment `app` in
/// `namespace`, and returns the JSON patch it is answered with.
async fn review_without_certificate(operator: &RunningOperator, namespace: &str) -> reqwest::Result<String> {
    let ca = reqwest::Certificate::from_pem(&operator.ca_pem).expect("CA PEM");
    // The timeout guards against a hang; it measures nothing.
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "crafted", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
            "namespace": namespace,
            "object": {
                "metadata": {"name": "crafted", "labels": {"pod-template-hash": "crafted1"},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "app-crafted1",
                                                  "uid": "00000000-0000-0000-0000-000000000002", "controller": true}]},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}],
                         "volumes": [{"name": "data", "emptyDir": {}}]}
            }
        }
    });
    let url = format!("https://localhost:{}/mutate-pods", operator.webhook_addr.port());
    let answer: serde_json::Value = client.post(url).json(&review).send().await?.json().await?;
    let patch = answer["response"]["patch"].as_str().unwrap_or_default();
    let patch = base64::engine::general_purpose::STANDARD.decode(patch).expect("a base64 patch");
    Ok(String::from_utf8_lossy(&patch).into_owned())
}
