//! TLS to PostgreSQL, with `sslmode` meaning what it means to libpq users,
//! and `verify-full` when the URL names none.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and this
//! store used to verify the certificate for all of them: `require` then
//! failed against a server with a self-signed certificate, `verify-full` was
//! refused as "not a PostgreSQL URL", and a URL without `sslmode` fell back
//! to plaintext silently. The URL's `sslmode` is now read here:
//!
//! | `sslmode` | TLS | certificate checked |
//! | --- | --- | --- |
//! | `disable` | never | - |
//! | `allow`, `prefer` | if the server offers it | no |
//! | `require` | always | no; with `storage.ca_file`, its CA (as `verify-ca`) |
//! | `verify-ca` | always | chain to the system roots or `storage.ca_file` |
//! | `verify-full` (none given) | always | chain, and the host name |

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::store::StoreError;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// What tokio-postgres negotiates for it.
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Negotiate;
        match self {
            SslMode::Disable => Negotiate::Disable,
            SslMode::Allow | SslMode::Prefer => Negotiate::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Negotiate::Require,
        }
    }
}

/// The URL without its `sslmode` (for tokio-postgres), and the mode:
/// `verify-full` when the URL names none.
pub fn split_sslmode(url: &str) -> Result<(String, SslMode), String> {
    let mut parsed = url::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "postgres" | "postgresql"))
        .ok_or(
            "storage.url is not a postgres:// URL (write postgres://user@host:port/database\
             ?sslmode=…; key=value connection strings are not read here)",
        )?;
    let mut mode = None;
    let mut rest = Vec::new();
    for (key, value) in parsed.query_pairs() {
        if key == "sslmode" {
            if mode.is_some() {
                // libpq takes the last; a URL reading as two things is refused.
                return Err("storage.url names sslmode twice".to_owned());
            }
            mode = Some(SslMode::parse(&value).ok_or_else(|| {
                format!(
                    "storage.url: sslmode={value} is not one of disable, allow, prefer, \
                     require, verify-ca, verify-full"
                )
            })?);
        } else {
            rest.push((key.into_owned(), value.into_owned()));
        }
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    Ok((parsed.to_string(), mode.unwrap_or(SslMode::VerifyFull)))
}

/// What an operator should know about a mode before trusting it, for the
/// start-up log; `None` when the connection is encrypted and verified (or
/// plaintext on loopback, on purpose).
pub fn weakness(mode: SslMode, has_ca_file: bool, loopback: bool) -> Option<&'static str> {
    match mode {
        SslMode::Disable if loopback => None,
        SslMode::Disable => Some(
            "storage.url has sslmode=disable: the database connection, its password included, \
             crosses the network in plaintext; use sslmode=verify-full",
        ),
        SslMode::Allow | SslMode::Prefer => Some(
            "storage.url has sslmode=prefer (or allow): the connection falls back to plaintext \
             if the server offers no TLS, and the server's certificate is not checked; use \
             sslmode=verify-full",
        ),
        SslMode::Require if !has_ca_file => Some(
            "storage.url has sslmode=require: the connection is encrypted but, as in libpq, \
             the server's certificate is not checked, so anyone on the path can pose as the \
             database; use sslmode=verify-full with storage.ca_file",
        ),
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => None,
    }
}

/// A TLS connector that checks the server's certificate as `mode` says,
/// against the system roots and `ca_file`.
pub fn connector(
    mode: SslMode,
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Connect(e.to_string()))?;
    let checked = || -> Result<Arc<WebPkiServerVerifier>, StoreError> {
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(ca_file)?),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| StoreError::Connect(format!("storage.ca_file: {e}")))
    };
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::VerifyFull => checked()?,
        SslMode::VerifyCa => Arc::new(AnyName(checked()?)),
        SslMode::Require if ca_file.is_some() => Arc::new(AnyName(checked()?)),
        SslMode::Disable | SslMode::Allow | SslMode::Prefer | SslMode::Require => {
            Arc::new(Unchecked(provider))
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        let certs = crate::hardening::read_trusted_certs("storage.ca_file", path)
            .map_err(StoreError::Connect)?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| StoreError::Connect(format!("storage.ca_file: {e}")))?;
        }
    }
    Ok(roots)
}

/// `verify-ca`: the chain must reach a trusted CA; the name is not checked.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` without a CA file, `prefer`, `allow`: libpq checks no
/// certificate, so neither does this (the start-up log warns). The handshake
/// signature is still checked, so the peer holds the certificate's key.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_read_from_the_url_and_verify_full_when_absent() {
        let (url, mode) = split_sslmode("postgres://u@db:5432/v").unwrap();
        assert_eq!(
            (url.as_str(), mode),
            ("postgres://u@db:5432/v", SslMode::VerifyFull)
        );
        let (url, mode) =
            split_sslmode("postgres://u@db/v?application_name=x&sslmode=verify-ca").unwrap();
        assert_eq!(url, "postgres://u@db/v?application_name=x");
        assert_eq!(mode, SslMode::VerifyCa);
        let (_, mode) = split_sslmode("postgres://u@db/v?sslmode=require").unwrap();
        assert_eq!(mode.negotiation(), tokio_postgres::config::SslMode::Require);
        let err = split_sslmode("postgres://u@db/v?sslmode=verify").unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
        // Read decoded, once: an encoded or repeated key cannot turn TLS off.
        let err =
            split_sslmode("postgres://u@db/v?sslmode=verify-full&ssl%6Dode=disable").unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err = split_sslmode("host=db user=u sslmode=disable").unwrap_err();
        assert!(err.contains("postgres://"), "{err}");
    }

    #[test]
    fn modes_that_do_not_verify_are_named_at_start_up() {
        assert!(weakness(SslMode::Require, false, false).is_some());
        assert!(weakness(SslMode::Require, true, false).is_none());
        assert!(weakness(SslMode::Prefer, true, true).is_some());
        assert!(weakness(SslMode::Disable, false, true).is_none());
        assert!(weakness(SslMode::Disable, false, false).is_some());
        assert!(weakness(SslMode::VerifyFull, false, false).is_none());
    }
}
