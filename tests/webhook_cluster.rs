//! The webhook registered with the real kube-apiserver: Pods the ReplicaSet controller creates for a
//! targeted Deployment carry the sidecar, others do not, and a stopped webhook fails open.

mod support;

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use stash::api::{BackupBatch, Repository};
use std::time::Duration;
use support::{TestNamespace, eventually, load_yaml};

/// `webhook-config/local.yaml`, pointed at `port`, trusting `ca_pem`, limited to one namespace.
async fn register_webhook(
    ns: &TestNamespace,
    port: u16,
    ca_pem: &[u8],
) -> Api<MutatingWebhookConfiguration> {
    let mut config = load_yaml("../../webhook-config/local.yaml");
    config["metadata"]["name"] = format!("stash-test-{}", ns.name).into();
    let webhook = &mut config["webhooks"][0];
    webhook["clientConfig"]["url"] = format!("https://127.0.0.1:{port}/mutate-pods").into();
    webhook["clientConfig"]["caBundle"] = base64::engine::general_purpose::STANDARD
        .encode(ca_pem)
        .into();
    webhook["namespaceSelector"] = json!({"matchLabels": {"kubernetes.io/metadata.name": ns.name}});
    let config: MutatingWebhookConfiguration =
        serde_json::from_value(config).expect("a webhook configuration");
    let api: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
    api.create(&PostParams::default(), &config)
        .await
        .expect("webhook configuration is created");
    api
}

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
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

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .is_some_and(|s| s.containers.iter().any(|c| c.name == "stash"))
}

async fn pod_of(pods: &Api<Pod>, app: &str) -> Pod {
    eventually(&format!("a Pod of {app}"), Duration::from_secs(60), || {
        let pods = pods.clone();
        let selector = format!("app={app}");
        async move {
            pods.list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .into_iter()
                .next()
        }
    })
    .await
}

/// A dry-run Pod that claims a ReplicaSet of Deployment `app`: it comes back with the sidecar once the
/// API server calls the webhook and the operator's caches hold the batch.
async fn webhook_is_effective(pods: &Api<Pod>) {
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
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually(
        "the webhook to mutate a dry-run Pod",
        Duration::from_secs(60),
        || {
            let (pods, probe, dry_run) = (pods.clone(), probe.clone(), dry_run.clone());
            async move {
                pods.create(&dry_run, &probe)
                    .await
                    .ok()
                    .filter(has_sidecar)
                    .map(|_| ())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn targeted_deployment_pods_get_the_sidecar_and_a_stopped_webhook_fails_open() {
    let ns = TestNamespace::new("webhook").await;
    let operator = support::operator::start().await;
    let webhooks = register_webhook(&ns, operator.webhook_addr.port(), &operator.ca_pem).await;

    let mut repository = load_yaml("valid/repository-rest.yaml");
    repository["metadata"]["namespace"] = ns.name.clone().into();
    let repository: Repository = serde_json::from_value(repository).expect("a Repository");
    ns.api::<Repository>()
        .create(&PostParams::default(), &repository)
        .await
        .expect("repository");
    let batch: BackupBatch = serde_json::from_value(json!({
        "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
        "metadata": {"name": "app-backup", "namespace": ns.name},
        "spec": {
            "repository": {"name": "rest-repo"},
            "schedule": "0 * * * *",
            "members": [
                {"target": {"alias": "app", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
                            "paths": ["/data"], "volumeMounts": [{"name": "data", "mountPath": "/data"}]}},
                {"target": {"alias": "late", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "late"},
                            "paths": ["/data"], "volumeMounts": [{"name": "data", "mountPath": "/data"}]}}
            ]
        }
    }))
    .expect("a BackupBatch");
    ns.api::<BackupBatch>()
        .create(&PostParams::default(), &batch)
        .await
        .expect("batch");

    let pods = ns.api::<Pod>();
    webhook_is_effective(&pods).await;

    let deployments = ns.api::<Deployment>();
    for name in ["app", "other"] {
        deployments
            .create(&PostParams::default(), &deployment(name))
            .await
            .expect("deployment");
    }
    let app = pod_of(&pods, "app").await;
    assert!(
        has_sidecar(&app),
        "the targeted Deployment's Pod carries the sidecar"
    );
    let sidecar = app
        .spec
        .as_ref()
        .expect("spec")
        .containers
        .iter()
        .find(|c| c.name == "stash")
        .expect("sidecar");
    assert_eq!(sidecar.image.as_deref(), Some("stash:test"));
    let data = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/data")
        .expect("target mount");
    assert_eq!(data.read_only, Some(true));
    let annotations = app.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("stash.appscode.com/backup-batch")
            .map(String::as_str),
        Some("app-backup")
    );
    assert!(
        !has_sidecar(&pod_of(&pods, "other").await),
        "an untargeted Deployment's Pod does not"
    );
    let metrics = operator.metrics().await;
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "stash_webhook_requests_total{operation=\"CREATE\",result=\"Allowed\",mutated=\"true\"}"
        )),
        "mutations are counted:\n{metrics}"
    );

    operator.stop().await;
    deployments
        .create(&PostParams::default(), &deployment("late"))
        .await
        .expect("deployment");
    let late = pod_of(&pods, "late").await;
    assert!(
        !has_sidecar(&late),
        "with the webhook down, Pods are still created, without the sidecar"
    );

    webhooks
        .delete(&format!("stash-test-{}", ns.name), &DeleteParams::default())
        .await
        .expect("cleanup");
}
