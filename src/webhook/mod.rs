//! The mutating admission webhook: injects the `stash` sidecar into targeted Pods at creation.

pub mod ca_bundle;
pub mod caches;
pub mod client_auth;
pub mod decision;
pub mod mutate;
#[cfg(test)]
mod mutate_props;
#[cfg(test)]
mod mutate_tests;
pub mod pod_view;
pub mod review;
pub mod routes;
pub mod self_signed;
pub mod server;
pub mod sidecar;
pub mod target_index;
pub mod tls;
