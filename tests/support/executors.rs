//! No kubelet yet: the executors the operator schedules as Jobs (and the sidecar it injects) run here
//! as local processes of the real `stash` binary, pointed at the test's API server, with `/` of the
//! Pod mapped to a local directory and the mounted Secrets written to local directories. Each runs
//! as the ServiceAccount its Pod would have, with a token from a TokenRequest: RBAC is exercised.

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::config::Kubeconfig;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The executor Jobs' ServiceAccount, created by the operator per namespace.
const EXECUTOR_ACCOUNT: &str = "stash-backup";
/// The test workloads set no `serviceAccountName`: their Pods, and so their sidecars, run as this.
pub const WORKLOAD_ACCOUNT: &str = "default";

/// The env var naming the host a restore Job restores (see `controller::restore_batch`).
const RESTORE_HOST_ENV: &str = "STASH_RESTORE_HOST";

pub struct LocalNode {
    pub namespace: String,
    /// The admin's: for what is not a Pod (the `stash` CLI run by a user).
    pub kubeconfig: PathBuf,
    /// The per-identity kubeconfigs.
    identities: tempfile::TempDir,
    /// What the Pods see as `/`.
    pub root: tempfile::TempDir,
    /// The repository Secret's files.
    pub secret_dir: tempfile::TempDir,
    /// A database member's connection Secret's files.
    pub database_secret_dir: tempfile::TempDir,
    /// The restic the executors run: the real one, or a test's wrapper around it.
    pub restic: PathBuf,
    ran: HashSet<String>,
}

pub fn write_secret_dir(dir: &Path, values: &BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).expect("secret dir") {
        let _ = std::fs::remove_file(entry.expect("entry").path());
    }
    for (key, value) in values {
        std::fs::write(dir.join(key), value).expect("secret file");
    }
}

