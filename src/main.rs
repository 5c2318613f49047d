use clap::{CommandFactory, FromArgMatches, Parser};
use stash::cli::{CertsCommand, Cli, Command, PluginCli, PluginCommand, UserCommand};
use stash::plugin::report::RepositoryTask;
use std::io::Write;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("rendering the CRDs: {0}")]
    Crds(#[from] serde_yaml::Error),
    #[error("writing to stdout: {0}")]
    Stdout(#[from] std::io::Error),
    #[error(transparent)]
    Certs(#[from] stash::certs::CertError),
    #[error(transparent)]
    Operator(#[from] stash::operator::OperatorError),
    #[error("{0}")]
    Flags(String),
    #[error(transparent)]
    Session(#[from] stash::session::SessionError),
    #[error("connecting to the Kubernetes API (KUBECONFIG or in-cluster config): {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Agent(#[from] stash::agent::AgentError),
    #[error(transparent)]
    Plugin(#[from] stash::plugin::PluginError),
}

/// One program under two names: `kubectl-stash` (the kubectl plugin) offers the user's verbs,
/// `stash` every role as well (also `src/bin/kubectl-stash.rs`, which is this file).
pub(crate) fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let (program, result) = match stash::cli::plugin_invocation(&argv0) {
        Some(typed) => {
            // Help and errors speak of the command as the user typed it.
            let matches = PluginCli::command().bin_name(typed.clone()).get_matches();
            let cli = PluginCli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
            init_tracing("warn");
            (typed, run_plugin(cli.command))
        }
        None => {
            let cli = Cli::parse();
            init_tracing("info");
            ("stash".to_string(), run(cli.command))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{program}: {err}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn run_plugin(command: PluginCommand) -> Result<(), MainError> {
    match command {
        PluginCommand::User(command) => run_user(command),
        PluginCommand::Restore(args) => {
            let request = stash::plugin::restore::RestoreRequest {
                namespace: String::new(),
                batch: args.batch.name.clone(),
                session: args.session,
                before: args.before,
                to_namespace: args.to_namespace,
                name: args.restore_name,
            };
            batch_command(args.batch, |client, namespace, _| async move {
                let request = stash::plugin::restore::RestoreRequest { namespace, ..request };
                let (namespace, name) = stash::plugin::restore::create(client, request).await?;
                println!("restorebatch/{name} created in namespace {namespace}");
                println!("follow it with: kubectl get restorebatch {name} -n {namespace} -w");
                Ok(())
            })
        }
        PluginCommand::Completion(args) => {
            let mut command = PluginCli::command().bin_name("kubectl-stash");
            clap_complete::generate(args.shell, &mut command, "kubectl-stash", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// Prints `value` as `-o` asks, else `table()`.
fn print_read<T: serde::Serialize>(
    value: &T,
    output: &stash::cli::OutputArgs,
    table: impl FnOnce(&T) -> String,
) -> Result<(), MainError> {
    let text = match output.output {
        Some(format) => stash::plugin::render(value, format)?,
        None => table(value),
    };
    print!("{text}");
    Ok(())
}

fn run_user(command: UserCommand) -> Result<(), MainError> {
    match command {
        UserCommand::Trigger(args) => batch_command(args, |client, namespace, name| async move {
            let session = stash::commands::trigger(client, &namespace, &name).await?;
            println!("backupsession/{session} created");
            Ok(())
        }),
        UserCommand::Pause(args) => batch_command(args, |client, namespace, name| async move {
            stash::commands::set_paused(client, &namespace, &name, true).await?;
            println!("backupbatch/{name} paused");
            Ok(())
        }),
        UserCommand::Resume(args) => batch_command(args, |client, namespace, name| async move {
            stash::commands::set_paused(client, &namespace, &name, false).await?;
            println!("backupbatch/{name} resumed");
            Ok(())
        }),
        UserCommand::Sessions(args) if args.from_repository => {
            // A user's command: without -n, the kubeconfig's current namespace, as everywhere else.
            let namespace = match args.batch.namespace.clone() {
                Some(namespace) => namespace,
                None => runtime()?.block_on(kube::Config::infer()).map_err(kube::Error::InferConfig)?.default_namespace,
            };
            let namespace = Some(namespace);
            let name = args.batch.name.clone();
            executor_command(namespace, args.executor, "cli", |executor| async move {
                print!("{}", stash::commands::repository_sessions_table(&executor, &name).await?);
                Ok(())
            })
        }
        UserCommand::Sessions(args) => {
            let output = args.output;
            batch_command(args.batch, |client, namespace, name| async move {
                let sessions = stash::commands::batch_sessions(client, &namespace, &name).await?;
                print_read(&sessions, &output, |s| stash::commands::render_sessions(s.clone()))
            })
        }
        UserCommand::Describe(args) => {
            let output = args.output;
            batch_command(args.batch, |client, namespace, name| async move {
                match output.output {
                    None => print!("{}", stash::commands::describe(client, &namespace, &name).await?),
                    Some(_) => {
                        let found = stash::commands::description(client, &namespace, &name).await?;
                        print_read(&found, &output, |_| String::new())?;
                    }
                }
                Ok(())
            })
        }
        UserCommand::Snapshots(args) => repository_command(args, RepositoryTask::Snapshots),
        UserCommand::Check(args) => repository_command(args, RepositoryTask::Check),
        UserCommand::Unlock(args) => repository_command(args, RepositoryTask::Unlock),
        UserCommand::Logs(args) => {
            let batch = stash::cli::BatchArgs { name: args.session, namespace: args.namespace };
            batch_command(batch, |client, namespace, session| async move {
                print!("{}", stash::plugin::logs::session_logs(client, &namespace, &session).await?);
                Ok(())
            })
        }
    }
}

/// snapshots, check, unlock: a Job in the cluster, its report printed. A failed check exits non-zero.
fn repository_command(args: stash::cli::RepositoryCommandArgs, task: RepositoryTask) -> Result<(), MainError> {
    let (output, image, timeout) = (args.output, args.image, args.timeout);
    batch_command(args.batch, |client, namespace, batch| async move {
        let request = stash::plugin::repository_job::TaskRequest { namespace, batch, task, image, timeout };
        let report = stash::plugin::repository_job::run(client, request).await?;
        print_read(&report, &output, stash::plugin::report::render_report)?;
        if let stash::plugin::report::RepositoryReport::Check { repository, healthy: false } = report {
            let message = format!("restic check found errors in Repository {repository}");
            return Err(stash::plugin::PluginError::Job(message).into());
        }
        Ok(())
    })
}

fn run(command: Command) -> Result<(), MainError> {
    match command {
        Command::Crds => {
            std::io::stdout().write_all(stash::api::crds_yaml()?.as_bytes())?;
            Ok(())
        }
        Command::Certs(CertsCommand::Generate(args)) => Ok(stash::certs::generate_to_dir(
            &args.out_dir,
            &args.dns,
            &args.ip,
            args.ca_dir.as_deref(),
            args.validity,
            args.ca_validity,
        )?),
        Command::Operator(args) => {
            args.lease_problem().map_err(MainError::Flags)?;
            let config = operator_config(args);
            runtime()?.block_on(async {
                let cancel = shutdown_on_signal();
                let kube_config = operator_kube_config().await.map_err(stash::operator::OperatorError::from)?;
                stash::operator::run(kube_config, config, cancel).await
            })?;
            Ok(())
        }
        Command::CreateBackupsession(args) => {
            if args.invoker_kind != stash::session::BACKUP_BATCH_KIND {
                return Err(stash::session::SessionError::UnsupportedInvoker(args.invoker_kind).into());
            }
            let namespace = stash::session::resolve_namespace(args.namespace)?;
            runtime()?.block_on(async {
                let client = kube::Client::try_default().await?;
                let session =
                    stash::session::create_backup_session(client, &namespace, &args.invoker_name, None).await?;
                println!("backupsession/{} created", kube::ResourceExt::name_any(&session));
                Ok(())
            })
        }
        Command::User(command) => run_user(command),
        Command::RepositoryTask(args) => {
            let (batch, task, result) = (args.batch, args.task, args.result);
            executor_command(args.namespace, args.executor, "repository-task", |executor| async move {
                Ok(stash::agent::repository_task::run(&executor, &batch, task, &result).await?)
            })
        }
        Command::RunBackup(args) => {
            let target = stash::agent::sidecar::SidecarTarget {
                batch: args.invoker.invoker_name,
                kind: args.target_kind,
                name: args.target_name,
            };
            executor_command(args.invoker.namespace, args.executor, "sidecar", |executor| async move {
                let cancel = shutdown_on_signal();
                Ok(stash::agent::sidecar::run(&executor, &target, cancel).await?)
            })
        }
        Command::BackupJob(args) => {
            let job = stash::agent::job::JobTarget {
                batch: args.invoker.invoker_name,
                session: args.session,
                kind: args.target_kind,
                name: args.target_name,
                database_secret_dir: args.database_secret_dir,
            };
            executor_command(args.invoker.namespace, args.executor, "backup-job", |executor| async move {
                Ok(stash::agent::job::run(&executor, &job).await?)
            })
        }
        Command::FinalizeSession(args) => {
            let session = args.session;
            executor_command(args.namespace, args.executor, "finalize", |executor| async move {
                Ok(stash::agent::finalize::run(&executor, &session).await?)
            })
        }
        Command::RunHook(args) => {
            let (session, hook) = (args.session, args.hook);
            executor_command(args.namespace, args.executor, "hook", |executor| async move {
                Ok(stash::agent::hook::run(&executor, &session, hook).await?)
            })
        }
        Command::Restore(args) => {
            let target = stash::agent::restore::RestoreTarget {
                restore_batch: args.restore_batch,
                kind: args.target_kind,
                name: args.target_name,
                database_secret_dir: args.database_secret_dir,
            };
            executor_command(args.namespace, args.executor, "restore", |executor| async move {
                Ok(stash::agent::restore::run(&executor, &target).await?)
            })
        }
    }
}

/// Runs an executor role with a client from KUBECONFIG or the in-cluster config.
fn executor_command<F, Fut>(
    namespace: Option<String>,
    args: stash::cli::ExecutorArgs,
    role: &str,
    command: F,
) -> Result<(), MainError>
where
    F: FnOnce(stash::agent::Executor) -> Fut,
    Fut: std::future::Future<Output = Result<(), MainError>>,
{
    let namespace = stash::session::resolve_namespace(namespace)?;
    runtime()?.block_on(async {
        let client = kube::Client::try_default().await?;
        let settings = stash::agent::ExecutorSettings {
            namespace,
            pod_name: args.pod_name,
            node_name: args.node_name,
            secret_dir: args.secret_dir,
            restic_binary: args.restic_binary,
            path_root: args.path_root,
            cache_dir: args.cache_dir,
        };
        command(stash::agent::Executor::new(client, settings, role)).await
    })
}

fn operator_config(args: Box<stash::cli::OperatorArgs>) -> stash::operator::OperatorConfig {
    use stash::operator::CertificateSource;
    let args = *args;
    let certificates = if args.self_signed_certs {
        let service = &args.webhook_service_name;
        let namespace = &args.namespace;
        CertificateSource::SelfSigned(stash::webhook::self_signed::SelfSignedConfig {
            dns_names: vec![format!("{service}.{namespace}.svc"), format!("{service}.{namespace}.svc.cluster.local")],
            ips: args.cert_ips,
            namespace: args.namespace.clone(),
            secret_name: args.cert_secret_name,
            webhook_configuration: args.webhook_configuration_name,
            leaf_lifetime: args.cert_validity,
            ca_lifetime: args.ca_validity,
            check_interval: args.cert_check_interval,
            propagation_delay: args.ca_propagation_delay,
        })
    } else {
        CertificateSource::Files {
            files: stash::webhook::tls::CertificateFiles { cert: args.tls_cert_file, key: args.tls_key_file },
            poll: args.cert_poll_interval,
            ca_bundle: args.ca_bundle_file.map(|path| stash::webhook::ca_bundle::CaBundleFile {
                path,
                webhook_configuration: args.webhook_configuration_name,
                injector_secret: args.ca_bundle_secret.map(|name| stash::webhook::ca_bundle::InjectorSecret {
                    namespace: args.namespace.clone(),
                    name,
                    propagation_delay: args.ca_propagation_delay,
                }),
            }),
        }
    };
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let controllers = (!args.disable_controllers).then(|| {
        let settings = stash::controller::ControllerSettings {
            image: args.job_image.clone().unwrap_or_else(|| args.sidecar_image.clone()),
            namespace: args.watch_namespace.clone(),
            identity: identity.clone(),
            stall_after: args.stall_after,
            max_concurrent_reconciles: args.max_concurrent_reconciles,
        };
        let lease = stash::lease::LeaseConfig {
            namespace: args.namespace.clone(),
            name: args.lease_name.clone(),
            identity,
            duration: args.lease_duration,
            renew_every: args.lease_renew_interval,
        };
        (settings, lease)
    });
    let names = args.webhook_client_names;
    let webhook_client_auth =
        args.webhook_client_ca_file.map(|ca_file| stash::webhook::client_auth::ClientAuth { ca_file, names });
    stash::operator::OperatorConfig {
        controllers,
        webhook_client_auth,
        webhook_addr: args.webhook_addr,
        admin_addr: args.admin_addr,
        certificates,
        sidecar_image: args.sidecar_image,
        max_body_bytes: args.max_body_bytes,
    }
}

/// A client configuration that names itself, so that API server audit logs tell the operator's
/// requests apart.
async fn operator_kube_config() -> Result<kube::Config, kube::Error> {
    let mut config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    let agent = concat!("stash-operator/", env!("CARGO_PKG_VERSION"));
    config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_static(agent)));
    Ok(config)
}

/// Runs a command about one BackupBatch, in `--namespace` or the kubeconfig's namespace.
fn batch_command<F, Fut>(args: stash::cli::BatchArgs, command: F) -> Result<(), MainError>
where
    F: FnOnce(kube::Client, String, String) -> Fut,
    Fut: std::future::Future<Output = Result<(), MainError>>,
{
    runtime()?.block_on(async {
        let client = kube::Client::try_default().await?;
        let namespace = args.namespace.unwrap_or_else(|| client.default_namespace().to_string());
        command(client, namespace, args.name).await
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// Cancelled on SIGTERM or Ctrl-C.
fn shutdown_on_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    trigger.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        trigger.cancel();
    });
    cancel
}
