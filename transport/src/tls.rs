//! Cluster TLS material: loading from disk, development generation, and the
//! rustls/quinn configurations built from it (mutual TLS against the cluster CA).

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::TransportError;

/// The server name every node certificate carries and every client verifies.
pub const SERVER_NAME: &str = "pixiu-node";
/// ALPN protocol identifier of the node-to-node protocol.
pub const ALPN: &[u8] = b"pixiu/1";

/// CA certificate(s), the node certificate chain and the node private key.
pub struct TlsMaterial {
    /// Trusted cluster CA certificate(s) (DER). Peers must present a chain to one of these.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// This node's certificate chain (leaf first, DER).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            ca_certs: self.ca_certs.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_certs", &self.ca_certs.len())
            .field("cert_chain", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

fn tls_err(what: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(what.to_string())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| tls_err(format!("cannot read {}: {e}", path.display())))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let data = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(format!("invalid PEM in {}: {e:?}", path.display())))?;
    if certs.is_empty() {
        return Err(tls_err(format!(
            "no CERTIFICATE found in {}",
            path.display()
        )));
    }
    Ok(certs)
}

impl TlsMaterial {
    /// Load `ca.pem`, `node.pem`, `node.key` from a folder; the error names the file on failure.
    pub fn load(dir: &Path) -> Result<TlsMaterial, TransportError> {
        let ca_certs = read_certs(&dir.join("ca.pem"))?;
        let cert_chain = read_certs(&dir.join("node.pem"))?;
        let key_path = dir.join("node.key");
        let key_data = read_file(&key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_data).map_err(|e| {
            tls_err(format!(
                "invalid private key in {}: {e:?}",
                key_path.display()
            ))
        })?;
        let material = TlsMaterial {
            ca_certs,
            cert_chain,
            key,
        };
        // Fail early (naming the folder) if the pieces do not fit together.
        material
            .configs(quinn::TransportConfig::default())
            .map_err(|e| tls_err(format!("TLS material in {}: {e}", dir.display())))?;
        Ok(material)
    }

    /// A fresh CA plus node certificate in memory (single-process standalone mode and tests).
    pub fn generate_in_memory() -> Result<TlsMaterial, TransportError> {
        let generated = Generated::new()?;
        Ok(generated.material())
    }

    /// Build the quinn server and client configurations (mutual TLS, ring provider, ALPN).
    pub(crate) fn configs(
        &self,
        transport: quinn::TransportConfig,
    ) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
        let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in &self.ca_certs {
            roots
                .add(ca.clone())
                .map_err(|e| tls_err(format!("bad CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let transport = Arc::new(transport);

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| tls_err(format!("client verifier: {e}")))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err(format!("node certificate/key: {e}")))?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let server = quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_err)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(transport.clone());

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err(format!("node certificate/key: {e}")))?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        let client = quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_err)?;
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(transport);
        Ok((server, client))
    }
}

/// A freshly generated CA and node certificate.
struct Generated {
    ca_pem: String,
    ca_key_pem: String,
    ca_der: CertificateDer<'static>,
    node_pem: String,
    node_key_pem: String,
    node_der: CertificateDer<'static>,
    node_key_der: Vec<u8>,
}

impl Generated {
    fn new() -> Result<Generated, TransportError> {
        let rc = |e: rcgen::Error| tls_err(format!("certificate generation: {e}"));

        let ca_key = KeyPair::generate().map_err(rc)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "PiXiu cluster CA");
        dn.push(DnType::OrganizationName, "PiXiu");
        ca_params.distinguished_name = dn;
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(rc)?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let node_key = KeyPair::generate().map_err(rc)?;
        let mut node_params = CertificateParams::new(vec![
            SERVER_NAME.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .map_err(rc)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, SERVER_NAME);
        dn.push(DnType::OrganizationName, "PiXiu");
        node_params.distinguished_name = dn;
        node_params.use_authority_key_identifier_extension = true;
        node_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        node_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let node_cert = node_params.signed_by(&node_key, &issuer).map_err(rc)?;

        Ok(Generated {
            ca_pem: ca_cert.pem(),
            ca_key_pem,
            ca_der: ca_cert.der().clone(),
            node_pem: node_cert.pem(),
            node_key_pem: node_key.serialize_pem(),
            node_der: node_cert.der().clone(),
            node_key_der: node_key.serialize_der(),
        })
    }

    fn material(self) -> TlsMaterial {
        TlsMaterial {
            ca_certs: vec![self.ca_der],
            cert_chain: vec![self.node_der],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.node_key_der)),
        }
    }
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), TransportError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = opts
        .open(path)
        .map_err(|e| tls_err(format!("cannot write {}: {e}", path.display())))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| tls_err(format!("cannot write {}: {e}", path.display())))
}

/// Write a new CA (`ca.pem`, `ca.key`) and a node certificate signed by it (`node.pem`,
/// `node.key`) into `dir` (created if missing) unless `ca.pem` already exists there;
/// returns true if it wrote files.
///
/// Node certificates carry SAN DNS "pixiu-node" and "localhost" and IP 127.0.0.1, with
/// extended key usage for both server and client auth. `ca.pem` is written last, so its
/// presence implies the other files were written.
pub fn generate_dev_tls(dir: &Path) -> Result<bool, TransportError> {
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| tls_err(format!("cannot create {}: {e}", dir.display())))?;
    let generated = Generated::new()?;
    write_file(&dir.join("ca.key"), &generated.ca_key_pem, true)?;
    write_file(&dir.join("node.pem"), &generated.node_pem, false)?;
    write_file(&dir.join("node.key"), &generated.node_key_pem, true)?;
    write_file(&ca_path, &generated.ca_pem, false)?;
    Ok(true)
}
