//! The coordinator's plain HTTP port: `/healthz` (always open). The dashboard and `/metrics`
//! come with the capacity-dashboard work.

use axum::Router;
use axum::routing::get;

pub fn router() -> Router {
    Router::new().route("/healthz", get(|| async { "ok\n" }))
}
