//! berthctl's connection to the operator port: TLS verified against the fleet CA (a file or a
//! pinned fingerprint), authenticated by an operator certificate or a bearer token.

use std::path::{Path, PathBuf};

use berth_shared::leader::{Coordinators, FleetChannel, Resend};
use berth_shared::pki::{self, Fingerprint, cert_der_from_pem};
use berth_shared::proto::operator_service_client::OperatorServiceClient;
use berth_shared::tls::{ClientIdentity, ServerTrust, client_config};
use berth_shared::transport::CoordinatorUrl;
use tonic::service::interceptor::InterceptedService;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Tls(#[from] berth_shared::tls::TlsError),
    #[error(transparent)]
    Endpoint(#[from] berth_shared::transport::EndpointError),
}

/// How berthctl reaches and proves itself to the coordinator.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    pub coordinator: String,
    pub ca_cert: Option<PathBuf>,
    pub ca_fingerprint: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn read(path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|source| ClientError::Read {
        path: path.into(),
        source,
    })
}

/// Adds `authorization: Bearer` to every call when a token is configured.
#[derive(Debug, Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type OperatorClient = OperatorServiceClient<InterceptedService<FleetChannel, BearerToken>>;

pub fn connect(options: &ClientOptions) -> Result<OperatorClient, ClientError> {
    let urls = CoordinatorUrl::parse_list("--coordinator", &options.coordinator)?;
    let trust = match (&options.ca_cert, &options.ca_fingerprint) {
        (Some(path), _) => ServerTrust::Ca(cert_der_from_pem(&read(path)?)?),
        (None, Some(fp)) => ServerTrust::Pinned(Fingerprint::parse(fp)?),
        (None, None) => {
            return Err(ClientError::Usage(
                "no way to verify the coordinator: give --ca-cert FILE or --ca-fingerprint SHA256 (or BERTH_CA_CERT / BERTH_CA_FINGERPRINT)".into(),
            ))
        }
    };
    let identity = match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => {
            let chain = vec![cert_der_from_pem(&read(cert)?)?];
            let key = pki::private_key_der(&pki::read_private_key(key)?);
            Some(ClientIdentity { chain, key })
        }
        (None, None) => None,
        _ => return Err(ClientError::Usage("--cert and --key go together".into())),
    };
    let token = match (&options.token, &options.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(path)) => Some(read(path)?.trim().to_string()),
        (None, None) => None,
    };
    if identity.is_none() && token.is_none() {
        return Err(ClientError::Usage(
            "no operator credential: give --token-file FILE (or BERTH_TOKEN) or --cert and --key"
                .into(),
        ));
    }
    let bearer = token
        .map(|t| {
            format!("Bearer {t}").parse().map_err(|_| {
                ClientError::Usage("the operator token has characters a header cannot carry".into())
            })
        })
        .transpose()?;
    let tls = client_config(trust, identity)?;
    Ok(OperatorServiceClient::with_interceptor(
        // A restart answers only once the tenant is healthy again. A standby's answer is
        // followed to the leader, and the call made there.
        FleetChannel::new(
            Coordinators::new(urls),
            tls,
            crate::coordinator::RESTART_WAIT + std::time::Duration::from_secs(30),
            Resend::Requests,
        ),
        BearerToken(bearer),
    )
    .max_decoding_message_size(berth_shared::transport::OPERATOR_MESSAGE_BYTES)
    .max_encoding_message_size(berth_shared::transport::OPERATOR_MESSAGE_BYTES))
}
