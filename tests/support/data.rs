//! A namespace with the operator's controllers (in-process), a Repository on a real backend and
//! a local node playing kubelet for the executor Jobs: backing up and restoring through them.
//! Shared by the data path's tests and the kubectl plugin's.

use super::TestNamespace;
use super::backends::{self, PG_PASSWORD, S3_ACCESS_KEY, S3_SECRET_KEY};
use super::executors::{LocalNode, write_secret_dir};
use super::fixtures::{self, PASSWORD};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use serde_json::{Value, json};
use stash::api::restore_batch::RestorePhase;
use stash::api::{BackupBatch, BackupSession, RestoreBatch};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub const BATCH: &str = "app-backup";

/// A namespace with the operator's controllers, a Repository and its Secret, and a local node.
pub struct Setup {
    pub ns: TestNamespace,
    pub node: LocalNode,
    pub secret: BTreeMap<String, String>,
    /// The `spec.repository` of this namespace's batches and restores: its own `repo` unless a test
    /// points them at another namespace's.
    pub repository: Value,
    _operator: super::operator::RunningOperator,
}

pub enum Backend<'a> {
    Local(&'a Path),
    Rest(u16),
    S3(u16),
}

impl Setup {
    pub async fn new(prefix: &str, backend: Backend<'_>) -> Setup {
        Setup::with_stall_after(prefix, backend, Duration::from_secs(600)).await
    }