impl LocalNode {
    pub fn new(namespace: &str) -> Self {
        LocalNode {
            namespace: namespace.into(),
            kubeconfig: super::cluster().kubeconfig.clone(),
            identities: tempfile::tempdir().expect("temp dir"),
            root: tempfile::tempdir().expect("temp dir"),
            secret_dir: tempfile::tempdir().expect("temp dir"),
            database_secret_dir: tempfile::tempdir().expect("temp dir"),
            restic: super::backends::restic(),
            ran: HashSet::new(),
        }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `stash <args>` as a Pod named `pod` of this namespace would run it.
    pub fn command(&self, args: &[String], pod: &str) -> Command {
        self.command_in(args, pod, self.root.path())
    }

    /// The same, with `/` mapped to `root` (a Job's own `--path-root` too).
    pub fn command_in(&self, args: &[String], pod: &str, root: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stash"));
        let own_root = args.iter().find_map(|a| a.strip_prefix("--path-root="));
        command.args(args.iter().filter(|a| !a.starts_with("--path-root=")));
        command.arg("--secret-dir").arg(self.secret_dir.path());
        command
            .arg("--path-root")
            .arg(own_root.map_or_else(|| root.to_path_buf(), |r| root.join(r.trim_start_matches('/'))));
        // The Pod's scratch volume is its `/tmp`.
        command.arg("--cache-dir").arg(root.join("tmp/restic-cache"));
        if matches!(args.first().map(String::as_str), Some("backup-job" | "restore")) {
            command.arg("--database-secret-dir").arg(self.database_secret_dir.path());
        }
        let kubeconfig = match identity_of(args) {
            Some(account) => {
                let (namespace, dir) = (self.namespace.clone(), self.identities.path().to_path_buf());
                super::block_on(async move { service_account_kubeconfig(&namespace, account, &dir).await })
            }
            None => self.kubeconfig.clone(),
        };
        command
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", &self.namespace)
            .env("POD_NAME", pod)
            .env("NODE_NAME", "local-node")
            .env("STASH_RESTIC_BINARY", &self.restic)
            .env("RUST_LOG", "warn");
        command
    }

    /// Runs every backup and finalize Job of the namespace not run before, one after another, as a
    /// kubelet would run their Pods. Returns the outputs by Job name.
    pub async fn run_new_jobs(&mut self) -> Vec<(String, Output)> {
        let root = self.root.path().to_path_buf();
        self.run_new_jobs_matching("stash.appscode.com/backup-session", &root).await
    }

    /// Plays kubelet for the namespace's Jobs carrying `label`, each of which must succeed, until
    /// `probe` yields a value; panics naming `what` after `limit` (a hang guard).
    pub async fn run_jobs_until<T, F, Fut>(&mut self, label: &str, what: &str, limit: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = std::time::Instant::now() + limit;
        let root = self.root.path().to_path_buf();
        loop {
            for (job, output) in self.run_new_jobs_matching(label, &root).await {
                assert!(output.status.success(), "Job {job}: {}", String::from_utf8_lossy(&output.stderr));
            }
            if let Some(value) = probe().await {
                return value;
            }
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The same for the Jobs carrying `label`, with `/` mapped to `root`.
    pub async fn run_new_jobs_matching(&mut self, label: &str, root: &Path) -> Vec<(String, Output)> {
        let mut outputs = Vec::new();
        for (name, job, mut args) in self.new_jobs(label).await {
            self.project_database_volume(&job).await;
            // One shared root stands for every claim: the Job restores straight into it.
            args.retain(|a| !a.starts_with("--path-root="));
            let pod = format!("{name}-x7k2p");
            let output =
                tokio::task::block_in_place(|| self.command_in(&args, &pod, root).output().expect("stash runs"));
            outputs.push((name, output));
        }
        outputs
    }

    /// Runs the new Jobs carrying `label` as their Pods would see their volumes: each Job gets its
    /// own `/`, every PersistentVolumeClaim it mounts is `claims/<claim>` moved in at the mountPath
    /// for the run and back out after it; whatever a Job writes elsewhere is lost with its Pod.
    pub async fn run_new_jobs_on_claims(&mut self, label: &str, claims: &Path) -> Vec<(String, Output)> {
        let mut outputs = Vec::new();
        for (name, job, args) in self.new_jobs(label).await {
            let pod = tempfile::tempdir().expect("the Pod's root");
            let mounted = claim_mounts(&job);
            for (claim, path) in &mounted {
                let inside = pod.path().join(path.trim_start_matches('/'));
                std::fs::create_dir_all(inside.parent().expect("a parent")).expect("mount point");
                let _ = std::fs::create_dir_all(claims.join(claim));
                std::fs::rename(claims.join(claim), &inside).expect("mount the claim");
            }
            let output = tokio::task::block_in_place(|| {
                self.command_in(&args, &format!("{name}-x7k2p"), pod.path())
                    .env(RESTORE_HOST_ENV, job_env(&job, RESTORE_HOST_ENV).unwrap_or_default())
                    .output()
                    .expect("stash runs")
            });
            for (claim, path) in &mounted {
                std::fs::rename(pod.path().join(path.trim_start_matches('/')), claims.join(claim))
                    .unwrap_or_else(|e| panic!("unmounting claim {claim} from {path} (mounted twice?): {e}"));
            }
            outputs.push((name, output));
        }
        outputs
    }

    /// The executor Jobs carrying `label` not run before, oldest first, now counted as run: name,
    /// Job and the `stash` container's args.
    async fn new_jobs(&mut self, label: &str) -> Vec<(String, Job, Vec<String>)> {
        let client = super::client().await;
        let jobs: Api<Job> = Api::namespaced(client, &self.namespace);
        let mut list = jobs.list(&ListParams::default().labels(label)).await.expect("list Jobs").items;
        list.sort_by_key(|j| j.metadata.creation_timestamp.clone());
        let mut new = Vec::new();
        for job in list {
            let name = job.name_any();
            let Some(args) = executor_args(&job) else { continue };
            if self.ran.insert(name.clone()) {
                new.push((name, job, args));
            }
        }
        new
    }

    /// Plays the kubelet for a Job's projected database volume (an AppBinding member's): the items
    /// of its Secret, and the downward API's files from the Pod's annotations, written where the
    /// executor reads them. A Job with a plain Secret volume keeps what the test wrote there.
    async fn project_database_volume(&self, job: &Job) {
        let Some(template) = job.spec.as_ref().map(|s| &s.template) else { return };
        let volumes = template.spec.as_ref().and_then(|p| p.volumes.as_ref());
        let Some(projected) =
            volumes.into_iter().flatten().find(|v| v.name == "database-secret").and_then(|v| v.projected.as_ref())
        else {
            return;
        };
        let annotations = template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(super::client().await, &self.namespace);
        let mut files = BTreeMap::new();
        for source in projected.sources.iter().flatten() {
            if let Some(projection) = &source.secret {
                let secret = secrets.get(&projection.name).await.expect("the projected Secret exists");
                let data = secret.data.unwrap_or_default();
                for item in projection.items.iter().flatten() {
                    let value =
                        data.get(&item.key).unwrap_or_else(|| panic!("Secret {} has no {}", projection.name, item.key));
                    files.insert(item.path.clone(), String::from_utf8(value.0.clone()).expect("UTF-8"));
                }
            }
            for item in source.downward_api.iter().flat_map(|d| d.items.iter().flatten()) {
                let path = item.field_ref.as_ref().map(|f| f.field_path.as_str()).unwrap_or_default();
                let key = path
                    .strip_prefix("metadata.annotations['")
                    .and_then(|k| k.strip_suffix("']"))
                    .expect("an annotation");
                files.insert(item.path.clone(), annotations.get(key).cloned().unwrap_or_default());
            }
        }
        write_secret_dir(self.database_secret_dir.path(), &files);
    }

    /// Treats Job `name` as run (a test ran it by hand).
    pub fn mark_run(&mut self, name: &str) {
        self.ran.insert(name.to_string());
    }

    /// The sidecar of `pod`, running until killed.
    pub fn spawn_sidecar(&self, batch: &str, kind: &str, name: &str, pod: &str) -> KilledOnDrop {
        self.spawn_sidecar_in(batch, kind, name, pod, self.root.path())
    }

    /// The same, for a Pod whose `/` is `root` (each StatefulSet Pod has its own volumes).
    pub fn spawn_sidecar_in(&self, batch: &str, kind: &str, name: &str, pod: &str, root: &Path) -> KilledOnDrop {
        let args: Vec<String> = ["run-backup", "--invoker-name", batch, "--target-kind", kind, "--target-name", name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let child = self.command_in(&args, pod, root).stdout(Stdio::null()).spawn().expect("the sidecar starts");
        KilledOnDrop(child)
    }
}

/// (claim, mountPath) of every PersistentVolumeClaim mount of a Job's container.
pub fn claim_mounts(job: &Job) -> Vec<(String, String)> {
    let Some(pod) = job.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else { return Vec::new() };
    let claim = |volume: &str| {
        let found = pod.volumes.iter().flatten().find(|v| v.name == volume)?;
        found.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone())
    };
    let mounts = pod.containers.first().and_then(|c| c.volume_mounts.clone()).unwrap_or_default();
    mounts.iter().filter_map(|m| Some((claim(&m.name)?, m.mount_path.clone()))).collect()
}

/// The literal value of a Job container's env var.
fn job_env(job: &Job, name: &str) -> Option<String> {
    let pod = job.spec.as_ref()?.template.spec.as_ref()?;
    pod.containers.first()?.env.iter().flatten().find(|e| e.name == name)?.value.clone()
}

/// The ServiceAccount the Pod running `stash <args>` has in production; `None` for the CLI.
fn identity_of(args: &[String]) -> Option<&'static str> {
    match args.first().map(String::as_str) {
        Some("run-backup") => Some(WORKLOAD_ACCOUNT),
        Some("backup-job" | "finalize-session" | "restore" | "run-hook" | "repository-task") => Some(EXECUTOR_ACCOUNT),
        _ => None,
    }
}

/// A kubeconfig for the admin's API server and CA, authenticated as `namespace`/`account` with a
/// fresh TokenRequest token. Waits for the account: the operator creates `stash-backup` when it
/// reconciles a batch or restore.
pub async fn service_account_kubeconfig(namespace: &str, account: &str, dir: &Path) -> PathBuf {
    let accounts: Api<ServiceAccount> = Api::namespaced(super::client().await, namespace);
    super::eventually(&format!("ServiceAccount {namespace}/{account}"), Duration::from_secs(60), || {
        let accounts = accounts.clone();
        async move { accounts.get_opt(account).await.ok().flatten() }
    })
    .await;
    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() },
        ..Default::default()
    };
    let issued = accounts.create_token_request(account, &PostParams::default(), &request).await.expect("a token");
    let token = issued.status.expect("a token in the status").token;
    let admin = Kubeconfig::read_from(&super::cluster().kubeconfig).expect("admin kubeconfig");
    let current = admin.contexts.iter().find(|c| Some(&c.name) == admin.current_context.as_ref());
    let cluster_name = current.and_then(|c| c.context.as_ref()).map(|c| c.cluster.clone()).expect("a current context");
    let cluster = admin.clusters.iter().find(|c| c.name == cluster_name).expect("the context's cluster");
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": cluster_name, "user": account, "namespace": namespace}}],
        "current-context": account,
    });
    let path = dir.join(format!("{account}.kubeconfig"));
    std::fs::write(&path, config.to_string()).expect("kubeconfig written");
    path
}

/// The args of a Job's `stash` container, for executor Jobs (not the trigger's).
fn executor_args(job: &Job) -> Option<Vec<String>> {
    let pod = job.spec.as_ref()?.template.spec.as_ref()?;
    let args = pod.containers.first()?.args.clone()?;
    let executor = ["backup-job", "finalize-session", "restore", "run-hook", "repository-task"];
    executor.contains(&args.first()?.as_str()).then_some(args)
}

pub struct KilledOnDrop(pub Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
