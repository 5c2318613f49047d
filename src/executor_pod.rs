//! The shape of every executor's Pod and container — the injected sidecar and the backup, finalize
//! and restore Jobs alike: the container, its securityContext and env, the repository Secret's
//! volume, where data and secrets are mounted, and what the controller tells a restore about its host.
//! Shared by the webhook and the controller, which build these Pods, and the agent, which runs in them.

use crate::api::common::{ContainerRuntimeSettings, PodRuntimeSettings};
use crate::api::restore_batch::RestoreRule;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, SeccompProfile, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount,
};
use kube::core::ObjectMeta;
use std::collections::BTreeMap;

pub const SIDECAR_NAME: &str = "stash";
/// Set by the webhook on each Pod it gives the sidecar, naming the BackupBatch whose member the Pod
/// belongs to.
pub const BATCH_ANNOTATION: &str = "stash.appscode.com/backup-batch";
/// Set by the webhook, beside [`BATCH_ANNOTATION`], on each Pod it gives the sidecar. A label, so
/// that the controllers' Pod watch asks the API server for these Pods only: its cache grows with the
/// Pods backed up, not with the cluster.
pub const SIDECAR_LABEL: (&str, &str) = ("stash.appscode.com/sidecar", "injected");
pub const TMP_MOUNT_PATH: &str = "/tmp";
pub const SECRET_MOUNT_PATH: &str = "/etc/stash/repository/secret";
/// Where a backup or restore Job mounts the member's connection Secret.
pub const DEFAULT_DATABASE_SECRET_DIR: &str = "/etc/stash/database";
/// Where a PVC is mounted when the member names no volumeMounts.
pub const DEFAULT_DATA_PATH: &str = "/stash-data";
/// A member whose target is a Secret is a database; the Secret holds its connection.
pub const DATABASE_KIND: &str = "Secret";
/// A member whose target is Stash's AppBinding is a database too (see `controller::app_binding`).
pub const APP_BINDING_KIND: &str = "AppBinding";

/// Whether a member of target kind `kind` is a database, whose Job dumps or loads it.
pub fn is_database(kind: &str) -> bool {
    kind == DATABASE_KIND || kind == APP_BINDING_KIND
}

/// The database engines whose clients the image carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    Mysql,
}

impl Engine {
    /// From a Secret member's task name, as Stash named its tasks (`postgres-backup-15`,
    /// `mysql-backup-8.0.21`); no task is PostgreSQL. A task of another engine is an error, never
    /// PostgreSQL by default.
    pub fn from_task(task: Option<&str>) -> Result<Engine, String> {
        match task {
            None => Ok(Engine::Postgres),
            Some(task) => Engine::named_by(task).ok_or_else(|| {
                format!("task.name {task:?} names no database engine stash dumps (postgres…, mysql…, mariadb…)")
            }),
        }
    }

    /// The engine a task or application type names (`postgres…`, `mysql…`, `mariadb…`), if any.
    pub(crate) fn named_by(name: &str) -> Option<Engine> {
        let name = name.to_ascii_lowercase();
        if name.starts_with("mysql") || name.starts_with("mariadb") {
            Some(Engine::Mysql)
        } else if name.starts_with("postgres") {
            Some(Engine::Postgres)
        } else {
            None
        }
    }
}

/// Why the database member at `index` (a Secret target) cannot be dumped or loaded, if it cannot.
pub fn database_task_refusal(index: usize, kind: &str, task: Option<&str>) -> Option<String> {
    (kind == DATABASE_KIND)
        .then(|| Engine::from_task(task).err())
        .flatten()
        .map(|why| format!("spec.members[{index}].{why}"))
}
pub const PVC_KIND: &str = "PersistentVolumeClaim";

/// Where a member's PVC is mounted in its Job: its volumeMounts, else DEFAULT_DATA_PATH.
pub fn data_mounts(volume_mounts: &[VolumeMount]) -> Vec<VolumeMount> {
    if volume_mounts.is_empty() {
        vec![VolumeMount { mount_path: DEFAULT_DATA_PATH.into(), ..Default::default() }]
    } else {
        volume_mounts.to_vec()
    }
}

