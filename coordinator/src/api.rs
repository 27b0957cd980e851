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
