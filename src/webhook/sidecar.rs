//! The `stash` sidecar and the JSON patch that adds it to a Pod.

use super::decision::Injection;
use super::pod_view::PodView;
use crate::api::common::EmptyDirSettings;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector, SecretVolumeSource, Volume, VolumeMount,
};
use kube::ResourceExt;
use serde_json::Value;

pub const SIDECAR_NAME: &str = "stash";
/// Names the BackupBatch whose member the Pod belongs to.
pub const BATCH_ANNOTATION: &str = "stash.appscode.com/backup-batch";
pub const TMP_VOLUME: &str = "stash-tmp-dir";
pub const SECRET_VOLUME: &str = "stash-repository-secret";
pub const TMP_MOUNT_PATH: &str = "/tmp";
pub const SECRET_MOUNT_PATH: &str = "/etc/stash/repository/secret";

/// The patch that injects the sidecar, its volumes and the batch annotation.
pub fn injection_patch(pod: &PodView, injection: &Injection, image: &str) -> Result<Patch, serde_json::Error> {
    let mut ops = Vec::with_capacity(5);
    let container = serde_json::to_value(sidecar_container(pod, injection, image))?;
    ops.push(add(&["spec", "containers", "-"], container));

    let volumes = [tmp_volume(injection.member().temp_dir.as_ref()), secret_volume(&injection.secret_name)];
    match pod.spec.volumes {
        None => ops.push(add(&["spec", "volumes"], serde_json::to_value(volumes)?)),
        Some(_) => {
            for volume in volumes {
                ops.push(add(&["spec", "volumes", "-"], serde_json::to_value(volume)?));
            }
        }
    }

    let batch = Value::String(injection.batch.name_any());
    match pod.metadata.annotations {
        None => ops.push(add(&["metadata", "annotations"], serde_json::json!({ BATCH_ANNOTATION: batch }))),
        Some(_) => ops.push(add(&["metadata", "annotations", BATCH_ANNOTATION], batch)),
    }
    Ok(Patch(ops))
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(tokens.iter().copied()), value })
}

fn sidecar_container(pod: &PodView, injection: &Injection, image: &str) -> Container {
    let member = injection.member();
    let runtime = member.runtime_settings.as_ref().and_then(|r| r.container.as_ref());
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("NODE_NAME", "spec.nodeName"),
    ];
    env.extend(runtime.map(|r| r.env.clone()).unwrap_or_default());

    // Target mounts are read-only; a mount naming a volume the Pod lacks (or one of our paths) is
    // left out rather than making the Pod invalid — the controller reports the member instead.
    let mut mounts: Vec<VolumeMount> = member
        .target
        .volume_mounts
        .iter()
        .filter(|m| pod.has_volume(&m.name) && m.mount_path != TMP_MOUNT_PATH && m.mount_path != SECRET_MOUNT_PATH)
        .map(|m| VolumeMount { read_only: Some(true), ..m.clone() })
        .collect();
    mounts.push(VolumeMount { name: TMP_VOLUME.into(), mount_path: TMP_MOUNT_PATH.into(), ..Default::default() });
    mounts.push(VolumeMount {
        name: SECRET_VOLUME.into(),
        mount_path: SECRET_MOUNT_PATH.into(),
        read_only: Some(true),
        ..Default::default()
    });

    Container {
        name: SIDECAR_NAME.into(),
        image: Some(image.into()),
        args: Some(vec![
            "run-backup".into(),
            "--invoker-kind=BackupBatch".into(),
            format!("--invoker-name={}", injection.batch.name_any()),
            format!("--target-kind={}", injection.workload.kind.as_str()),
            format!("--target-name={}", injection.workload.name),
        ]),
        env: Some(env),
        env_from: runtime.map(|r| r.env_from.clone()).filter(|e| !e.is_empty()),
        resources: runtime.and_then(|r| r.resources.clone()),
        security_context: runtime.and_then(|r| r.security_context.clone()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tmp_volume(settings: Option<&EmptyDirSettings>) -> Volume {
    Volume {
        name: TMP_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: settings.and_then(|s| s.medium.clone()),
            size_limit: settings.and_then(|s| s.size_limit.clone()),
        }),
        ..Default::default()
    }
}

fn secret_volume(secret_name: &str) -> Volume {
    Volume {
        name: SECRET_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name.into()),
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Default::default()
    }
}
