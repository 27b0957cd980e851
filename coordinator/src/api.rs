//! The coordinator's interfaces: the agent port's sessions (`agent`), the operator port's gRPC
//! (`operator`) and REST (`rest`) APIs with the JSON shapes they share (`views`), the local
//! administration socket (`admin`), and berthctl's client of the operator port (`client`).

pub mod admin;
pub mod agent;
pub mod client;
pub mod failure;
pub mod operator;
pub mod rest;
pub mod views;

use std::sync::Arc;

use crate::coordinator::Coordinator;
use crate::drain::Drainer;

/// What the API layers serve from: the coordinator and its drainer.
#[derive(Debug, Clone)]
pub struct Backend {
    pub coordinator: Arc<Coordinator>,
    pub drainer: Arc<Drainer>,
}

impl Backend {
    pub fn new(drainer: Arc<Drainer>) -> Self {
        Self {
            coordinator: drainer.coordinator.clone(),
            drainer,
        }
    }
}

impl axum::extract::FromRef<Backend> for Arc<Coordinator> {
    fn from_ref(backend: &Backend) -> Self {
        backend.coordinator.clone()
    }
}

impl axum::extract::FromRef<Backend> for Arc<Drainer> {
    fn from_ref(backend: &Backend) -> Self {
        backend.drainer.clone()
    }
}
