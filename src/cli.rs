//! The command line: one binary, one subcommand per role.

use clap::{Args, Parser, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "stash",
    version,
    about = "Batch backup for Kubernetes applications (Stash v1beta1 BackupBatch compatible)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator: admission webhook, controllers and the admin port.
    Operator(Box<OperatorArgs>),
    /// Run as the `stash` sidecar of a workload Pod, backing it up when a session asks.
    RunBackup(RunBackupArgs),
    /// Run one job-model backup (a PVC or a database member) for one session.
    BackupJob(BackupJobArgs),
    /// Finish a session in the repository: manifest, retention, check, Repository status.
    FinalizeSession(FinalizeArgs),
    /// Send a session's global http or tcp hook (its hook Job runs this, in the batch's namespace).
    RunHook(RunHookArgs),
    /// Create a BackupSession for an invoker (the trigger CronJob runs this at each slot).
    CreateBackupsession(InvokerArgs),
    /// Run the restore of one RestoreBatch member.
    Restore(RestoreArgs),
    /// Generate or rotate the webhook's certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Print every CustomResourceDefinition as one multi-document YAML stream.
    Crds,
    /// Run one repository command of `kubectl stash` and record its result (its Job runs this).
    #[command(hide = true)]
    RepositoryTask(RepositoryTaskRoleArgs),
    #[command(flatten)]
    User(UserCommand),
}

/// `kubectl stash`: the `stash` binary installed as `kubectl-stash` offers the user's verbs alone.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-stash",
    bin_name = "kubectl stash",
    version,
    about = "Operate BackupBatches: back up now, pause, inspect, restore, and look after the repository"
)]
pub struct PluginCli {
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    #[command(flatten)]
    User(UserCommand),
    /// Restore a BackupBatch's members from one complete session: creates a RestoreBatch that the
    /// operator carries out (`stash restore` is the restore Job's own role, hence only here).
    Restore(RestoreRequestArgs),
    /// Print a completion script for `kubectl-stash` in the given shell.
    Completion(CompletionArgs),
}

/// The verbs both `stash` and `kubectl stash` offer.
#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Back up a BackupBatch now, outside its schedule.
    Trigger(BatchArgs),
    /// Pause a BackupBatch: its CronJob is suspended until resumed.
    Pause(BatchArgs),
    /// Resume a paused BackupBatch.
    Resume(BatchArgs),
    /// List the sessions of a BackupBatch with phase, duration and size.
    Sessions(SessionsArgs),
    /// One screen about a BackupBatch: schedule and next run, Repository, last success,
    /// conditions, members and latest sessions.
    Describe(ReadBatchArgs),
    /// List the batch's snapshots in its repository (a Job in the cluster reads them).
    Snapshots(RepositoryCommandArgs),
    /// Check the batch's repository with `restic check` (a Job in the cluster runs it).
    Check(RepositoryCommandArgs),
    /// Remove the repository's provably stale locks, by the operator's own rule (a Job in the
    /// cluster does it); live locks are kept and listed.
    Unlock(RepositoryCommandArgs),
    /// Print the logs of a session's executors: its Jobs' Pods and its workloads' sidecars.
    Logs(LogsArgs),
}

/// `-o json|yaml` for the verbs that read.
#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Print the objects (or the Job's report) as JSON or YAML instead of a table.
    #[arg(long, short = 'o', value_enum)]
    pub output: Option<crate::plugin::OutputFormat>,
}

