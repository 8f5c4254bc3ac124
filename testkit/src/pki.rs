//! A throwaway PKI for TLS upstreams and mTLS: a CA generated per test, its
//! leaf certificates, and a rustls server configuration for
//! [`Upstream::start_tls`](crate::Upstream::start_tls).
//!
//! ```no_run
//! use testkit::{TestPki, TempDir, Upstream, response};
//!
//! # async fn example() {
//! let pki = TestPki::new("test CA");
//! let upstream = Upstream::start_tls(pki.server_config(&["h2", "http/1.1"], None), |_req| async {
//!     response(200, "over TLS")
//! })
//! .await;
//! let dir = TempDir::new();
//! let ca_file = dir.write("ca.pem", &pki.ca_pem); // for --upstream-ca-file
//! # drop((upstream, ca_file));
//! # }
//! ```

use std::sync::Arc;

use crate::upstream::TlsServerConfig;

/// A certificate and its key, as PEM and DER.
pub struct Leaf {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key (PKCS#8), PEM.
    pub key_pem: String,
    /// Certificate, DER.
    pub cert_der: rustls_pki_types::CertificateDer<'static>,
    /// Private key, DER.
    pub key_der: rustls_pki_types::PrivateKeyDer<'static>,
}

/// A CA generated for one test.
pub struct TestPki {
    /// The CA certificate, PEM (what `--upstream-ca-file` points to).
    pub ca_pem: String,
    ca_der: rustls_pki_types::CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    /// Generates a CA named `name`.
    pub fn new(name: &str) -> TestPki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestPki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) with the
    /// given extended key usage.
    pub fn issue(&self, names: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) -> Leaf {
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("leaf"),
        );
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }

    /// A client certificate for mTLS.
    pub fn client_leaf(&self) -> Leaf {
        self.issue(
            &["idemproxy-client"],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// A server configuration for `127.0.0.1`/`localhost` offering `alpn`
    /// (e.g. `&["h2", "http/1.1"]`); with `client_ca`, a client certificate
    /// issued by that CA is required.
    pub fn server_config(&self, alpn: &[&str], client_ca: Option<&TestPki>) -> TlsServerConfig {
        let leaf = self.issue(
            &["127.0.0.1", "localhost"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.ca_der.clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(vec![leaf.cert_der], leaf.key_der)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}
