//! How the API layers answer a failure. Each domain error is classified here, once, into a
//! [`Kind`]; each protocol then maps the kinds once: gRPC codes ([`Kind::code`]) and HTTP
//! statuses ([`Kind::http`]). No domain module knows either protocol.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_shared::ids::IdError;
use berth_shared::store::StoreError;
use tonic::{Code, Status};

use crate::coordinator::{AuthError, BackupError, RestartError};
use crate::drain::{DrainError, DrainRequestError};
use crate::placement::PlaceError;
use crate::registry::RegistryError;
use crate::sessions::LinkError;

/// What kind of failure a call met, whatever the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is malformed or names something that cannot be.
    BadRequest,
    /// No valid credential.
    Unauthenticated,
    /// A valid credential that may not do this.
    Forbidden,
    NotFound,
    /// It exists already, or conflicts with what does.
    Conflict,
    /// No room: no host fits, or a rate limit.
    Exhausted,
    /// The fleet is not in the state this needs.
    Precondition,
    /// A host or a step is not reachable now; trying again may work.
    Unavailable,
    /// No answer in time; what was asked may still happen.
    Timeout,
    /// A fault of the coordinator (its store, its state).
    Internal,
}

impl Kind {
    /// The gRPC code of this kind.
    pub fn code(self) -> Code {
        match self {
            Kind::BadRequest => Code::InvalidArgument,
            Kind::Unauthenticated => Code::Unauthenticated,
            Kind::Forbidden => Code::PermissionDenied,
            Kind::NotFound => Code::NotFound,
            Kind::Conflict => Code::AlreadyExists,
            Kind::Exhausted => Code::ResourceExhausted,
            Kind::Precondition => Code::FailedPrecondition,
            Kind::Unavailable => Code::Unavailable,
            Kind::Timeout => Code::DeadlineExceeded,
            Kind::Internal => Code::Internal,
        }
    }

    /// The HTTP status of this kind.
    pub fn http(self) -> StatusCode {
        match self {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::Unauthenticated => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::Exhausted | Kind::Precondition => StatusCode::UNPROCESSABLE_ENTITY,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A failed call: its kind and the message the caller reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: Kind, message: impl std::fmt::Display) -> Self {
        Self {
            kind,
            message: message.to_string(),
        }
    }

    /// A malformed field, named as the caller wrote it.
    pub fn field(field: &str, why: impl std::fmt::Display) -> Self {
        Self::new(Kind::BadRequest, format!("{field}: {why}"))
    }
}

/// A domain error as a gRPC status, through its [`Failure`].
pub fn status(e: impl Into<Failure>) -> Status {
    e.into().into()
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Self {
        Status::new(f.kind.code(), f.message)
    }
}

/// Rendered as `{"code": "<gRPC code name>", "error": "<message>"}`: the same code names as
/// the gRPC API, so both read alike.
impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": format!("{:?}", self.kind.code()),
            "error": self.message,
        });
        (self.kind.http(), Json(body)).into_response()
    }
}

/// A store that cannot be reached or written now (members down, a leader whose leadership
/// lapsed or ended) is unavailable: trying again, perhaps at another coordinator, may work. Any other store failure is the
/// coordinator's own.
fn store_kind(e: &StoreError) -> Kind {
    match e {
        StoreError::LeadershipLapsed { .. } | StoreError::Fenced | StoreError::Unreachable(_) => {
            Kind::Unavailable
        }
        StoreError::Open { .. } | StoreError::Io(_) | StoreError::Corrupt { .. } => Kind::Internal,
    }
}

fn with(kind: Kind, e: impl std::fmt::Display) -> Failure {
    Failure::new(kind, e)
}

impl From<PlaceError> for Failure {
    fn from(e: PlaceError) -> Self {
        let kind = match &e {
            PlaceError::Invalid(_) => Kind::BadRequest,
            PlaceError::Conflict { .. } => Kind::Conflict,
            PlaceError::NoFit(_) => Kind::Exhausted,
            PlaceError::UnknownTenant(_) => Kind::NotFound,
            PlaceError::RetainedVolume { .. } | PlaceError::HostRefuses { .. } => {
                Kind::Precondition
            }
            PlaceError::PurgeIncomplete { .. } => Kind::Unavailable,
            PlaceError::Store(e) => store_kind(e),
        };
        with(kind, e)
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        let kind = match &e {
            RegistryError::BadEnrollmentToken => Kind::Unauthenticated,
            RegistryError::UnknownHost(_)
            | RegistryError::UnknownSerial(_)
            | RegistryError::UnknownOperator(_) => Kind::NotFound,
            RegistryError::RenewalTooSoon { .. } => Kind::Exhausted,
            RegistryError::WrongState { .. } => Kind::Precondition,
            RegistryError::Store(e) => store_kind(e),
        };
        with(kind, e)
    }
}

