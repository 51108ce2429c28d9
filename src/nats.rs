//! Connecting to NATS: URL, authentication and TLS options shared by the worker, the sidecar and
//! the client.

use std::path::PathBuf;
use std::time::Duration;

/// How to reach and authenticate to the NATS server(s).
#[derive(Clone, Default)]
pub struct NatsConfig {
    /// One URL or several, comma-separated (`nats://a:4222,nats://b:4222`).
    pub url: String,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub nkey_seed: Option<String>,
    pub creds_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Client name shown by the server (`nats server report connections`).
    pub name: String,
    /// Messages buffered per subscription before the client drops them as a slow consumer.
    pub subscription_capacity: usize,
}

impl std::fmt::Debug for NatsConfig {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("token", &set(&self.token))
            .field("user", &self.user)
            .field("password", &set(&self.password))
            .field("nkey_seed", &set(&self.nkey_seed))
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .finish()
    }
}

/// Connection failure, with the URL (never the credentials).
#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    #[error("cannot read NATS credentials file {path}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

impl NatsConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: "rerank".into(),
            subscription_capacity: 1024,
            ..Self::default()
        }
    }

    /// Connects once, failing if no server answers within the 5 s connection timeout (the process
    /// then exits and its supervisor restarts it: a worker without NATS has nothing to do), and
    /// reconnects forever once connected.
    pub async fn connect(&self) -> Result<async_nats::Client, NatsConnectError> {
        let mut options = match &self.creds_file {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| NatsConnectError::Credentials {
                    path: path.clone(),
                    source,
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        let options = options
            .name(&self.name)
            .subscription_capacity(self.subscription_capacity.max(1))
            .connection_timeout(Duration::from_secs(5))
            // Reconnect quickly after a server restart; the default backoff grows to 4 s.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((50 * attempts as u64).min(1_000))
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "NATS slow consumer: messages dropped")
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            });
        let servers: Vec<async_nats::ServerAddr> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| NatsConnectError::Connect {
                url: self.url.clone(),
                source: async_nats::ConnectError::with_source(
                    async_nats::ConnectErrorKind::ServerParse,
                    e,
                ),
            })?;
        options
            .connect(servers)
            .await
            .map_err(|source| NatsConnectError::Connect {
                url: self.url.clone(),
                source,
            })
    }
}
