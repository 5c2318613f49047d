//! The command line: one binary, one subcommand per role.

use clap::{Args, Parser, Subcommand};

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
    Operator,
    /// Run as the `stash` sidecar of a workload Pod, backing it up when a session asks.
    RunBackup(InvokerArgs),
    /// Run one job-model backup (a PVC or a database member) for one session.
    BackupJob(InvokerArgs),
    /// Create a BackupSession for an invoker (the trigger CronJob runs this at each slot).
    CreateBackupsession(InvokerArgs),
    /// Run the restore of one RestoreBatch member.
    Restore,
    /// Generate or rotate the webhook's certificates.
    Certs,
    /// Print every CustomResourceDefinition as one multi-document YAML stream.
    Crds,
    /// Back up a BackupBatch now, outside its schedule.
    Trigger(BatchArgs),
    /// Pause a BackupBatch: its CronJob is suspended until resumed.
    Pause(BatchArgs),
    /// Resume a paused BackupBatch.
    Resume(BatchArgs),
    /// List the sessions of a BackupBatch with phase, duration and size.
    Sessions(BatchArgs),
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

/// Names one BackupBatch.
#[derive(Args, Debug)]
pub struct BatchArgs {
    /// Name of the BackupBatch.
    pub name: String,
    /// Namespace of the BackupBatch; defaults to the kubeconfig's current namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

impl Command {
    /// The subcommand's name as typed on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Operator => "operator",
            Command::RunBackup(_) => "run-backup",
            Command::BackupJob(_) => "backup-job",
            Command::CreateBackupsession(_) => "create-backupsession",
            Command::Restore => "restore",
            Command::Certs => "certs",
            Command::Crds => "crds",
            Command::Trigger(_) => "trigger",
            Command::Pause(_) => "pause",
            Command::Resume(_) => "resume",
            Command::Sessions(_) => "sessions",
        }
    }
}
