//! The worker (and a client) against nats-servers that require authentication: token,
//! user/password, NKey, TLS with a private CA, and mutual TLS. Wrong credentials fail loudly.

use crate::common;

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use common::*;
use rerank_service::nats::NatsConfig;
use rerank_service::wire::{self, ReplyBody, RerankRequest};

async fn served_through(config: NatsConfig) {
    let client = within(PATIENCE, "authenticated connect", config.connect())
        .await
        .expect("connect with credentials");
    let request = RerankRequest {
        query: "q".into(),
        documents: vec!["a".into()],
        ..Default::default()
    };
    let reply = within(
        PATIENCE,
        "authenticated request",
        client.request(wire::SUBJECT_V1, Bytes::from(wire::encode(&request))),
    )
    .await
    .expect("reply");
    assert!(matches!(
        wire::decode_reply(&reply.payload).unwrap(),
        ReplyBody::Ok(_)
    ));
}

/// A worker given `args` must fail to start (non-zero exit) and say why on stderr.
fn worker_refused(url: &str, args: &[&str]) -> String {
    let output = Command::new(rerank_bin())
        .arg("worker")
        .arg("--model")
        .arg(tiny_model_dir())
        .args(["--nats-url", url, "--health-listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run worker");
    assert!(
        !output.status.success(),
        "worker started with bad credentials"
    );
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth() {
    let nats = NatsServer::start_with(&["--auth", "s3cret-token"]);
    let _worker = WorkerProcess::start(&nats.url(), &["--nats-token", "s3cret-token"]);
    served_through(NatsConfig {
        token: Some("s3cret-token".into()),
        ..NatsConfig::new(nats.url())
    })
    .await;
    let stderr = worker_refused(&nats.url(), &["--nats-token", "wrong"]);
    assert!(stderr.contains("NATS"), "{stderr}");
    assert!(
        !stderr.contains("wrong"),
        "the secret leaked into the error: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_auth() {
    let nats = NatsServer::start_with(&["--user", "rerank", "--pass", "pa55word"]);
    let _worker = WorkerProcess::start(
        &nats.url(),
        &["--nats-user", "rerank", "--nats-password", "pa55word"],
    );
    served_through(NatsConfig {
        user: Some("rerank".into()),
        password: Some("pa55word".into()),
        ..NatsConfig::new(nats.url())
    })
    .await;
    worker_refused(
        &nats.url(),
        &["--nats-user", "rerank", "--nats-password", "nope"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_auth() {
    let worker_key = nkeys::KeyPair::new_user();
    let caller_key = nkeys::KeyPair::new_user();
    let config = format!(
        "authorization {{ users = [ {{ nkey: {} }}, {{ nkey: {} }} ] }}\n",
        worker_key.public_key(),
        caller_key.public_key()
    );
    let nats = NatsServer::start_with_config(&config);
    let seed = worker_key.seed().unwrap();
    let _worker = WorkerProcess::start(&nats.url(), &["--nats-nkey-seed", &seed]);
    served_through(NatsConfig {
        nkey_seed: Some(caller_key.seed().unwrap()),
        ..NatsConfig::new(nats.url())
    })
    .await;
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    worker_refused(&nats.url(), &["--nats-nkey-seed", &stranger]);
}

/// A private CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_pki(dir: &Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl is installed");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ]);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let p = |f: &str| pki.path().join(f).display().to_string();
    let config = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    );
    let nats = NatsServer::start_with_config(&config);
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let _worker = WorkerProcess::start(
        &nats.url(),
        &[
            "--nats-tls-ca",
            &ca,
            "--nats-tls-cert",
            &cert,
            "--nats-tls-key",
            &key,
        ],
    );
    served_through(NatsConfig {
        tls_ca: Some(ca.clone().into()),
        tls_cert: Some(cert.into()),
        tls_key: Some(key.into()),
        ..NatsConfig::new(nats.url())
    })
    .await;
    // Without a client certificate the server refuses the handshake.
    worker_refused(&nats.url(), &["--nats-tls-ca", &ca]);
}
