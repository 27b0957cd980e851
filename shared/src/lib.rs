//! berth-shared: what the coordinator and the agent both need.
//!
//! Ensures: host and tenant ids are valid wherever they exist ([`ids`]); certificates carry
//! identities chosen by the CA ([`pki`]); every connection is TLS with verifiers berth controls
//! ([`tls`], [`transport`]); state sits behind one [`store::Store`] trait.

pub mod backup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod field;
pub mod host;
pub mod ids;
pub mod leader;
pub mod metrics;
pub mod pki;
pub mod reach;
pub mod secret;
pub mod spec;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod transport;
pub mod units;

/// Generated protobuf and gRPC code for `proto/berth/v1`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("berth.v1");
}
