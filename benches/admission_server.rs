//! Load target for `bench/webhook.sh`: the real admission webhook answering from caches that hold
//! 1,000 BackupBatches (3 members each, over 100 namespaces), or — the practical ceiling — a no-op
//! server on the same axum + rustls stack returning a fixed response of the same size.
//!
//! Prints the bound port on stdout, writes a realistic ~5 KB Pod AdmissionReview to --body-out, and
//! serves until stdin closes.

use axum::Router;
use axum::routing::post;
use clap::{Parser, ValueEnum};
use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};
use stash::api::{BackupBatch, Repository};
use stash::metrics::Metrics;
use stash::webhook::decision::Catalog;
use stash::webhook::mutate::Mutator;
use stash::webhook::routes;
use stash::webhook::server::{ConnectionLimits, serve_tls};
use stash::webhook::tls::{ServingCertificate, server_config};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Webhook,
    Noop,
    /// No server: time `Mutator::review` alone and print the mean CPU cost per review.
    Inline,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    body_out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    batches: usize,
    // `cargo bench` passes --bench; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

const NAMESPACES: usize = 100;

fn catalog(batches: usize) -> Catalog {
    let mut batch_store = Writer::<BackupBatch>::default();
    let mut repo_store = Writer::<Repository>::default();
    let mut rs_store = Writer::<PartialObjectMeta<ReplicaSet>>::default();
    for ns in 0..NAMESPACES {
        let repo: Repository = serde_json::from_value(json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo", "namespace": format!("team-{ns}"), "uid": format!("repo-{ns}"), "resourceVersion": "1"},
            "spec": {"backend": {"storageSecretName": "repo-secret", "s3": {"endpoint": "s3.example", "bucket": "b"}}}
        }))
        .expect("repository");
        repo_store.apply_watcher_event(&Event::Apply(repo));
    }
    for i in 0..batches {
        let ns = format!("team-{}", i % NAMESPACES);
        let batch: BackupBatch = serde_json::from_value(json!({
            "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
            "metadata": {"name": format!("app-{i}-backup"), "namespace": ns, "uid": format!("batch-{i}"), "resourceVersion": "1"},
            "spec": {"repository": {"name": "repo"}, "schedule": "*/30 * * * *", "members": [
                {"target": {"alias": "web", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": format!("web-{i}")},
                            "paths": ["/var/www"], "volumeMounts": [{"name": "www", "mountPath": "/var/www"}]}},
                {"target": {"alias": "db", "ref": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": format!("db-{i}")},
                            "paths": ["/var/lib/db"], "volumeMounts": [{"name": "data", "mountPath": "/var/lib/db"}]}},
                {"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": format!("uploads-{i}")}}}
            ]}
        }))
        .expect("batch");
        batch_store.apply_watcher_event(&Event::Apply(batch));
        let rs = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": format!("web-{i}-6d4cf56db6"), "namespace": ns, "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "Deployment", "name": format!("web-{i}"), "uid": "u", "controller": true}]}
        }))
        .expect("replicaset");
        rs_store.apply_watcher_event(&Event::Apply(rs));
    }
    // Same-namespace Repositories: no policy, so no Namespace labels needed.
    let namespaces = Writer::default().as_reader();
    Catalog::new(batch_store.as_reader(), repo_store.as_reader(), rs_store.as_reader(), namespaces)
}

/// A Pod the ReplicaSet controller would create for Deployment web-421: about 5 KB as JSON.
fn review_body() -> Value {
    let env: Vec<Value> = (0..40)
        .map(|n| json!({"name": format!("APP_SETTING_{n:02}"), "value": format!("value-{n:04}-xxxxxxxx")}))
        .collect();
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "team-21", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "a8c1f0e2-1111-2222-3333-444455556666",
                         "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "generateName": "web-421-6d4cf56db6-", "namespace": "team-21",
                    "labels": {"app": "web-421", "pod-template-hash": "6d4cf56db6", "tier": "frontend", "team": "payments"},
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9100"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-421-6d4cf56db6",
                                         "uid": "0b6d3a7c-8e1f-4c2a-9d5b-1a2b3c4d5e6f", "controller": true, "blockOwnerDeletion": true}]
                },
                "spec": {
                    "containers": [{
                        "name": "web", "image": "registry.example/web:4.2.1", "env": env,
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5},
                        "volumeMounts": [{"name": "www", "mountPath": "/var/www"},
                                         {"name": "kube-api-access-x2x7d", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]
                    }],
                    "volumes": [
                        {"name": "www", "persistentVolumeClaim": {"claimName": "www-421"}},
                        {"name": "kube-api-access-x2x7d", "projected": {"sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}
                    ],
                    "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                    "serviceAccountName": "default", "schedulerName": "default-scheduler", "enableServiceLinks": true
                }
            },
            "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let body = serde_json::to_vec(&review_body()).expect("JSON");
    std::fs::write(&args.body_out, &body).expect("body written");
    let metrics = Arc::new(Metrics::default());
    let mutator = Arc::new(Mutator::new(catalog(args.batches), "stash:0.1.0".into()));
    let reviewed = mutator.review(&body).expect("the sample review is answered");
    assert_eq!(reviewed.verdict, stash::webhook::mutate::Verdict::Mutated, "the sample Pod is a target");
    let app = match args.mode {
        Mode::Inline => {
            let rounds = 20_000;
            let started = std::time::Instant::now();
            for _ in 0..rounds {
                std::hint::black_box(mutator.review(std::hint::black_box(&body)).expect("answered"));
            }
            println!("{:.1} µs per review", started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds));
            return;
        }
        Mode::Webhook => routes::router(mutator, metrics.clone(), 4 * 1024 * 1024),
        Mode::Noop => {
            let fixed = axum::body::Bytes::from(reviewed.review.to_json().expect("JSON"));
            Router::new().route(
                routes::MUTATE_PODS_PATH,
                post(move |_body: axum::body::Bytes| {
                    let fixed = fixed.clone();
                    async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], fixed) }
                }),
            )
        }
    };
    let ca = stash::certs::generate_ca("bench-ca", Duration::from_secs(86400)).expect("CA");
    let leaf = stash::certs::issue_serving(
        &ca,
        &["localhost".into()],
        &["127.0.0.1".parse().expect("IP")],
        Duration::from_secs(86400),
    )
    .expect("leaf");
    let serving =
        ServingCertificate::new(leaf.cert_pem.into_bytes(), leaf.key_pem.into_bytes(), metrics).expect("pair");
    let tls = server_config(serving, None).expect("TLS");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        stop.cancel();
    });
    serve_tls(listener, tls, app, ConnectionLimits::default(), cancel).await;
}
