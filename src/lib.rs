//! stash: batch backup for Kubernetes applications, API-compatible with Stash's v1beta1 BackupBatch.

pub mod api;
pub mod cli;
pub mod webhook;