impl From<DrainError> for Failure {
    fn from(e: DrainError) -> Self {
        with(drain_kind(&e), e)
    }
}

fn drain_kind(e: &DrainError) -> Kind {
    match e {
        DrainError::UnknownHost(_) | DrainError::NoDrain(_) => Kind::NotFound,
        DrainError::AlreadyDraining(_) => Kind::Conflict,
        DrainError::Refused { .. } | DrainError::NothingToRestore(_) => Kind::Precondition,
        // Answered as what stopped it; the message names the drains that did start.
        DrainError::CompactionStopped { cause, .. } => drain_kind(cause),
        DrainError::Store(e) | DrainError::Registry(RegistryError::Store(e)) => store_kind(e),
        DrainError::Registry(_) => Kind::Internal,
    }
}

impl From<DrainRequestError> for Failure {
    fn from(e: DrainRequestError) -> Self {
        with(Kind::BadRequest, e)
    }
}

impl From<LinkError> for Failure {
    fn from(e: LinkError) -> Self {
        let kind = match &e {
            LinkError::NotConnected { .. } | LinkError::SessionClosed { .. } => Kind::Unavailable,
            LinkError::Lost { .. } => Kind::Unavailable,
            LinkError::NoAnswer { .. } => Kind::Timeout,
            LinkError::Mismatched { .. } => Kind::Internal,
        };
        with(kind, e)
    }
}

impl From<BackupError> for Failure {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::Link(link) => link.into(),
            BackupError::Place(place) => place.into(),
            BackupError::UnknownTenant(_) | BackupError::NoSnapshot { .. } => {
                with(Kind::NotFound, e)
            }
            BackupError::BadSnapshot(_) => with(Kind::BadRequest, e),
            BackupError::NotConfigured
            | BackupError::SourceUnreachable { .. }
            | BackupError::Failed { .. }
            | BackupError::NeverBackedUp(_)
            | BackupError::NotRestored { .. } => with(Kind::Precondition, e),
            BackupError::StoredPlacement(_) | BackupError::Keys(_) => with(Kind::Internal, e),
        }
    }
}

impl From<RestartError> for Failure {
    fn from(e: RestartError) -> Self {
        match e {
            RestartError::Link(link) => link.into(),
            RestartError::UnknownTenant(_) => with(Kind::NotFound, e),
            RestartError::StoredPlacement(_) => with(Kind::Internal, e),
            RestartError::Failed { .. } => with(Kind::Precondition, e),
        }
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        let kind = match &e {
            AuthError::Registry(RegistryError::Store(e)) => store_kind(e),
            AuthError::NoTransport | AuthError::Registry(_) => Kind::Internal,
            AuthError::BadCertificate(_)
            | AuthError::Revoked
            | AuthError::Expired
            | AuthError::NoCertificate
            | AuthError::NoCredential
            | AuthError::NotBearer
            | AuthError::BadToken => Kind::Unauthenticated,
            AuthError::OperatorAsHost | AuthError::HostAsOperator | AuthError::ReadOnly(_) => {
                Kind::Forbidden
            }
        };
        with(kind, e)
    }
}

/// An id from the request that is not one; `field` names it as the caller wrote it.
pub fn bad_id(field: &str) -> impl FnOnce(IdError) -> Failure + '_ {
    move |e| Failure::field(field, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_protocols_answer_every_kind_alike() {
        let all = [
            Kind::BadRequest,
            Kind::Unauthenticated,
            Kind::Forbidden,
            Kind::NotFound,
            Kind::Conflict,
            Kind::Exhausted,
            Kind::Precondition,
            Kind::Unavailable,
            Kind::Timeout,
            Kind::Internal,
        ];
        let pairs: Vec<(Code, u16)> = all.iter().map(|k| (k.code(), k.http().as_u16())).collect();
        assert_eq!(
            pairs,
            [
                (Code::InvalidArgument, 400),
                (Code::Unauthenticated, 401),
                (Code::PermissionDenied, 403),
                (Code::NotFound, 404),
                (Code::AlreadyExists, 409),
                (Code::ResourceExhausted, 422),
                (Code::FailedPrecondition, 422),
                (Code::Unavailable, 503),
                (Code::DeadlineExceeded, 504),
                (Code::Internal, 500),
            ]
        );
        let status = status(DrainError::NoDrain("h1".into()));
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "no drain of host h1")
        );
    }
}
