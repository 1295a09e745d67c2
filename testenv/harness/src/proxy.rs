//! A pausable TCP proxy, to cut one process off from one server (e.g. one
//! rekey replica from the API server) while it keeps reaching everything
//! else. It forwards bytes as they are (TLS passes through untouched: the
//! client still verifies the server's certificate, issued for 127.0.0.1).
//!
//! [`PausableProxy::pause`] stops forwarding in both directions: bytes in
//! flight are held, new connections are accepted and held, nothing reaches
//! the other side (a partition, not a refusal). [`PausableProxy::resume`]
//! forwards again, or first drops every connection made so far (`reset`).

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::cluster::{Cluster, kubeconfig_yaml};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct State {
    paused: bool,
    /// Connections of an older generation are dropped.
    generation: u64,
}

pub struct PausableProxy {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl PausableProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> PausableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, _) = watch::channel(State {
            paused: false,
            generation: 0,
        });
        let states = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let rx = states.subscribe();
                tokio::spawn(connection(down, upstream, rx));
            }
        });
        PausableProxy {
            addr,
            state,
            accept,
        }
    }

    /// A proxy in front of the cluster's API server, and a kubeconfig (the
    /// admin's credentials) that goes through it.
    pub async fn for_api_server(c: &Cluster) -> (PausableProxy, PathBuf) {
        let url = url::Url::parse(&c.api_url).unwrap();
        let upstream: SocketAddr = format!(
            "{}:{}",
            url.host_str().unwrap(),
            url.port_or_known_default().unwrap()
        )
        .parse()
        .unwrap();
        let proxy = PausableProxy::start(upstream).await;
        let server = format!("https://{}", proxy.addr);
        let path = c
            .dir
            .join(format!("kubeconfig-proxy-{}", proxy.addr.port()));
        std::fs::write(
            &path,
            kubeconfig_yaml(&server, &c.ca_pem, &c.admin_cert_pem, &c.admin_key_pem),
        )
        .unwrap();
        (proxy, path)
    }

    /// Stops forwarding: whatever is sent through the proxy from now on is
    /// held, in both directions, and new connections wait.
    pub fn pause(&self) {
        self.state.send_modify(|s| s.paused = true);
    }

    /// Forwards again; with `reset`, first drops every connection made so
    /// far (their clients see them closed and connect anew).
    pub fn resume(&self, reset: bool) {
        self.state.send_modify(|s| {
            s.paused = false;
            if reset {
                s.generation += 1;
            }
        });
    }

    pub fn is_paused(&self) -> bool {
        self.state.borrow().paused
    }
}

impl Drop for PausableProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Drops every connection.
        self.state.send_modify(|s| s.generation += 1);
    }
}

/// Waits until forwarding is allowed; false once the connection's
/// generation is over (or the proxy is gone).
async fn running(state: &mut watch::Receiver<State>, generation: u64) -> bool {
    loop {
        let s = *state.borrow_and_update();
        if s.generation != generation {
            return false;
        }
        if !s.paused {
            return true;
        }
        if state.changed().await.is_err() {
            return false;
        }
    }
}

async fn connection(down: TcpStream, upstream: SocketAddr, mut state: watch::Receiver<State>) {
    let generation = state.borrow().generation;
    if !running(&mut state, generation).await {
        return;
    }
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (down_r, down_w) = down.into_split();
    let (up_r, up_w) = up.into_split();
    tokio::select! {
        _ = pump(down_r, up_w, state.clone(), generation) => {}
        _ = pump(up_r, down_w, state, generation) => {}
    }
}

/// Copies one direction, holding every chunk while paused; ends when
/// either side closes or the generation is over.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<State>,
    generation: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !running(&mut state, generation).await {
            return;
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => n,
            // Paused or reset while waiting for bytes: look again.
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let n = match n {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a pause are held until it ends.
        if !running(&mut state, generation).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pause_holds_bytes_and_reset_drops_connections() {
        // An echo server upstream.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let proxy = PausableProxy::start(upstream).await;
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        let mut buf = [0u8; 5];
        c.write_all(b"hello").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        proxy.pause();
        c.write_all(b"again").await.unwrap();
        let held = tokio::time::timeout(Duration::from_millis(500), c.read_exact(&mut buf)).await;
        assert!(held.is_err(), "nothing passes while paused");
        // A new connection is accepted but goes nowhere.
        let mut d = TcpStream::connect(proxy.addr).await.unwrap();
        d.write_all(b"new").await.unwrap();
        let mut three = [0u8; 3];
        let held = tokio::time::timeout(Duration::from_millis(300), d.read_exact(&mut three)).await;
        assert!(held.is_err(), "a new connection is held too");

        proxy.resume(false);
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again", "held bytes arrive after the pause");
        d.read_exact(&mut three).await.unwrap();
        assert_eq!(&three, b"new");

        proxy.pause();
        proxy.resume(true);
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "reset closes connections");
    }
}
