//! The `stash` sidecar and the JSON patch that adds it to a Pod.

use super::decision::Injection;
use super::pod_view::PodView;
use crate::api::common::{ContainerRuntimeSettings, EmptyDirSettings};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector, SecretVolumeSource, Volume, VolumeMount,
};
use kube::ResourceExt;
use serde::Serialize;
use std::collections::BTreeMap;

pub const SIDECAR_NAME: &str = "stash";
/// Names the BackupBatch whose member the Pod belongs to.
pub const BATCH_ANNOTATION: &str = "stash.appscode.com/backup-batch";
pub const TMP_VOLUME: &str = "stash-tmp-dir";
pub const SECRET_VOLUME: &str = "stash-repository-secret";
/// A `local` repository's volume in the sidecar.
pub const REPOSITORY_VOLUME: &str = "stash-repository";
pub const TMP_MOUNT_PATH: &str = "/tmp";
pub const SECRET_MOUNT_PATH: &str = "/etc/stash/repository/secret";

/// The JSON patch (RFC 6902) that injects the sidecar, its volumes and the batch annotation.
///
/// Written straight into bytes: building a `serde_json::Value` tree first cost more than answering
/// the rest of the review (see BENCHMARKS.md).
pub fn injection_patch(pod: &PodView, injection: &Injection, image: &str) -> Result<Vec<u8>, serde_json::Error> {
    let mut patch = PatchWriter::default();
    patch.add("/spec/containers/-", &sidecar_container(pod, injection, image))?;
    let mut volumes = vec![tmp_volume(injection.member().temp_dir.as_ref()), secret_volume(&injection.secret_name)];
    if let Some(local) = &injection.local_repository {
        volumes.push(local.volume(REPOSITORY_VOLUME).0);
    }
    match pod.spec.volumes {
        None => patch.add("/spec/volumes", &volumes)?,
        Some(_) => {
            for volume in &volumes {
                patch.add("/spec/volumes/-", volume)?;
            }
        }
    }
    let batch = injection.batch.name_any();
    match pod.metadata.annotations {
        None => patch.add("/metadata/annotations", &BTreeMap::from([(BATCH_ANNOTATION, &batch)]))?,
        // `/` in the key is escaped as `~1` in a JSON pointer.
        Some(_) => patch.add("/metadata/annotations/stash.appscode.com~1backup-batch", &batch)?,
    }
    Ok(patch.finish())
}

/// Appends `add` operations to a JSON patch array.
#[derive(Default)]
struct PatchWriter {
    json: Vec<u8>,
}

impl PatchWriter {
    fn add(&mut self, path: &str, value: &impl Serialize) -> Result<(), serde_json::Error> {
        self.json.push(if self.json.is_empty() { b'[' } else { b',' });
        self.json.extend_from_slice(br#"{"op":"add","path":"#);
        serde_json::to_writer(&mut self.json, path)?;
        self.json.extend_from_slice(br#","value":"#);
        serde_json::to_writer(&mut self.json, value)?;
        self.json.push(b'}');
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        if self.json.is_empty() {
            self.json.push(b'[');
        }
        self.json.push(b']');
        self.json
    }
}

fn sidecar_container(pod: &PodView, injection: &Injection, image: &str) -> Container {
    let member = injection.member();
    let runtime = member.runtime_settings.as_ref().and_then(|r| r.container.as_ref());

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
    if let Some(local) = &injection.local_repository {
        mounts.push(local.volume(REPOSITORY_VOLUME).1);
    }

    let args = vec![
        "run-backup".into(),
        "--invoker-kind=BackupBatch".into(),
        format!("--invoker-name={}", injection.batch.name_any()),
        format!("--target-kind={}", injection.workload.kind.as_str()),
        format!("--target-name={}", injection.workload.name),
    ];
    executor_container(SIDECAR_NAME, image, args, runtime, mounts)
}

/// A container running a `stash` executor (sidecar or backup Job) with the member's runtime settings.
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
        security_context: runtime.and_then(|r| r.security_context.clone()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// What every executor (sidecar or backup Job) is told about its Pod, then the member's own env.
pub fn executor_env(runtime: Option<&ContainerRuntimeSettings>) -> Vec<EnvVar> {
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("NODE_NAME", "spec.nodeName"),
    ];
    env.extend(runtime.map(|r| r.env.clone()).unwrap_or_default());
    env
}

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
