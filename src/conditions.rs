//! Status conditions: set one, keeping its transition time when its status did not change.

use crate::api::common::{Condition, ConditionStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// A condition to set: type, status, reason, message.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: ConditionStatus,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(type_: &'static str, ok: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        let status = if ok { ConditionStatus::True } else { ConditionStatus::False };
        Self { type_, status, reason: reason.into(), message: message.into() }
    }

    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Sets `desired` in `conditions`. Returns the previous status when the status changed (a transition
/// worth an Event), `None` otherwise.
pub fn set(
    conditions: &mut Vec<Condition>,
    desired: &Desired,
    generation: Option<i64>,
) -> Option<Option<ConditionStatus>> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    match conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        Some(existing) => {
            let previous = existing.status;
            if previous != desired.status {
                existing.last_transition_time = Some(now);
            }
            existing.status = desired.status;
            existing.reason = Some(desired.reason.clone());
            existing.message = Some(desired.message.clone());
            existing.observed_generation = generation;
            existing.severity = None; // Stash's, if it wrote this condition: no longer what it says
            (previous != desired.status).then_some(Some(previous))
        }
        None => {
            conditions.push(Condition {
                type_: desired.type_.to_string(),
                status: desired.status,
                observed_generation: generation,
                last_transition_time: Some(now),
                reason: Some(desired.reason.clone()),
                message: Some(desired.message.clone()),
                severity: None,
            });
            Some(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_are_reported_once_and_keep_their_time() {
        let mut conditions = Vec::new();
        let ready = Desired::new("RepositoryFound", true, "RepositoryAvailable", "found");
        assert_eq!(set(&mut conditions, &ready, Some(1)), Some(None));
        let first_time = conditions[0].last_transition_time.clone();
        assert_eq!(set(&mut conditions, &ready, Some(2)), None, "no transition");
        assert_eq!(conditions[0].last_transition_time, first_time);
        let lost = Desired::new("RepositoryFound", false, "RepositoryNotFound", "gone");
        assert_eq!(set(&mut conditions, &lost, Some(2)), Some(Some(ConditionStatus::True)));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].reason.as_deref(), Some("RepositoryNotFound"));
    }
}
