//! The JSON patch that adds the `stash` sidecar to a Pod; the container it adds is shaped like every
//! executor's, by [`crate::executor_pod`].

use super::decision::{Injection, Workload};
use super::pod_view::PodView;
use super::review::EncodedPatch;
use crate::api::common::EmptyDirSettings;
use crate::executor_pod::{
    BATCH_ANNOTATION, SECRET_MOUNT_PATH, SIDECAR_LABEL, SIDECAR_NAME, TMP_MOUNT_PATH, executor_container, secret_volume,
};
use k8s_openapi::api::core::v1::{Container, EmptyDirVolumeSource, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

pub const TMP_VOLUME: &str = "stash-tmp-dir";
pub const SECRET_VOLUME: &str = "stash-repository-secret";
/// A `local` repository's volume in the sidecar.
pub const REPOSITORY_VOLUME: &str = "stash-repository";

/// Why a targeted Pod is admitted without the sidecar (and with a warning saying so).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotInjected {
    #[error(
        "the stash container would mount volumes {first:?} and {second:?} both at {path:?}; \
         change the member's volumeMounts or the Repository's local mountPath"
    )]
    DuplicateMountPath { path: String, first: String, second: String },
    #[error("the patch could not be written: {0}")]
    Patch(#[from] serde_json::Error),
}

/// Rendered patches, by everything a patch is made of: the versions of the batch and Repository,
/// the member, and the few facts of the Pod the patch reads. The Pods of one workload share one
/// shape, so admission renders a member's sidecar once per version instead of once per Pod.
#[derive(Default)]
pub(crate) struct PatchCache {
    rendered: Mutex<HashMap<PatchKey, Arc<EncodedPatch>>>,
}

/// Patches kept at most; older batch and Repository versions are never asked for again, so starting
/// over when full bounds memory without tracking them.
const CACHED_PATCHES_MAX: usize = 1024;

