//! Workload kinds a BackupBatch member can target and whose Pods can carry the sidecar: shared by
//! the webhook (which Pods to inject) and the controller (which workloads to check and restart).

/// A workload kind whose Pods can carry the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    ReplicationController,
}

impl WorkloadKind {
    pub fn parse(kind: &str) -> Option<Self> {
        match kind {
            "Deployment" => Some(WorkloadKind::Deployment),
            "ReplicaSet" => Some(WorkloadKind::ReplicaSet),
            "StatefulSet" => Some(WorkloadKind::StatefulSet),
            "DaemonSet" => Some(WorkloadKind::DaemonSet),
            "ReplicationController" => Some(WorkloadKind::ReplicationController),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::ReplicaSet => "ReplicaSet",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::ReplicationController => "ReplicationController",
        }
    }

    /// The API group of the kind (`apps`, or the core group).
    pub fn group(self) -> &'static str {
        match self {
            WorkloadKind::ReplicationController => "",
            _ => "apps",
        }
    }
}