    /// The same, with the operator's `--stall-after`.
    pub async fn with_stall_after(prefix: &str, backend: Backend<'_>, stall_after: Duration) -> Setup {
        let ns = TestNamespace::new(prefix).await;
        let mut controllers = super::operator::controllers_for(&ns.name, "test-operator");
        controllers.0.stall_after = stall_after;
        let operator = super::operator::start_on(None, None, Some(controllers)).await;
        let mut secret = BTreeMap::from([("RESTIC_PASSWORD".to_string(), PASSWORD.to_string())]);
        let backend = match backend {
            Backend::Local(dir) => json!({"local": {"mountPath": dir, "hostPath": {"path": dir}}}),
            Backend::Rest(port) => json!({"rest": {"url": format!("http://127.0.0.1:{port}/{prefix}")}}),
            Backend::S3(port) => {
                secret.insert("AWS_ACCESS_KEY_ID".into(), S3_ACCESS_KEY.into());
                secret.insert("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET_KEY.into());
                json!({"s3": {"endpoint": format!("http://127.0.0.1:{port}"), "bucket": "stash", "prefix": prefix, "region": "us-east-1"}})
            }
        };
        let mut backend_spec = backend;
        backend_spec["storageSecretName"] = json!("repo-secret");
        fixtures::create::<Secret>(&ns, json!({"metadata": {"name": "repo-secret"}, "stringData": secret})).await;
        fixtures::create::<stash::api::Repository>(
            &ns,
            json!({"apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
                   "metadata": {"name": "repo", "namespace": ns.name}, "spec": {"backend": backend_spec}}),
        )
        .await;
        let node = LocalNode::new(&ns.name);
        write_secret_dir(node.secret_dir.path(), &secret);
        Setup { ns, node, secret, repository: json!({"name": "repo"}), _operator: operator }
    }

    /// A PVC member `uploads` mounted at /stash-data/uploads, with a few files.
    pub async fn pvc_member(&self) -> Value {
        fixtures::create::<PersistentVolumeClaim>(
            &self.ns,
            json!({"metadata": {"name": "uploads"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
        )
        .await;
        let dir = self.node.root().join("stash-data/uploads");
        std::fs::create_dir_all(dir.join("2026/11")).expect("dirs");
        std::fs::write(dir.join("2026/11/invoice.pdf"), vec![7u8; 300_000]).expect("file");
        std::fs::write(dir.join("index.html"), "<h1>uploads</h1>").expect("file");
        json!({"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"},
               "volumeMounts": [{"name": "uploads", "mountPath": "/stash-data/uploads"}]}})
    }

    /// A database member `shop-db`: Secret `pg-conn` with the connection, as files for the Job too.
    pub async fn database_member(&self, port: u16) -> Value {
        let connection = BTreeMap::from([
            ("host".to_string(), "127.0.0.1".to_string()),
            ("port".to_string(), port.to_string()),
            ("username".to_string(), "postgres".to_string()),
            ("password".to_string(), PG_PASSWORD.to_string()),
            ("database".to_string(), "shop".to_string()),
        ]);
        fixtures::create::<Secret>(&self.ns, json!({"metadata": {"name": "pg-conn"}, "stringData": connection})).await;
        write_secret_dir(self.node.database_secret_dir.path(), &connection);
        json!({"target": {"alias": "shop-db", "ref": {"apiVersion": "v1", "kind": "Secret", "name": "pg-conn"}},
               "task": {"name": "postgres-backup-15"}})
    }

    pub async fn batch(&self, members: Vec<Value>, mut spec: Value) -> BackupBatch {
        if spec.get("repository").is_none() {
            spec["repository"] = self.repository.clone();
        }
        fixtures::batch(&self.ns, BATCH, members, spec).await
    }

    /// Creates a session and plays kubelet until it is finished and finalized.
    pub async fn back_up(&mut self) -> BackupSession {
        let client = super::client().await;
        let session = stash::session::create_backup_session(client, &self.ns.name, BATCH, None).await.expect("session");
        self.back_up_existing(&kube::ResourceExt::name_any(&session)).await
    }

    /// Plays kubelet for session `name` until it is final and finalized.
    pub async fn back_up_existing(&mut self, name: &str) -> BackupSession {
        let name = name.to_string();
        let sessions = self.ns.api::<BackupSession>();
        let start = Instant::now();
        loop {
            for (job, output) in self.node.run_new_jobs().await {
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(!stderr.contains(PASSWORD), "a secret leaked into the output of {job}");
                eprintln!("job {job}: {} {}", output.status, stderr.trim());
            }
            let current = sessions.get(&name).await.expect("session");
            let status = current.status.clone().unwrap_or_default();
            let finalized = status.conditions.iter().any(|c| c.type_ == "SessionFinalized");
            if status.phase.is_some_and(|p| p.is_final()) && finalized {
                return current;
            }
            assert!(start.elapsed() < Duration::from_secs(300), "session {name} stuck: {status:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub fn restic(&self, args: &[&str]) -> String {
        let out = Command::new(backends::restic()).args(args).envs(self.secret.iter()).output().expect("restic runs");
        assert!(out.status.success(), "restic {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Restores every member of `members` of the latest complete session (or per `restore_from`)
    /// into `root`.
    pub async fn restore(&mut self, name: &str, members: Vec<Value>, restore_from: Value, root: &Path) -> RestoreBatch {
        let restore = self.restore_on(name, members, restore_from, Volumes::Root(root)).await;
        let phase = restore.status.as_ref().and_then(|s| s.phase);
        assert_eq!(phase, Some(RestorePhase::Succeeded), "{:?}", restore.status);
        restore
    }

    /// Runs the restore's Jobs on `volumes` until it is final, whatever the outcome.
    pub async fn restore_on(
        &mut self,
        name: &str,
        members: Vec<Value>,
        restore_from: Value,
        volumes: Volumes<'_>,
    ) -> RestoreBatch {
        let mut spec = json!({"repository": self.repository, "members": members});
        // Null: no restoreFrom at all, as a Stash manifest has none.
        if !restore_from.is_null() {
            spec["restoreFrom"] = restore_from;
        }
        fixtures::create::<RestoreBatch>(
            &self.ns,
            json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "RestoreBatch",
                   "metadata": {"name": name, "namespace": self.ns.name}, "spec": spec}),
        )
        .await;
        self.run_restore(name, volumes).await
    }

    /// Plays kubelet for the Jobs of RestoreBatch `name` on `volumes` until it is final.
    pub async fn run_restore(&mut self, name: &str, volumes: Volumes<'_>) -> RestoreBatch {
        let label = format!("stash.appscode.com/restore-batch={name}");
        let restores = self.ns.api::<RestoreBatch>();
        let start = Instant::now();
        loop {
            let ran = match volumes {
                Volumes::Root(root) => self.node.run_new_jobs_matching(&label, root).await,
                Volumes::Claims(claims) => self.node.run_new_jobs_on_claims(&label, claims).await,
            };
            for (job, output) in ran {
                eprintln!("restore Job {job}: {} {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
            }
            let current = restores.get(name).await.expect("restore batch");
            let phase = current.status.as_ref().and_then(|s| s.phase);
            if matches!(phase, Some(RestorePhase::Succeeded | RestorePhase::Failed | RestorePhase::Invalid)) {
                return current;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "restore {name} stuck: {:?}", current.status);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Where restore Jobs write: one shared `/`, or per-Job roots with claims as directories.
#[derive(Clone, Copy)]
pub enum Volumes<'a> {
    Root(&'a Path),
    Claims(&'a Path),
}