impl PatchCache {
    /// The JSON patch (RFC 6902) that injects the sidecar, its volumes, the batch annotation and the
    /// sidecar label, or why the Pod would not be valid with it.
    pub(crate) fn patch(
        &self,
        pod: &PodView,
        injection: &Injection,
        image: &str,
    ) -> Result<Arc<EncodedPatch>, NotInjected> {
        let encoded = |names: &VolumeNames| Ok(Arc::new(EncodedPatch::new(render(pod, injection, image, names)?)));
        let key = match PatchKey::new(pod, injection, VolumeNames::free_in(pod)) {
            Ok(key) => key,
            Err(names) => return encoded(&names),
        };
        if let Some(rendered) = self.lock().get(&key) {
            return Ok(rendered.clone());
        }
        let patch = encoded(&key.names)?;
        let mut rendered = self.lock();
        if rendered.len() >= CACHED_PATCHES_MAX {
            rendered.clear();
        }
        rendered.insert(key, patch.clone());
        Ok(patch)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PatchKey, Arc<EncodedPatch>>> {
        // A panic while holding the lock leaves a map of complete entries: still usable.
        self.rendered.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Everything [`render`] reads. An object's uid and resourceVersion name its content exactly; an
/// object without them (never one from the API server) is not cached.
#[derive(PartialEq, Eq, Hash)]
struct PatchKey {
    batch: (String, String),
    repository: (String, String),
    member: usize,
    workload: Workload,
    names: VolumeNames,
    /// Which of the member's volumeMounts name a volume of the Pod.
    mounted: Vec<bool>,
    runs_as_root: bool,
    has_volumes: bool,
    has_annotations: bool,
    has_labels: bool,
}

impl PatchKey {
    /// The key of the patch for `pod`, which takes `names`; without the batch's and Repository's
    /// versions (nothing would say when a patch went stale) there is none, and `names` come back.
    fn new(pod: &PodView, injection: &Injection, names: VolumeNames) -> Result<Self, VolumeNames> {
        let version = |meta: &ObjectMeta| Some((meta.uid.clone()?, meta.resource_version.clone()?));
        let (Some(batch), Some(repository)) =
            (version(&injection.batch.metadata), version(&injection.repository.metadata))
        else {
            return Err(names);
        };
        Ok(Self {
            batch,
            repository,
            member: injection.member,
            workload: injection.workload.clone(),
            names,
            mounted: injection.member().target.volume_mounts.iter().map(|m| pod.has_volume(&m.name)).collect(),
            runs_as_root: pod.runs_as_root(),
            has_volumes: pod.spec.volumes.is_some(),
            has_annotations: pod.metadata.annotations.is_some(),
            has_labels: !pod.metadata.labels.is_empty(),
        })
    }
}

/// Written straight into bytes: building a `serde_json::Value` tree first cost more than answering
/// the rest of the review (see BENCHMARKS.md).
fn render(pod: &PodView, injection: &Injection, image: &str, names: &VolumeNames) -> Result<Vec<u8>, NotInjected> {
    let container = sidecar_container(pod, injection, image, names)?;
    let mut patch = PatchWriter::default();
    patch.add("/spec/containers/-", &container)?;
    let backend = &injection.repository.spec.backend;
    let mut volumes = vec![
        tmp_volume(&names.tmp, injection.member().temp_dir.as_ref()),
        secret_volume(&names.secret, &backend.storage_secret_name),
    ];
    if let Some(local) = &backend.local {
        volumes.push(local.volume(&names.repository).0);
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
    // An empty or null labels map is replaced whole (a member cannot be added to null).
    if pod.metadata.labels.is_empty() {
        patch.add("/metadata/labels", &BTreeMap::from([SIDECAR_LABEL]))?;
    } else {
        patch.add("/metadata/labels/stash.appscode.com~1sidecar", &SIDECAR_LABEL.1)?;
    }
    Ok(patch.finish())
}

/// The names of the volumes the patch adds: ours, unless the Pod already has a volume of that name.
#[derive(Clone, PartialEq, Eq, Hash)]
struct VolumeNames {
    tmp: String,
    secret: String,
    repository: String,
}

impl VolumeNames {
    fn free_in(pod: &PodView) -> Self {
        let free = |base: &str| {
            // Numbered rather than random: a retried review must give the same patch.
            let mut name = base.to_string();
            let mut n = 0;
            while pod.has_volume(&name) {
                n += 1;
                name = format!("{base}-{n}");
            }
            name
        };
        Self { tmp: free(TMP_VOLUME), secret: free(SECRET_VOLUME), repository: free(REPOSITORY_VOLUME) }
    }
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

fn sidecar_container(
    pod: &PodView,
    injection: &Injection,
    image: &str,
    names: &VolumeNames,
) -> Result<Container, NotInjected> {
    let member = injection.member();
    let runtime = member.runtime_settings.as_deref().and_then(|r| r.container.as_ref());

    // Target mounts are read-only; a mount naming a volume the Pod lacks is left out rather than
    // making the Pod invalid — the controller reports the member instead.
    let mut mounts: Vec<VolumeMount> = member
        .target
        .volume_mounts
        .iter()
        .filter(|m| pod.has_volume(&m.name))
        .map(|m| VolumeMount { read_only: Some(true), ..m.clone() })
        .collect();
    mounts.push(VolumeMount { name: names.tmp.clone(), mount_path: TMP_MOUNT_PATH.into(), ..Default::default() });
    mounts.push(VolumeMount {
        name: names.secret.clone(),
        mount_path: SECRET_MOUNT_PATH.into(),
        read_only: Some(true),
        ..Default::default()
    });
    if let Some(local) = &injection.repository.spec.backend.local {
        mounts.push(local.volume(&names.repository).1);
    }
    distinct_mount_paths(&mounts)?;

    let args = vec![
        "run-backup".into(),
        "--invoker-kind=BackupBatch".into(),
        format!("--invoker-name={}", injection.batch.name_any()),
        format!("--target-kind={}", injection.workload.kind.as_str()),
        format!("--target-name={}", injection.workload.name),
    ];
    let mut container = executor_container(SIDECAR_NAME, image, args, runtime, mounts);
    // A Pod that asks for uid 0 is not `restricted` anyway, and the kubelet would refuse to start a
    // container that must not run as root but would.
    if pod.runs_as_root()
        && runtime.is_none_or(|r| r.security_context.is_none())
        && let Some(context) = container.security_context.as_mut()
    {
        context.run_as_non_root = None;
    }
    Ok(container)
}

/// The API server rejects a container that mounts two volumes at one path; `/a/` counts as `/a`,
/// as it does for the container runtime.
fn distinct_mount_paths(mounts: &[VolumeMount]) -> Result<(), NotInjected> {
    let mut seen = BTreeMap::new();
    for mount in mounts {
        if let Some(first) = seen.insert(mount.mount_path.trim_end_matches('/'), &mount.name) {
            return Err(NotInjected::DuplicateMountPath {
                path: mount.mount_path.clone(),
                first: first.clone(),
                second: mount.name.clone(),
            });
        }
    }
    Ok(())
}

fn tmp_volume(name: &str, settings: Option<&EmptyDirSettings>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: settings.and_then(|s| s.medium.clone()),
            size_limit: settings.and_then(|s| s.size_limit.clone()),
        }),
        ..Default::default()
    }
}
