//! stash: batch backup for Kubernetes applications, API-compatible with Stash's v1beta1 BackupBatch.

pub mod admin;
pub mod agent;
pub mod api;
mod api_requests;
pub mod certs;
pub mod cli;
pub mod commands;
pub mod conditions;
pub mod controller;
pub mod executor_pod;
pub mod hooks;
pub mod install;
pub mod lease;
pub mod metrics;
pub mod names;
pub mod operator;
pub mod plugin;
mod reflect;
pub mod restic;
pub mod session;
pub mod status_write;
pub mod tenancy;
pub mod webhook;
pub mod workload;
