//! The webhook registered with the real kube-apiserver: Pods the ReplicaSet controller creates for a
//! targeted Deployment carry the sidecar, others do not, and a stopped webhook fails open.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use support::TestNamespace;
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
