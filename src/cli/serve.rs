//! `rerank serve`: a worker and the sidecar in one process, the whole stack in one command
//! (`make run`). When no NATS server answers at a loopback `--nats-url` and `nats-server` is on
//! PATH, one is started as a child on 127.0.0.1 at the URL's port and stopped on exit (with
//! JetStream and a store directory under `--intake jetstream`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;

use super::args::{
    EngineArgs, HttpArgs, HttpTimeoutArgs, IntakeArgs, IntakeKind, LogArgs, ModelArgs, NatsArgs,
    WorkerRunArgs,
};
use super::worker::run_worker;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Apply to both the API and the worker's probe listener.
    #[command(flatten)]
    pub http_timeouts: HttpTimeoutArgs,
    #[command(flatten)]
    pub worker: WorkerRunArgs,
    /// `--intake jetstream` also sends the sidecar's requests as JetStream jobs.
    #[command(flatten)]
    pub intake: IntakeArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// A stop signal that several tasks can wait on.
fn stopped(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut sidecar_config = args.http.to_config(&args.nats, &args.http_timeouts)?;
    let jetstream = args.intake.intake == IntakeKind::Jetstream;
    if jetstream {
        sidecar_config.jetstream = Some(args.intake.queue.jobs.to_stream());
    }
    let mut nats_server = start_nats_if_needed(&args.nats.nats_url, jetstream).await?;

    let (tx, rx) = watch::channel(false);
    let tx = Arc::new(tx);
    let signal_tx = tx.clone();
    let signals = tokio::spawn(async move {
        crate::shutdown::signal().await;
        let _ = signal_tx.send(true);
    });

    let mut sidecar = tokio::spawn(crate::sidecar::run(sidecar_config, stopped(&rx)));
    let worker = run_worker(
        &args.model,
        &args.engine,
        &args.nats,
        &args.worker,
        &args.intake,
        &args.http_timeouts,
        stopped(&rx),
    );
    tokio::pin!(worker);
    // Whichever half ends first (a signal, or a failure) stops the other.
    let (worker_result, sidecar_result) = tokio::select! {
        w = &mut worker => {
            let _ = tx.send(true);
            (w, (&mut sidecar).await)
        }
        s = &mut sidecar => {
            let _ = tx.send(true);
            (worker.await, s)
        }
    };
    signals.abort();
    if let Some(child) = nats_server.as_mut() {
        tracing::info!("stopping the nats-server started for this stack");
        let _ = child.kill().await;
    }
    worker_result.context("worker")?;
    sidecar_result
        .context("sidecar task panicked")?
        .context("sidecar")?;
    Ok(())
}

/// `host`, `port` of the first URL in a comma-separated NATS URL list.
fn host_port(urls: &str) -> Option<(String, u16)> {
    let url = urls.split(',').map(str::trim).find(|s| !s.is_empty())?;
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after
            .strip_prefix(':')
            .map_or(Some(4222), |p| p.parse().ok())?;
        return Some((host.to_string(), port));
    }
    match rest.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None => Some((rest.to_string(), 4222)),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

async fn reachable(host: &str, port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect((host, port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// Starts `nats-server` on 127.0.0.1 when the URL is loopback and nothing listens there; with
/// `jetstream`, with JetStream on and its store in `$TMPDIR/rerank-serve-nats-<port>` (kept, so
/// queued jobs survive a restart of `rerank serve`).
async fn start_nats_if_needed(
    urls: &str,
    jetstream: bool,
) -> anyhow::Result<Option<tokio::process::Child>> {
    let Some((host, port)) = host_port(urls) else {
        return Ok(None);
    };
    if reachable(&host, port).await {
        tracing::info!(%host, port, "using the running NATS server");
        return Ok(None);
    }
    if !is_loopback(&host) {
        // Starting a local server would not make a remote URL reachable.
        tracing::warn!(
            %host,
            port,
            "NATS is not reachable; connecting fails unless it answers within the connection timeout"
        );
        return Ok(None);
    }
    let Some(binary) = find_on_path("nats-server") else {
        tracing::warn!(
            port,
            "no NATS server on 127.0.0.1 and no nats-server on PATH (`make setup` installs one)"
        );
        return Ok(None);
    };
    tracing::info!(binary = %binary.display(), port, "starting nats-server on 127.0.0.1");
    let mut command = tokio::process::Command::new(&binary);
    command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    if jetstream {
        let store = std::env::temp_dir().join(format!("rerank-serve-nats-{port}"));
        tracing::info!(store = %store.display(), "nats-server with JetStream");
        command.arg("-js").arg("-sd").arg(&store);
    }
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    for _ in 0..100 {
        if reachable("127.0.0.1", port).await {
            return Ok(Some(child));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("nats-server exited at start ({status}); is port {port} in use?");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("nats-server did not listen on 127.0.0.1:{port} within 10 s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            host_port("nats://127.0.0.1:4333"),
            Some(("127.0.0.1".into(), 4333))
        );
        assert_eq!(
            host_port("nats://u:p@localhost"),
            Some(("localhost".into(), 4222))
        );
        assert_eq!(host_port(" tls://a:1, nats://b:2"), Some(("a".into(), 1)));
        assert_eq!(host_port("nats://[::1]:5000"), Some(("::1".into(), 5000)));
        assert_eq!(
            host_port("127.0.0.1:4222"),
            Some(("127.0.0.1".into(), 4222))
        );
        assert!(is_loopback("localhost") && is_loopback("127.0.0.2") && is_loopback("::1"));
        assert!(!is_loopback("nats.example"));
    }
}
