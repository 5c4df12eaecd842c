//! TLS material for `amqps://` and `rediss://` (`broker.tls`, `store.tls`): a private CA and
//! an optional client certificate, read from PEM files and checked before anything connects,
//! so a wrong path, an expired certificate or a key that isn't the certificate's is named
//! at `validate` and at start, never found as a hang. rustls with ring does the TLS itself.

use crate::config::TlsFiles;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

/// The PEM text of a `tls = { … }` table, checked.
#[derive(Debug, Clone, Default)]
pub struct Material {
    /// The CA certificates that sign the server's certificate (none: the public roots).
    pub ca: Option<Vec<u8>>,
    /// The client certificate chain and its key, for servers that ask for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Material {
    /// The material of `tls`, or none when the table is absent.
    pub fn of(tls: Option<&TlsFiles>, base: &Path, at: &str) -> Result<Material, Vec<String>> {
        tls.map_or_else(
            || Ok(Material::default()),
            |files| Material::load(files, base, at),
        )
    }

    /// Reads and checks the files of `files` (relative paths start at `base`); `at` names
    /// the table in errors (`"broker.tls"`).
    pub fn load(files: &TlsFiles, base: &Path, at: &str) -> Result<Material, Vec<String>> {
        let mut problems = Vec::new();
        let mut read = |key: &str, path: &Path, check: fn(&[u8]) -> Result<(), String>| {
            let path = base.join(path);
            match std::fs::read(&path) {
                Ok(pem) => match check(&pem) {
                    Ok(()) => Some(pem),
                    Err(why) => {
                        problems.push(format!("{at}.{key} {}: {why}", path.display()));
                        None
                    }
                },
                Err(e) => {
                    problems.push(format!(
                        "{at}.{key} {}: cannot read it: {e}",
                        path.display()
                    ));
                    None
                }
            }
        };
        let ca = files
            .ca_file
            .as_deref()
            .and_then(|p| read("ca_file", p, check_certificates));
        let cert = files
            .cert_file
            .as_deref()
            .and_then(|p| read("cert_file", p, check_certificates));
        let key = files
            .key_file
            .as_deref()
            .and_then(|p| read("key_file", p, check_key));
        if files.cert_file.is_some() != files.key_file.is_some() {
            problems.push(format!(
                "{at}: cert_file and key_file go together (a client certificate needs its key)"
            ));
        }
        let identity = cert.zip(key);
        if let Some((cert, key)) = &identity {
            if let Err(why) = check_pair(cert, key) {
                problems.push(format!("{at}: cert_file and key_file {why}"));
            }
        }
        if problems.is_empty() {
            Ok(Material { ca, identity })
        } else {
            Err(problems)
        }
    }

    /// The same for lapin (amqps://): the CA is added to the public roots.
    pub fn for_lapin(&self) -> lapin::tcp::OwnedTLSConfig {
        let cert_chain = self
            .ca
            .as_ref()
            .map(|pem| String::from_utf8_lossy(pem).into_owned());
        let identity = self
            .identity
            .as_ref()
            .map(|(pem, key)| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: pem.clone(),
                key: key.clone(),
            });
        lapin::tcp::OwnedTLSConfig {
            identity,
            cert_chain,
        }
    }

    /// The same for the redis crate (rediss://): the CA, when given, is the only root.
    pub fn for_redis(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .identity
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

/// At least one certificate, each readable and valid today.
fn check_certificates(pem: &[u8]) -> Result<(), String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    for cert in &certs {
        check_dates(cert)?;
    }
    Ok(())
}

fn check_dates(cert: &CertificateDer<'_>) -> Result<(), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("holds a certificate that cannot be read: {e}"))?;
    let validity = parsed.validity();
    let subject = parsed.subject().to_string();
    if !validity.is_valid() {
        return Err(format!(
            "certificate {subject:?} is valid only from {} to {}",
            validity.not_before, validity.not_after
        ));
    }
    Ok(())
}

fn check_key(pem: &[u8]) -> Result<(), String> {
    PrivateKeyDer::from_pem_slice(pem)
        .map(|_| ())
        .map_err(|e| format!("holds no private key rustls can use: {e}"))
}

/// The key is the one of the certificate.
fn check_pair(cert: &[u8], key: &[u8]) -> Result<(), String> {
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| e.to_string())?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("hold a key of a kind rustls cannot sign with: {e}"))?;
    rustls::sign::CertifiedKey::new(certs, signing)
        .keys_match()
        .map_err(|e| format!("do not match: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_and_half_pairs_are_named() {
        let files = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            cert_file: Some("/nonexistent/client.pem".into()),
            key_file: None,
        };
        let problems = Material::load(&files, Path::new("."), "broker.tls").unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("broker.tls.ca_file /nonexistent/ca.pem: cannot read")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("go together")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        assert!(check_certificates(b"hello")
            .unwrap_err()
            .contains("no certificate"));
        assert!(check_key(b"hello").unwrap_err().contains("no private key"));
    }
}
