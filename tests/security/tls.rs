//! Certificate verification against HTTPS receivers on loopback, with a test
//! CA made at run time. Only the extra CA file makes the test CA trusted, and
//! no certificate that fails verification gets a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::receivers::read_request;
use crate::service::{Service, Settings, attempt};

/// A certificate and its private key, as a TLS server needs them.
struct ServerIdentity {
    certificate: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

/// A certificate authority made for one test.
struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new() -> TestCa {
        let key = KeyPair::generate().expect("generating the CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "citapro-webhooks test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let certificate = params.self_signed(&key).expect("self-signing the CA");
        TestCa {
            pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Issues a server certificate for `name`, valid from 1975 to 4096.
    fn issue(&self, name: &str) -> ServerIdentity {
        self.issue_with(leaf_params(name))
    }

    /// Issues a server certificate for `name` that expired in 2001.
    fn issue_expired(&self, name: &str) -> ServerIdentity {
        let mut params = leaf_params(name);
        params.not_before = date_time_ymd(2000, 1, 1);
        params.not_after = date_time_ymd(2001, 1, 1);
        self.issue_with(params)
    }

    fn issue_with(&self, params: CertificateParams) -> ServerIdentity {
        let key = KeyPair::generate().expect("generating a server key");
        let certificate = params
            .signed_by(&key, &self.issuer)
            .expect("signing a server certificate");
        identity(certificate.der().clone(), &key)
    }
}

fn leaf_params(name: &str) -> CertificateParams {
    let mut params =
        CertificateParams::new(vec![name.to_owned()]).expect("server certificate parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}

/// Makes a certificate for `name` that signs itself, so no root store trusts it.
fn self_signed(name: &str) -> ServerIdentity {
    let key = KeyPair::generate().expect("generating a server key");
    let certificate = leaf_params(name)
        .self_signed(&key)
        .expect("self-signing a server certificate");
    identity(certificate.der().clone(), &key)
}

fn identity(certificate: CertificateDer<'static>, key: &KeyPair) -> ServerIdentity {
    ServerIdentity {
        certificate,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

#[derive(Default)]
struct TlsCounts {
    handshakes_failed: AtomicUsize,
    requests: AtomicUsize,
}

/// An HTTPS server on `127.0.0.1` that responds with `200` to every request.
struct TlsReceiver {
    /// The URL to register, with the name `localhost`.
    url: String,
    counts: Arc<TlsCounts>,
    task: JoinHandle<()>,
}

impl TlsReceiver {
    async fn start(identity: ServerIdentity) -> TlsReceiver {
        let config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![identity.certificate], identity.key)
            .expect("building the TLS server configuration");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port for an HTTPS receiver");
        let port = listener.local_addr().expect("reading the address").port();
        let counts = Arc::new(TlsCounts::default());
        let task = tokio::spawn(accept_loop(listener, acceptor, counts.clone()));
        TlsReceiver {
            url: format!("https://localhost:{port}/hooks"),
            counts,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }

    fn handshakes_failed(&self) -> usize {
        self.counts.handshakes_failed.load(Ordering::SeqCst)
    }
}

impl Drop for TlsReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, counts: Arc<TlsCounts>) {
    while let Ok((stream, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(stream).await else {
                counts.handshakes_failed.fetch_add(1, Ordering::SeqCst);
                return;
            };
            let mut buffer = Vec::new();
            while let Ok(true) = read_request(&mut tls, &mut buffer).await {
                counts.requests.fetch_add(1, Ordering::SeqCst);
                let response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if tls.write_all(response).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Delivers one event to an HTTPS receiver with `identity` and returns the
/// first attempt, the delivery status and the receiver.
async fn deliver_over_tls(
    identity: ServerIdentity,
    extra_ca_pem: Option<String>,
) -> (serde_json::Value, String, TlsReceiver) {
    let service = Service::start(Settings {
        extra_ca_pem,
        ..Settings::default()
    })
    .await;
    let business = service.create_business().await;
    let receiver = TlsReceiver::start(identity).await;
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;

    service.send_client_created(&business).await;

    let delivery = service.wait_for_attempts(&business, &webhook.id, 1).await;
    let status = delivery["status"].as_str().unwrap_or_default().to_owned();
    (attempt(&delivery, 0).clone(), status, receiver)
}

/// Asserts that an attempt failed certificate verification and that the
/// receiver got no request.
fn assert_tls_rejected(first: &serde_json::Value, receiver: &TlsReceiver) {
    assert_eq!(first["errorKind"], "tls", "attempt: {first}");
    assert!(first["statusCode"].is_null(), "no status: {first}");
    assert_eq!(
        receiver.requests(),
        0,
        "no request after a failed handshake"
    );
    assert!(
        receiver.handshakes_failed() >= 1,
        "the receiver saw the handshake fail"
    );
}

#[tokio::test]
async fn tls_valid_certificate_succeeds() {
    let ca = TestCa::new();
    let identity = ca.issue("localhost");

    let (first, status, receiver) = deliver_over_tls(identity, Some(ca.pem.clone())).await;

    assert!(first["errorKind"].is_null(), "attempt: {first}");
    assert_eq!(first["statusCode"], 200, "attempt: {first}");
    assert_eq!(status, "succeeded");
    assert_eq!(receiver.requests(), 1, "one request over TLS");
}

#[tokio::test]
async fn tls_self_signed_certificate_fails() {
    let ca = TestCa::new();

    let (first, _, receiver) = deliver_over_tls(self_signed("localhost"), Some(ca.pem)).await;

    assert_tls_rejected(&first, &receiver);
}

#[tokio::test]
async fn tls_expired_certificate_fails() {
    let ca = TestCa::new();
    let identity = ca.issue_expired("localhost");

    let (first, _, receiver) = deliver_over_tls(identity, Some(ca.pem.clone())).await;

    assert_tls_rejected(&first, &receiver);
}

#[tokio::test]
async fn tls_wrong_name_certificate_fails() {
    let ca = TestCa::new();
    let identity = ca.issue("other.test");

    let (first, _, receiver) = deliver_over_tls(identity, Some(ca.pem.clone())).await;

    assert_tls_rejected(&first, &receiver);
}

#[tokio::test]
async fn tls_without_extra_ca_fails() {
    let ca = TestCa::new();
    let identity = ca.issue("localhost");

    let (first, _, receiver) = deliver_over_tls(identity, None).await;

    assert_tls_rejected(&first, &receiver);
}
