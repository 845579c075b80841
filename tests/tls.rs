//! TLS on both listeners against a real server, with a self-signed
//! certificate made when the test runs: the protocol over TLS on the TCP
//! port, plain-text clients on that port, `wss://` and `https://` on the
//! HTTP port, refusals past the connection limit, and start-up errors
//! that name the file at fault.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::http::WsClient;
use common::*;
use ensync_server::config::{Config, Tls};
use ensync_server::server::{self, Listeners};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::Connector;

/// The name the test certificate is issued for.
const HOST: &str = "localhost";

/// A self-signed certificate and its key, as PEM files in a temporary
/// directory.
struct TestCert {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

impl TestCert {
    fn new() -> TestCert {
        let dir = tempfile::tempdir().expect("tempdir");
        let issued = rcgen::generate_simple_self_signed(vec![HOST.to_string()])
            .expect("self-signed certificate");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, issued.cert.pem()).expect("write cert.pem");
        std::fs::write(&key, issued.signing_key.serialize_pem()).expect("write key.pem");
        TestCert {
            der: issued.cert.der().clone(),
            dir,
            cert,
            key,
        }
    }

    fn tls(&self) -> Tls {
        Tls {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// A client config that trusts this certificate only, offering `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).expect("add the test root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A TLS connection to `addr`, handshake done.
    async fn connect(&self, addr: SocketAddr, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from(HOST).expect("server name");
        tokio::time::timeout(
            LINE_TIMEOUT,
            TlsConnector::from(self.client(alpn)).connect(name, tcp),
        )
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake")
    }
}

/// A server with `[tls]` set to `cert`, on a fresh data directory.
async fn tls_server(cert: &TestCert, adjust: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = config_in(&cert.dir.path().join("data"));
    config.tls = Some(cert.tls());
    adjust(&mut config);
    start_server_with(config).await
}

/// A line client for the protocol over TLS.
struct TlsClient {
    reader: BufReader<ReadHalf<TlsStream<TcpStream>>>,
    writer: WriteHalf<TlsStream<TcpStream>>,
}

impl TlsClient {
    async fn connect(cert: &TestCert, addr: SocketAddr) -> TlsClient {
        let (read, writer) = tokio::io::split(cert.connect(addr, &[]).await);
        TlsClient {
            reader: BufReader::new(read),
            writer,
        }
    }

    async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
        self.writer.flush().await.expect("flush");
    }

    /// The next line, server `PING`s skipped; `None` when the server
    /// closed the connection.
    async fn next_line(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(LINE_TIMEOUT, self.reader.read_line(&mut line))
                .await
                .expect("no line from the server within 10 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            let line = line.trim_end_matches('\n').to_string();
            if line != "PING" {
                return Some(line);
            }
        }
    }

    async fn line(&mut self) -> String {
        self.next_line()
            .await
            .expect("the server closed the connection")
    }

    async fn expect(&mut self, line: &str, reply: &str) {
        self.send(line).await;
        assert_eq!(self.line().await, reply, "reply to {line:?}");
    }
}

/// Reads what `stream` sends until it closes (EOF or an error); panics if
/// it is still open after `LINE_TIMEOUT`.
async fn read_until_closed(mut stream: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(LINE_TIMEOUT, stream.read(&mut buf))
            .await
            .expect("the server kept the connection open");
        match read {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_runs_over_tls_on_the_tcp_port() {
    let cert = TestCert::new();
    let srv = tls_server(&cert, |_| {}).await;
    let mut c = TlsClient::connect(&cert, srv.addr).await;
    c.expect("CONN;CLIENT_ID=alice", "+PASS:CONNECTED;CLIENT_ID=alice")
        .await;
    c.expect(
        "SUB;CLIENT_ID=alice;EVENT_NAME=user/*",
        "+PASS:SUBSCRIBED;EVENT_NAME=user/*",
    )
    .await;
    c.send("PUB;CLIENT_ID=alice;EVENT_NAME=user/created;PAYLOAD={\"id\":\"1\"};DELIVERY_TO=*")
        .await;
    // The delivery may come before or after the PUB's reply.
    let (mut published, mut record) = (None, None);
    while published.is_none() || record.is_none() {
        let line = c.line().await;
        if line.starts_with("+RECORD:") {
            record = Some(parse_record(&line));
        } else {
            published = Some(parse_published(&line));
        }
    }
    let (published, record) = (published.expect("PUB reply"), record.expect("record"));
    assert_eq!(idem_of(&record), published.idem);
    assert_eq!(record["name"], "user/created");
    assert_eq!(record["payload"]["id"], "1");
    c.expect(
        &format!("ACK;CLIENT_ID=alice;EVENT_IDEM={}", published.idem),
        &format!("+PASS:ACKNOWLEDGED;IDEM={}", published.idem),
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_clients_on_the_tls_port_get_no_answer_and_hold_up_no_one() {
    let cert = TestCert::new();
    let srv = tls_server(&cert, |_| {}).await;
    // One that never speaks: its handshake waits on its own task, so a
    // TLS client connecting after it is served at once.
    let silent = TcpStream::connect(srv.addr).await.expect("connect");
    let mut c = TlsClient::connect(&cert, srv.addr).await;
    c.expect("CONN;CLIENT_ID=t", "+PASS:CONNECTED;CLIENT_ID=t")
        .await;

    let mut plain = TcpStream::connect(srv.addr).await.expect("connect");
    plain
        .write_all(b"CONN;CLIENT_ID=plain\nPING\n")
        .await
        .expect("write");
    let got = read_until_closed(&mut plain).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains("+PASS") && !text.contains("-FAIL"),
        "a plain-text client got a protocol answer: {text:?}"
    );

    c.expect("PING", "+PASS:PONG").await;
    drop(silent);
    c.expect("PING", "+PASS:PONG").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_https_work_on_the_http_port() {
    let cert = TestCert::new();
    let srv = tls_server(&cert, |_| {}).await;
    // Handshakes run side by side: one that never starts holds up no one.
    let silent = TcpStream::connect(srv.http_addr).await.expect("connect");

    let tcp = TcpStream::connect(srv.http_addr).await.expect("connect");
    let url = format!("wss://{HOST}:{}/message", srv.http_addr.port());
    let connector = Connector::Rustls(cert.client(&[]));
    let (ws, response) = tokio::time::timeout(
        LINE_TIMEOUT,
        tokio_tungstenite::client_async_tls_with_config(url, tcp, None, Some(connector)),
    )
    .await
    .expect("wss connect timed out")
    .expect("wss connect");
    assert_eq!(response.status().as_u16(), 101, "upgrade status");
    let mut ws = WsClient::from_stream(ws);
    ws.expect("PING", "+PASS:PONG").await;
    ws.conn("w").await;

    let mut https = cert.connect(srv.http_addr, &[b"h2", b"http/1.1"]).await;
    assert_eq!(
        https.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "the server picks HTTP/1.1"
    );
    https
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
    let response = String::from_utf8(read_until_closed(&mut https).await).expect("UTF-8");
    assert!(
        response.starts_with("HTTP/1.1 200 OK\r\n"),
        "healthz over https: {response:?}"
    );
    assert!(response.contains("\"status\":\"ok\""), "{response:?}");

    ws.expect("PING", "+PASS:PONG").await;
    drop(silent);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_tls_client_is_told_so_over_tls() {
    let cert = TestCert::new();
    let srv = tls_server(&cert, |config| config.limits.max_connections = 1).await;
    let mut first = TlsClient::connect(&cert, srv.addr).await;
    first
        .expect("CONN;CLIENT_ID=a", "+PASS:CONNECTED;CLIENT_ID=a")
        .await;
    let mut refused = TlsClient::connect(&cert, srv.addr).await;
    let line = refused.line().await;
    assert_eq!(line, "-FAIL:TOO_MANY_CONNECTIONS;MESSAGE=the server has 1 connections open (limits.max_connections), try again later");
    assert_fail_shape(&line);
    assert_eq!(refused.next_line().await, None, "closed after the refusal");
    first.expect("PING", "+PASS:PONG").await;
    srv.stop().await;
}

/// What `server::run` says when it cannot start with `tls`.
async fn startup_error(data_dir: &Path, tls: Tls) -> String {
    let mut config = config_in(data_dir);
    config.tls = Some(tls);
    let listeners = Listeners {
        tcp: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        http: Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
    };
    let run = server::run(listeners, config, std::future::pending());
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("server::run did not return")
        .expect_err("server::run started with bad [tls] files")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_fails_naming_the_tls_file_at_fault() {
    let cert = TestCert::new();
    let data = cert.dir.path().join("data");

    let missing = cert.dir.path().join("missing.pem");
    let message = startup_error(
        &data,
        Tls {
            cert: missing.clone(),
            key: cert.key.clone(),
        },
    )
    .await;
    assert!(
        message.starts_with(&format!("tls.cert {}: cannot read: ", missing.display())),
        "{message}"
    );

    // A key path that points at the certificate.
    let message = startup_error(
        &data,
        Tls {
            cert: cert.cert.clone(),
            key: cert.cert.clone(),
        },
    )
    .await;
    assert!(
        message.starts_with(&format!(
            "tls.key {}: no private key in the file",
            cert.cert.display()
        )),
        "{message}"
    );

    let message = startup_error(
        &data,
        Tls {
            cert: cert.key.clone(),
            key: cert.key.clone(),
        },
    )
    .await;
    assert!(
        message.starts_with(&format!(
            "tls.cert {}: no certificate in the file",
            cert.key.display()
        )),
        "{message}"
    );

    let other = TestCert::new();
    let message = startup_error(
        &data,
        Tls {
            cert: cert.cert.clone(),
            key: other.key.clone(),
        },
    )
    .await;
    assert!(
        message.starts_with(&format!(
            "tls.key {} does not match the certificate in tls.cert {}",
            other.key.display(),
            cert.cert.display()
        )),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_stops_reading_is_disconnected_by_the_send_timeout() {
    let cert = TestCert::new();
    let srv = tls_server(&cert, |c| {
        c.limits.send_timeout = Duration::from_millis(500);
        c.delivery.max_unsettled = 5000;
    })
    .await;
    let mut stalled = TlsClient::connect(&cert, srv.addr).await;
    stalled
        .expect("CONN;CLIENT_ID=s", "+PASS:CONNECTED;CLIENT_ID=s")
        .await;
    stalled
        .expect(
            "SUB;CLIENT_ID=s;EVENT_NAME=big/*",
            "+PASS:SUBSCRIBED;EVENT_NAME=big/*",
        )
        .await;
    // About 20 MB of deliveries the subscriber never reads: TLS holds
    // some in its own buffer, the socket the rest, then writes wait.
    let mut publisher = TlsClient::connect(&cert, srv.addr).await;
    publisher
        .expect("CONN;CLIENT_ID=p", "+PASS:CONNECTED;CLIENT_ID=p")
        .await;
    let pad = "x".repeat(4000);
    for _ in 0..5000 {
        publisher
            .send(&format!(
                "PUB;CLIENT_ID=p;EVENT_NAME=big/blob;PAYLOAD={{\"pad\":\"{pad}\"}};DELIVERY_TO=*"
            ))
            .await;
        let reply = publisher.line().await;
        assert!(reply.starts_with("+PASS:PUBLISHED"), "{reply}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Drained now, the stalled connection ends well before all 20 MB.
    let got = read_until_closed(stalled.reader).await;
    assert!(got.len() < 15_000_000, "{} bytes reached it", got.len());
    publisher.expect("PING", "+PASS:PONG").await;
    srv.stop().await;
}
