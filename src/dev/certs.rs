//! Development certificates (rcgen): a CA, a server certificate, and client certificates with SPIFFE URIs.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};

/// The client identities a development vault is set up with.
pub const DEV_CLIENTS: [&str; 3] = ["app", "admin", "auditor"];
pub const SPIFFE_DOMAIN: &str = "spiffe://credvault.local";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error(transparent)]
    Public(#[from] crate::hardening::FileError),
}

/// A certificate and its private key, both PEM.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number, to revoke it.
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuedCert { key: [REDACTED] }")
    }
}

/// A throwaway certificate authority for development and tests.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa { key: [REDACTED] }")
    }
}

/// What a leaf certificate names.
#[derive(Debug, Clone)]
pub enum Subject<'a> {
    /// A server: DNS names and IP addresses.
    Server(&'a [&'a str]),
    /// A client: these URI SANs (normally exactly one).
    ClientUris(&'a [&'a str]),
    /// A client named only by a DNS SAN.
    ClientDns(&'a str),
}

impl DevCa {
    pub fn generate(name: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn issue(&self, common_name: &str, subject: Subject<'_>) -> Result<IssuedCert, CertError> {
        self.issue_with(common_name, subject, |_| {})
    }

    /// As [`DevCa::issue`], letting `tweak` change the parameters last (validity,
    /// key usages, CA flag): for tests of certificates that must be refused.
    pub fn issue_with(
        &self,
        common_name: &str,
        subject: Subject<'_>,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Result<IssuedCert, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match subject {
            Subject::Server(names) => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                for name in names {
                    params.subject_alt_names.push(match name.parse() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName((*name).try_into()?),
                    });
                }
            }
            Subject::ClientUris(uris) => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                for uri in uris {
                    params
                        .subject_alt_names
                        .push(SanType::URI((*uri).try_into()?));
                }
            }
            Subject::ClientDns(name) => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                params
                    .subject_alt_names
                    .push(SanType::DnsName(name.try_into()?));
            }
        }
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| rcgen::Error::RingUnspecified)?;
        serial[0] &= 0x7f; // positive, as DER integers for serials must be
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        tweak(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial.to_vec(),
        })
    }

    /// A CRL (PEM) signed by this CA, revoking the certificates with these serials.
    pub fn crl(&self, revoked: &[&[u8]]) -> Result<String, CertError> {
        let params = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: rcgen::date_time_ymd(2025, 1, 2),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "credvault development");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The files [`init`] writes.
#[derive(Debug, Clone)]
pub struct DevCertPaths {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub dir: PathBuf,
}

impl DevCertPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            dir: dir.to_owned(),
        }
    }

    pub fn client_cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn client_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }
}

/// Writes a development CA, server certificate (`localhost`, `127.0.0.1`,
/// `::1`) and the `app`, `admin` and `auditor` client certificates into `dir`.
/// Private keys get mode 0600. Refuses to overwrite existing files.
pub fn init(dir: &Path) -> Result<DevCertPaths, CertError> {
    let paths = DevCertPaths::new(dir);
    let mut files = vec![
        paths.ca.clone(),
        paths.server_cert.clone(),
        paths.server_key.clone(),
    ];
    for name in DEV_CLIENTS {
        files.push(paths.client_cert(name));
        files.push(paths.client_key(name));
    }
    if let Some(existing) = files.iter().find(|p| p.exists()) {
        return Err(CertError::Exists(existing.clone()));
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::File {
        path: dir.to_owned(),
        source,
    })?;
    let ca = DevCa::generate("credvault development CA")?;
    write_public(&paths.ca, ca.cert_pem())?;
    let server = ca.issue(
        "localhost",
        Subject::Server(&["localhost", "127.0.0.1", "::1"]),
    )?;
    write_public(&paths.server_cert, &server.cert_pem)?;
    write_private(&paths.server_key, server.key_pem.as_bytes())?;
    for name in DEV_CLIENTS {
        let uri = format!("{SPIFFE_DOMAIN}/{name}");
        let client = ca.issue(name, Subject::ClientUris(&[&uri]))?;
        write_public(&paths.client_cert(name), &client.cert_pem)?;
        write_private(&paths.client_key(name), client.key_pem.as_bytes())?;
    }
    Ok(paths)
}

/// Mode 0644, not writable by others: the vault refuses a CA bundle others may write.
fn write_public(path: &Path, text: &str) -> Result<(), CertError> {
    Ok(crate::hardening::write_public(
        "certificate",
        path,
        text.as_bytes(),
    )?)
}

/// Creates a file only its owner can read; fails if it exists.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file_err = |source| CertError::File {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err)?;
    file.write_all(bytes).map_err(file_err)?;
    file.sync_all().map_err(file_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_every_file_with_private_keys_0600_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let paths = init(dir.path()).unwrap();
        for name in DEV_CLIENTS {
            assert!(paths.client_cert(name).exists());
            let mode = std::fs::metadata(paths.client_key(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mode = std::fs::metadata(&paths.server_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(init(dir.path()), Err(CertError::Exists(_))));
    }
}