/// A BackupBatch to read.
#[derive(Args, Debug)]
pub struct ReadBatchArgs {
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A repository command: a Job in the batch's namespace with the repository's Secret.
#[derive(Args, Debug)]
pub struct RepositoryCommandArgs {
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// The Job's image (default: the image of the batch's trigger CronJob, as the operator runs it).
    #[arg(long)]
    pub image: Option<String>,
    /// How long the Job may take.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `kubectl stash restore`.
#[derive(Args, Debug)]
pub struct RestoreRequestArgs {
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Restore this complete session (a BackupSession name) instead of the latest complete one.
    #[arg(long, conflicts_with = "before")]
    pub session: Option<String>,
    /// Restore the newest complete session that started before this RFC 3339 time.
    #[arg(long, value_parser = crate::plugin::restore::parse_time)]
    pub before: Option<k8s_openapi::jiff::Timestamp>,
    /// Restore into this namespace (its own copies of the targets) instead of the batch's; the
    /// Repository must allow it (spec.usagePolicy).
    #[arg(long)]
    pub to_namespace: Option<String>,
    /// Name of the RestoreBatch (default: <batch>-restore-<unix time>).
    #[arg(long = "name")]
    pub restore_name: Option<String>,
}

/// `kubectl stash logs`.
#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Name of the BackupSession.
    pub session: String,
    /// Namespace of the session; defaults to the kubeconfig's current namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

/// `kubectl stash completion`.
#[derive(Args, Debug)]
pub struct CompletionArgs {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// The Job side of a repository command.
#[derive(Args, Debug)]
pub struct RepositoryTaskRoleArgs {
    /// The BackupBatch whose repository to work on.
    #[arg(long)]
    pub batch: String,
    #[arg(long, value_enum)]
    pub task: crate::plugin::report::RepositoryTask,
    /// The ConfigMap to write the result into.
    #[arg(long)]
    pub result: String,
    /// Namespace of the batch; defaults to POD_NAMESPACE, then the in-cluster namespace.
    #[arg(long, short = 'n', env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// Names the object that invokes a backup.
#[derive(Args, Debug)]
pub struct InvokerArgs {
    /// Kind of the invoker; only BackupBatch is supported.
    #[arg(long, default_value = "BackupBatch")]
    pub invoker_kind: String,
    /// Name of the invoker.
    #[arg(long)]
    pub invoker_name: String,
    /// Namespace of the invoker; defaults to POD_NAMESPACE, then the in-cluster namespace.
    #[arg(long, short = 'n', env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
}

#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// Where the admission webhook listens (HTTPS).
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub webhook_addr: SocketAddr,
    /// Where /livez, /readyz and /metrics are served (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// PEM certificate chain of the webhook; reloaded when it changes.
    #[arg(long, default_value = "/etc/stash/webhook/tls.crt")]
    pub tls_cert_file: PathBuf,
    /// PEM private key of the webhook; reloaded when it changes.
    #[arg(long, default_value = "/etc/stash/webhook/tls.key")]
    pub tls_key_file: PathBuf,
    /// Image of the injected `stash` sidecar (operator setting, never taken from user objects).
    #[arg(long, env = "STASH_SIDECAR_IMAGE", default_value = concat!("stash:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,
    /// PEM bundle of CAs: the webhook then answers only clients presenting a certificate one of them
    /// signed (the API server, configured through its AdmissionConfiguration). Read at start-up.
    /// Without it any client that reaches the webhook is answered.
    #[arg(long)]
    pub webhook_client_ca_file: Option<PathBuf>,
    /// Accept only client certificates whose common name or a DNS name is one of these
    /// (comma-separated or repeated); needed when the CA also signs other clients' certificates.
    #[arg(long, value_delimiter = ',', requires = "webhook_client_ca_file")]
    pub webhook_client_names: Vec<String>,
    /// Larger admission request bodies are refused with 413.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// How often the certificate files are re-read, in addition to file-change events.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub cert_poll_interval: Duration,
    /// Generate and rotate the webhook's CA and certificate in a Secret, and keep the webhook
    /// configuration's caBundle in step (instead of reading --tls-cert-file/--tls-key-file).
    #[arg(long)]
    pub self_signed_certs: bool,
    /// PEM bundle of the CA(s) that sign --tls-cert-file, published as the caBundle of
    /// --webhook-configuration-name at start and whenever the file changes (certificates brought by a
    /// platform team). Rotate a CA by listing old and new first, then switching the leaf, then dropping
    /// the old CA. An empty or unparsable bundle is refused and the last one published stays.
    #[arg(long, env = "STASH_CA_BUNDLE_FILE", conflicts_with = "self_signed_certs")]
    pub ca_bundle_file: Option<PathBuf>,
    /// With cert-manager: keep --ca-bundle-file's CAs (the serving Secret's ca.crt), with those kept
    /// before until they expire, in this Secret of --namespace, for cert-manager's CA injector
    /// (`cert-manager.io/inject-ca-from-secret`), instead of writing the caBundle; a leaf from a new
    /// CA is served only once the caBundle holds that CA, plus --ca-propagation-delay.
    #[arg(long, env = "STASH_CA_BUNDLE_SECRET", requires = "ca_bundle_file")]
    pub ca_bundle_secret: Option<String>,
    /// The operator's namespace (holds the certificate Secret).
    #[arg(long, env = "POD_NAMESPACE", default_value = "stash")]
    pub namespace: String,
    /// Secret holding the self-managed CA and serving certificate.
    #[arg(long, default_value = "stash-webhook-certs")]
    pub cert_secret_name: String,
    /// MutatingWebhookConfiguration whose caBundle --self-signed-certs or --ca-bundle-file maintains.
    #[arg(long, default_value = "stash")]
    pub webhook_configuration_name: String,
    /// Service the API server calls; the self-managed certificate names <service>.<namespace>.svc.
    #[arg(long, default_value = "stash-webhook")]
    pub webhook_service_name: String,
    /// Extra IP addresses for the self-managed certificate (local development: 127.0.0.1).
    #[arg(long = "cert-ip")]
    pub cert_ips: Vec<IpAddr>,
    /// Lifetime of a self-managed serving certificate (renewed with a third left).
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    pub cert_validity: Duration,
    /// Lifetime of a self-managed CA (rotated with a third left, old and new trusted meanwhile).
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub ca_validity: Duration,
    /// How often the self-managed certificates are checked.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub cert_check_interval: Duration,
    /// How long a new caBundle must have been published before a leaf signed by a new CA is served
    /// (--self-signed-certs, --ca-bundle-secret).
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub ca_propagation_delay: Duration,
    /// Serve the webhook only; run no controllers.
    #[arg(long)]
    pub disable_controllers: bool,
    /// Reconcile BackupBatches and BackupSessions of this namespace only (default: all namespaces).
    #[arg(long)]
    pub watch_namespace: Option<String>,
    /// Image of the trigger CronJobs and backup Jobs (default: the sidecar image).
    #[arg(long, env = "STASH_JOB_IMAGE")]
    pub job_image: Option<String>,
    /// This replica's identity for the Lease and Events (default: hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// The Lease (in --namespace) that elects the replica running the controllers.
    #[arg(long, default_value = "stash-operator")]
    pub lease_name: String,
    /// How long the Lease stays valid without renewal.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How often the Lease is renewed, or a takeover tried.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub lease_renew_interval: Duration,
    /// A backing-up host whose progress (bytes, files) stands still this long sets its session's
    /// `Stalled` condition and a Warning Event.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub stall_after: Duration,
    /// How many objects each controller reconciles at once. Bounds memory when many objects need a
    /// reconcile together (a leader taking over 10,000 batches); 0 means unbounded.
    #[arg(long, default_value_t = crate::controller::DEFAULT_MAX_CONCURRENT_RECONCILES)]
    pub max_concurrent_reconciles: u16,
}

/// How the user typed the command when the program runs as a kubectl plugin, else None: kubectl
/// runs `kubectl-stash` from PATH (krew links the `stash-batch` plugin as `kubectl-stash_batch`),
/// and argv[0] is that file (`.exe` on Windows).
pub fn plugin_invocation(argv0: &std::ffi::OsStr) -> Option<String> {
    let name = std::path::Path::new(argv0).file_stem()?.to_string_lossy().into_owned();
    let plugin = name.strip_prefix("kubectl-")?;
    (plugin == "stash" || plugin.starts_with("stash_")).then(|| format!("kubectl {}", plugin.replace('_', "-")))
}

impl OperatorArgs {
    /// What is wrong with the Lease flags, naming them: a Lease counts whole seconds, and a
    /// renewal no sooner than the Lease expires would lose it between renewals.
    pub fn lease_problem(&self) -> Result<(), String> {
        if self.lease_duration.subsec_nanos() != 0 {
            return Err(format!("--lease-duration {:?}: a Lease counts whole seconds", self.lease_duration));
        }
        if self.lease_renew_interval >= self.lease_duration {
            return Err(format!(
                "--lease-renew-interval {:?} must be shorter than --lease-duration {:?}, or the Lease expires between renewals",
                self.lease_renew_interval, self.lease_duration
            ));
        }
        Ok(())
    }
}

/// Parses a Go-style duration such as `30s` or `1h30m`, more than zero: every flag that takes one
/// is a timeout, an interval or a lifetime, where 0 panics a timer or expires at once.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match crate::api::duration::DurationString::new(text).parse() {
        Ok(duration) if duration.is_zero() => Err(format!("{text:?}: must be more than 0")),
        Ok(duration) => Ok(duration),
        Err(err) => Err(format!("{text:?}: {err}")),
    }
}

/// What every executor (sidecar, backup Job, finalize Job, restore) is told about where it runs.
#[derive(Args, Debug, Clone)]
pub struct ExecutorArgs {
    /// The repository Secret, one file per key (a mounted Secret volume).
    #[arg(long, default_value = crate::executor_pod::SECRET_MOUNT_PATH)]
    pub secret_dir: PathBuf,
    /// The restic binary (default: `restic` on PATH).
    #[arg(long, env = crate::restic::BINARY_ENV)]
    pub restic_binary: Option<PathBuf>,
    /// Target paths are read (and restored) under this directory.
    #[arg(long, default_value = "/")]
    pub path_root: PathBuf,
    /// This Pod's name: lock holder identity, StatefulSet ordinal.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This Pod's node: a DaemonSet Pod's host name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where a member's backups keep restic's cache: the scratch volume, which for a sidecar lasts
    /// as long as its Pod, so that the next session does not download the indexes again.
    #[arg(long, default_value = "/tmp/restic-cache")]
    pub cache_dir: PathBuf,
}

/// Sidecar flags: the invoker and the workload the sidecar belongs to.
#[derive(Args, Debug)]
pub struct RunBackupArgs {
    #[command(flatten)]
    pub invoker: InvokerArgs,
    /// Kind of the workload this sidecar runs in.
    #[arg(long)]
    pub target_kind: String,
    /// Name of the workload this sidecar runs in.
    #[arg(long)]
    pub target_name: String,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// One job-model member of one session.
#[derive(Args, Debug)]
pub struct BackupJobArgs {
    #[command(flatten)]
    pub invoker: InvokerArgs,
    /// The BackupSession to back up for.
    #[arg(long)]
    pub session: String,
    /// Kind of the member's target: PersistentVolumeClaim, or Secret or AppBinding for a database.
    #[arg(long)]
    pub target_kind: String,
    /// Name of the member's target.
    #[arg(long)]
    pub target_name: String,
    /// A database member's connection, one file per key (a Secret member's Secret, or an AppBinding
    /// member's endpoint and credentials).
    #[arg(long, default_value = crate::executor_pod::DEFAULT_DATABASE_SECRET_DIR)]
    pub database_secret_dir: PathBuf,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// The session to finish.
#[derive(Args, Debug)]
pub struct FinalizeArgs {
    /// The finished BackupSession.
    #[arg(long)]
    pub session: String,
    /// Namespace of the session; defaults to POD_NAMESPACE, then the in-cluster namespace.
    #[arg(long, short = 'n', env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// The hook to send, and for which session.
#[derive(Args, Debug)]
pub struct RunHookArgs {
    /// The BackupSession whose hook this is.
    #[arg(long)]
    pub session: String,
    /// Which of the batch's hooks.
    #[arg(long, value_enum)]
    pub hook: crate::hooks::Hook,
    /// Namespace of the session; defaults to POD_NAMESPACE, then the in-cluster namespace.
    #[arg(long, short = 'n', env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// One member of a RestoreBatch.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The RestoreBatch.
    #[arg(long)]
    pub restore_batch: String,
    /// Kind of the member's target.
    #[arg(long)]
    pub target_kind: String,
    /// Name of the member's target.
    #[arg(long)]
    pub target_name: String,
    /// A database member's connection, one file per key (a Secret member's Secret, or an AppBinding
    /// member's endpoint and credentials).
    #[arg(long, default_value = crate::executor_pod::DEFAULT_DATABASE_SECRET_DIR)]
    pub database_secret_dir: PathBuf,
    /// Namespace of the RestoreBatch; defaults to POD_NAMESPACE, then the in-cluster namespace.
    #[arg(long, short = 'n', env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create a CA (or reuse one from --ca-dir) and a serving certificate it signs:
    /// ca.crt, tls.crt and tls.key in --out-dir.
    Generate(GenerateCertsArgs),
}

#[derive(Args, Debug)]
pub struct GenerateCertsArgs {
    /// Directory to write ca.crt, tls.crt and tls.key into (created if missing).
    #[arg(long)]
    pub out_dir: PathBuf,
    /// DNS names of the serving certificate, e.g. stash-webhook.stash.svc.
    #[arg(long = "dns")]
    pub dns: Vec<String>,
    /// IP addresses of the serving certificate, e.g. 127.0.0.1.
    #[arg(long = "ip")]
    pub ip: Vec<IpAddr>,
    /// Sign with the CA in this directory (ca.crt, ca.key) instead of creating a new one.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Lifetime of the serving certificate.
    #[arg(long, default_value = "2160h", value_parser = parse_duration)]
    pub validity: Duration,
    /// Lifetime of a newly created CA.
    #[arg(long, default_value = "87600h", value_parser = parse_duration)]
    pub ca_validity: Duration,
}

/// `stash sessions`: from the API, or from the manifests in the repository.
#[derive(Args, Debug)]
pub struct SessionsArgs {
    #[command(flatten)]
    pub batch: BatchArgs,
    /// List the complete sessions recorded in the repository (works with the BackupSessions gone);
    /// reads the repository Secret from --secret-dir.
    #[arg(long)]
    pub from_repository: bool,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// Names one BackupBatch.
#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// Name of the BackupBatch.
    pub name: String,
    /// Namespace of the BackupBatch; defaults to the kubeconfig's current namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A duration flag is more than zero and within range, or clap says which flag is wrong.
    #[test]
    fn duration_flags_refuse_zero_and_odd_texts() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        for odd in ["0s", "0", "1s-1s", "99999999999999999999h", "-5m"] {
            assert!(parse_duration(odd).is_err(), "{odd}");
        }
        let parsed = Cli::try_parse_from(["stash", "check", "app", "--timeout", "0s"]);
        let message = parsed.map(drop).expect_err("refused").to_string();
        assert!(message.contains("--timeout") && message.contains("more than 0"), "{message}");
    }

