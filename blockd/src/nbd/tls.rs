//! TLS for NBD over TCP: the policy, the certificates and their reloading.
//!
//! The certificate directory follows the layout nbdkit, qemu and libnbd
//! already share, so one set of files serves every peer:
//!
//! ```text
//! DIR/server-cert.pem   the server's certificate chain (leaf first)
//! DIR/server-key.pem    its private key (not readable by other users)
//! DIR/ca-cert.pem       with --nbd-tls-verify-peer: the CA(s) that sign
//!                       the client certificates allowed in
//! ```
//!
//! Policy ([`resolve`]): TLS is required by default on any address that is
//! not loopback, and a daemon asked to listen on one without certificates
//! refuses to start rather than serve volumes in plain text; on loopback
//! TLS is offered when certificates are given, and required when client
//! certificates are verified (a plain-text connection would otherwise walk
//! around the access check the client certificate is).
//!
//! Reloading: every handshake first compares the three files' identity
//! (device, inode, size, modification time) with those of the loaded
//! configuration, and rebuilds it when any changed. A renewed certificate
//! is used by the next connection with no restart and no signal; a
//! half-written renewal that does not load is logged and the previous
//! configuration stays in force. Connections already running keep the
//! session they negotiated.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use super::negotiate::Tls;

/// What `--nbd-tls` asks for.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TlsSetting {
    /// Required on non-loopback addresses (and whenever client
    /// certificates are verified), offered on loopback when certificates
    /// are given, off otherwise.
    #[default]
    Auto,
    /// Never: STARTTLS is refused, everything is plain text.
    Off,
    /// Offered: clients choose.
    On,
    /// Required: clients that skip STARTTLS get NBD_REP_ERR_TLS_REQD.
    Require,
}

/// Server certificate file inside the certificate directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// Server private key file.
pub const SERVER_KEY: &str = "server-key.pem";
/// CA of the client certificates (with peer verification).
pub const CA_CERT: &str = "ca-cert.pem";

/// Decides the TLS mode of a TCP listener.
///
/// # Errors
/// A combination that would serve volumes in a way nobody asked for: a
/// non-loopback address with neither certificates nor an explicit `off`,
/// TLS asked for without certificates, peer verification without TLS.
pub fn resolve(
    listen: SocketAddr,
    setting: TlsSetting,
    certificates: bool,
    verify_peer: bool,
) -> Result<Tls, String> {
    let loopback = listen.ip().is_loopback();
    if verify_peer && !certificates {
        return Err("--nbd-tls-verify-peer needs --nbd-tls-certificates DIR \
                    (with ca-cert.pem, the CA of the client certificates)"
            .into());
    }
    match setting {
        TlsSetting::Off if verify_peer => {
            Err("--nbd-tls-verify-peer cannot go with --nbd-tls off".into())
        }
        TlsSetting::Off => Ok(Tls::Unavailable),
        TlsSetting::On | TlsSetting::Require if !certificates => {
            Err(format!(
            "--nbd-tls {} needs --nbd-tls-certificates DIR holding {SERVER_CERT} and {SERVER_KEY}",
            if setting == TlsSetting::On { "on" } else { "require" }
        ))
        }
        TlsSetting::On if verify_peer => Err(
            "--nbd-tls on lets clients skip TLS and so the client-certificate check: \
             use --nbd-tls require (the default with --nbd-tls-verify-peer)"
                .into(),
        ),
        TlsSetting::On => Ok(Tls::Offered),
        TlsSetting::Require => Ok(Tls::Required),
        TlsSetting::Auto if !certificates && !loopback => Err(format!(
            "--nbd-listen {listen} is not a loopback address, and NBD there needs TLS: \
             give --nbd-tls-certificates DIR ({SERVER_CERT}, {SERVER_KEY}, and {CA_CERT} \
             with --nbd-tls-verify-peer), or --nbd-tls off to serve plain text on a network \
             you trust"
        )),
        TlsSetting::Auto if !certificates => Ok(Tls::Unavailable),
        TlsSetting::Auto if verify_peer || !loopback => Ok(Tls::Required),
        TlsSetting::Auto => Ok(Tls::Offered),
    }
}

/// Identity of the files a configuration was built from.
type Stamp = Vec<Option<(u64, u64, u64, i64, i64)>>;

/// The certificates of one listener, reloaded when their files change.
#[derive(Debug)]
pub struct TlsServer {
    dir: PathBuf,
    verify_peer: bool,
    mode: Tls,
    loaded: Mutex<(Stamp, Arc<ServerConfig>)>,
}