/// Where a restore Job restores to: a writable scratch directory with the member's claims mounted
/// below it at their mountPaths, so that the directories restic restores above them are writable.
pub(crate) const RESTORE_ROOT: &str = "/stash-restore";

/// The restore Job's env var naming the host it restores (the agent cannot tell a StatefulSet
/// ordinal from its own Pod name, which is the Job's).
pub(crate) const RESTORE_HOST_ENV: &str = "STASH_RESTORE_HOST";

/// The rule that applies to `host`: the first whose targetHosts name it or are empty. With no
/// rules every host restores everything of its own snapshot.
pub(crate) fn rule_for<'a>(host: &str, rules: &'a [RestoreRule]) -> Option<&'a RestoreRule> {
    rules.iter().find(|r| r.target_hosts.is_empty() || r.target_hosts.iter().any(|h| h == host))
}

/// A container running a `stash` executor (sidecar or backup Job) with the member's runtime settings.
/// Its securityContext is the member's own, as given (it need not be `restricted`), or `restricted()`.
pub fn executor_container(
    name: &str,
    image: &str,
    args: Vec<String>,
    runtime: Option<&ContainerRuntimeSettings>,
    mounts: Vec<VolumeMount>,
) -> Container {
    Container {
        name: name.into(),
        image: Some(image.into()),
        args: Some(args),
        env: Some(executor_env(runtime)),
        env_from: runtime.map(|r| r.env_from.clone()).filter(|e| !e.is_empty()),
        resources: runtime.and_then(|r| r.resources.clone()),
        security_context: Some(runtime.and_then(|r| r.security_context.clone()).unwrap_or_else(restricted)),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// What Pod Security `restricted` asks of every container: without it a restricted namespace rejects
/// the whole Pod. The image runs as a numeric non-root user, so `runAsNonRoot` holds; executors write
/// only to their `/tmp` volume, so the root filesystem is read-only.
pub(crate) fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

/// What every executor is told about its Pod, from the downward API: the namespace it acts for
/// (its tenancy checks), its lock-holder identity and its host name.
const POD_FIELDS: [(&str, &str); 3] =
    [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"), ("NODE_NAME", "spec.nodeName")];

/// What every executor (sidecar or Job) is told about its Pod, then the member's own env, which
/// may refer to these (`$(POD_NAME)`) and may not set them: validation refuses such an entry
/// ([`env_refusal`]), and a sidecar the webhook injects for a batch refused so leaves it out.
pub(crate) fn executor_env(runtime: Option<&ContainerRuntimeSettings>) -> Vec<EnvVar> {
    let mut env: Vec<EnvVar> = POD_FIELDS.iter().map(|(name, path)| field_env(name, path)).collect();
    let own = runtime.map(|r| r.env.as_slice()).unwrap_or_default();
    env.extend(own.iter().filter(|e| !from_the_pod(&e.name)).cloned());
    env
}

/// Whether an executor sets `name` from its Pod.
fn from_the_pod(name: &str) -> bool {
    POD_FIELDS.iter().any(|(field, _)| *field == name)
}

/// Why `runtime`'s env is refused, if it is: it names a variable the executor sets from its Pod
/// (an executor told another namespace would run its checks as that namespace's).
pub(crate) fn env_refusal(runtime: Option<&ContainerRuntimeSettings>) -> Option<String> {
    let env = runtime.map(|r| r.env.as_slice()).unwrap_or_default();
    let set = env.iter().find(|e| from_the_pod(&e.name))?;
    Some(format!("container.env[{}]", set.name))
}

/// What [`env_refusal`] says of a refused variable.
pub(crate) const ENV_REFUSED_WHY: &str = "stash sets it from the Pod";

/// An environment variable from the Pod's own fields (the downward API).
pub fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Secret as a volume. World-readable inside the container that mounts it: executors run as
/// whatever non-root user the Pod has (the image's, or the application's for a sidecar), which is
/// never the files' owner, and only our container mounts the volume. Optional: a Secret missing from
/// the Pod's namespace must not hold an application's Pod in ContainerCreating (the sidecar's) or a
/// Job's until its deadline; the executor finds the volume empty and says which Secret is missing.
pub(crate) fn secret_volume(name: &str, secret_name: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name.into()),
            default_mode: Some(0o444),
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod-level `runtimeSettings` as a PodSpec to merge under a Pod's own fields. The identity is
/// not among them: our Pods run as the ServiceAccounts the operator grants their rights to.
pub(crate) fn pod_settings(pod: Option<&PodRuntimeSettings>) -> PodSpec {
    let Some(pod) = pod else { return PodSpec::default() };
    PodSpec {
        node_selector: Some(pod.node_selector.clone()).filter(|s| !s.is_empty()),
        node_name: pod.node_name.clone(),
        security_context: pod.security_context.clone(),
        image_pull_secrets: Some(pod.image_pull_secrets.clone()).filter(|s| !s.is_empty()),
        affinity: pod.affinity.clone(),
        tolerations: Some(pod.tolerations.clone()).filter(|t| !t.is_empty()),
        priority_class_name: pod.priority_class_name.clone(),
        priority: pod.priority,
        scheduler_name: pod.scheduler_name.clone(),
        runtime_class_name: pod.runtime_class_name.clone(),
        automount_service_account_token: pod.automount_service_account_token,
        enable_service_links: pod.enable_service_links,
        ..Default::default()
    }
}

/// A pod template's metadata: `labels` over the settings' `podLabels` (ours select and own the
/// Pods, so they win), and the settings' `podAnnotations`.
pub(crate) fn pod_metadata(labels: BTreeMap<String, String>, pod: Option<&PodRuntimeSettings>) -> ObjectMeta {
    let mut merged = pod.map(|p| p.pod_labels.clone()).unwrap_or_default();
    merged.extend(labels);
    ObjectMeta {
        labels: Some(merged),
        annotations: pod.map(|p| p.pod_annotations.clone()).filter(|a| !a.is_empty()),
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What Pod Security `restricted` asks of a container that the Pod does not provide.
    pub(crate) fn assert_restricted(context: Option<&SecurityContext>) {
        let context = context.expect("a securityContext");
        assert_eq!(context.allow_privilege_escalation, Some(false));
        assert_eq!(context.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_string()]));
        assert_eq!(context.run_as_non_root, Some(true));
        assert_eq!(context.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
    }

    /// Executor Jobs share the container builder: the same default, and the member's own context wins.
    #[test]
    fn executor_containers_default_to_restricted_and_keep_a_user_context() {
        const IMAGE: &str = "stash:test";
        assert_restricted(executor_container("stash", IMAGE, Vec::new(), None, Vec::new()).security_context.as_ref());
        let runtime: ContainerRuntimeSettings =
            serde_json::from_value(serde_json::json!({"securityContext": {"runAsUser": 0}})).expect("runtime settings");
        let container = executor_container("stash", IMAGE, Vec::new(), Some(&runtime), Vec::new());
        assert_eq!(container.security_context, runtime.security_context, "the member's own context, as given");
    }

    /// A user's env may not set a variable an executor takes from its Pod: the namespace it acts
    /// for is one.
    #[test]
    fn an_env_may_not_set_what_the_executor_takes_from_its_pod() {
        let runtime = |name: &str| -> ContainerRuntimeSettings {
            serde_json::from_value(
                serde_json::json!({"env": [{"name": "A", "value": "$(POD_NAME)"}, {"name": name, "value": "b"}]}),
            )
            .expect("runtime settings")
        };
        assert_eq!(env_refusal(Some(&runtime("POD_NAMESPACE"))).as_deref(), Some("container.env[POD_NAMESPACE]"));
        assert_eq!(env_refusal(Some(&runtime("B"))), None);
        assert_eq!(env_refusal(None), None);
        let env = executor_env(Some(&runtime("POD_NAMESPACE")));
        let namespaces: Vec<&EnvVar> = env.iter().filter(|e| e.name == "POD_NAMESPACE").collect();
        assert_eq!(namespaces.len(), 1, "{env:?}");
        assert!(namespaces[0].value_from.is_some(), "from the Pod: {env:?}");
    }
}