    /// A Lease counts whole seconds: `500ms` would be written as 0 (every replica may take it over
    /// at once), and a renewal no sooner than the Lease expires loses it between renewals.
    #[test]
    fn lease_flags_are_whole_seconds_and_renewed_within_the_lease() {
        let operator = |flags: &[&str]| {
            let argv = [&["stash", "operator"], flags].concat();
            match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.command {
                Command::Operator(args) => args.lease_problem(),
                _ => Err("not the operator".into()),
            }
        };
        assert_eq!(operator(&[]), Ok(()));
        let fraction = operator(&["--lease-duration", "1500ms"]).expect_err("refused");
        assert!(fraction.contains("--lease-duration") && fraction.contains("whole seconds"), "{fraction}");
        let late = operator(&["--lease-duration", "5s", "--lease-renew-interval", "5s"]).expect_err("refused");
        assert!(late.contains("--lease-renew-interval") && late.contains("--lease-duration"), "{late}");
        assert_eq!(operator(&["--lease-duration", "6s", "--lease-renew-interval", "2s"]), Ok(()));
    }

    #[test]
    fn the_plugin_is_told_by_its_file_name() {
        let invoked = |argv0: &str| plugin_invocation(argv0.as_ref());
        assert_eq!(invoked("kubectl-stash").as_deref(), Some("kubectl stash"));
        assert_eq!(invoked("/usr/local/bin/kubectl-stash").as_deref(), Some("kubectl stash"));
        assert_eq!(invoked("kubectl-stash.exe").as_deref(), Some("kubectl stash"));
        assert_eq!(invoked("/home/ops/.krew/bin/kubectl-stash_batch").as_deref(), Some("kubectl stash-batch"));
        for other in ["stash", "/usr/local/bin/stash", "kubectl-stashy", "kubectl-other", ""] {
            assert_eq!(invoked(other), None, "{other}");
        }
    }