impl TlsServer {
    /// Loads the certificates of `dir`.
    ///
    /// # Errors
    /// A missing or unreadable file, a key other users can read, or
    /// certificates rustls refuses; the message names the file.
    pub fn load(dir: &Path, verify_peer: bool, mode: Tls) -> anyhow::Result<Self> {
        let stamp = stamp(dir, verify_peer);
        let config = build(dir, verify_peer)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            verify_peer,
            mode,
            loaded: Mutex::new((stamp, Arc::new(config))),
        })
    }

    /// The mode connections start in.
    pub fn mode(&self) -> Tls {
        self.mode
    }

    /// Whether client certificates are checked.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    /// An acceptor with the current certificates, reloading them first if
    /// their files changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        let now = stamp(&self.dir, self.verify_peer);
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if loaded.0 != now {
            match build(&self.dir, self.verify_peer) {
                Ok(config) => {
                    tracing::info!(dir = %self.dir.display(), "NBD TLS certificates reloaded");
                    *loaded = (now, Arc::new(config));
                }
                Err(e) => {
                    // Keep serving with what worked; try again next time.
                    tracing::warn!(
                        dir = %self.dir.display(),
                        error = %format!("{e:#}"),
                        "changed NBD TLS certificates do not load; still using the previous ones"
                    );
                }
            }
        }
        TlsAcceptor::from(loaded.1.clone())
    }
}

fn stamp(dir: &Path, verify_peer: bool) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let mut files = vec![SERVER_CERT, SERVER_KEY];
    if verify_peer {
        files.push(CA_CERT);
    }
    files
        .into_iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .ok()
                .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
        })
        .collect()
}

fn build(dir: &Path, verify_peer: bool) -> anyhow::Result<ServerConfig> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if verify_peer {
        let path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&path)
            .with_context(|| format!("reading {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("a CA certificate in {}", path.display()))?;
        }
        if roots.is_empty() {
            anyhow::bail!("{} holds no certificate", path.display());
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .with_context(|| format!("client verifier from {}", path.display()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let cert_path = dir.join(SERVER_CERT);
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no certificate", cert_path.display());
    }
    let key_path = dir.join(SERVER_KEY);
    let mode = std::fs::metadata(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        anyhow::bail!(
            "{} is readable by every user (mode {:o}): chmod o-rwx it",
            key_path.display(),
            mode & 0o777
        );
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading the private key in {}", key_path.display()))?;
    builder
        .with_single_cert(chain, key)
        .with_context(|| format!("{} with {}", cert_path.display(), key_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn tls_is_required_by_default_off_loopback() {
        let lan = addr("192.0.2.7:10809");
        assert_eq!(
            resolve(lan, TlsSetting::Auto, true, false),
            Ok(Tls::Required)
        );
        assert_eq!(
            resolve(addr("[2001:db8::1]:10809"), TlsSetting::Auto, true, false),
            Ok(Tls::Required)
        );
        // The wildcard address reaches every interface: not loopback.
        assert_eq!(
            resolve(addr("0.0.0.0:10809"), TlsSetting::Auto, true, false),
            Ok(Tls::Required)
        );
        let err = resolve(lan, TlsSetting::Auto, false, false).unwrap_err();
        assert!(err.contains("not a loopback address"), "{err}");
        assert!(err.contains("--nbd-tls off"), "{err}");
        // Asked for knowingly.
        assert_eq!(
            resolve(lan, TlsSetting::Off, false, false),
            Ok(Tls::Unavailable)
        );
    }

    #[test]
    fn loopback_offers_tls_and_requires_it_with_client_certificates() {
        let lo = addr("127.0.0.1:10809");
        assert_eq!(
            resolve(lo, TlsSetting::Auto, false, false),
            Ok(Tls::Unavailable)
        );
        assert_eq!(resolve(lo, TlsSetting::Auto, true, false), Ok(Tls::Offered));
        assert_eq!(resolve(lo, TlsSetting::Auto, true, true), Ok(Tls::Required));
        assert_eq!(
            resolve(addr("[::1]:10809"), TlsSetting::Require, true, false),
            Ok(Tls::Required)
        );
        assert_eq!(resolve(lo, TlsSetting::On, true, false), Ok(Tls::Offered));
    }

    #[test]
    fn contradictions_are_refused() {
        let lo = addr("127.0.0.1:10809");
        assert!(resolve(lo, TlsSetting::Require, false, false).is_err());
        assert!(resolve(lo, TlsSetting::On, false, false).is_err());
        assert!(resolve(lo, TlsSetting::Auto, false, true).is_err());
        assert!(resolve(lo, TlsSetting::Off, true, true).is_err());
        assert!(resolve(lo, TlsSetting::On, true, true).is_err());
    }
}