    #[test]
    fn both_command_lines_are_well_formed_and_the_plugin_speaks_as_kubectl_stash() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        PluginCli::command().debug_assert();
        let help = PluginCli::command().render_help().to_string();
        assert!(help.contains("kubectl stash"), "{help}");
        assert!(!help.contains("run-backup") && !help.contains("repository-task"), "{help}");
        let error = PluginCli::try_parse_from(["kubectl-stash", "restore", "app", "--before", "yesterday"])
            .expect_err("not a time")
            .to_string();
        assert!(error.contains("--before") && error.contains("RFC 3339"), "{error}");
        let both = PluginCli::try_parse_from([
            "kubectl-stash",
            "restore",
            "app",
            "--session",
            "s",
            "--before",
            "2026-11-25T00:00:00Z",
        ]);
        assert!(both.is_err(), "--session and --before exclude each other");
    }

    #[test]
    fn a_ca_bundle_file_is_refused_beside_self_signed_certificates() {
        let parsed = Cli::try_parse_from(["stash", "operator", "--self-signed-certs", "--ca-bundle-file=/ca/ca.crt"]);
        let message = parsed.expect_err("two owners of one caBundle").to_string();
        assert!(message.contains("--ca-bundle-file") && message.contains("--self-signed-certs"), "{message}");
    }
}
