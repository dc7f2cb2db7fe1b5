//! A TCP proxy between a service and the broker, so tests can cut, stall and restore the network
//! path of one service without stopping RabbitMQ for every other test running at the same time.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Forward,
    /// Keep connections open but move no bytes (a broker that stopped answering).
    Stall,
    /// Drop every connection and refuse new ones (a broker that is down).
    Down,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    _task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, rx) = watch::channel(Mode::Forward);
        let upstream: Arc<str> = upstream.into();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = rx.clone();
                if *rx.borrow() == Mode::Down {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&*upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = pipe(client, server, rx.clone()) => {}
                        _ = rx.wait_for(|m| *m == Mode::Down) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            mode,
            _task: task,
        }
    }

    pub fn set(&self, mode: Mode) {
        let _ = self.mode.send(mode);
    }

    /// An AMQP URL through this proxy, keeping the credentials and vhost of `amqp_url`.
    pub fn amqp_url(&self, amqp_url: &str) -> String {
        let (scheme, rest) = amqp_url.split_once("://").unwrap_or(("amqp", amqp_url));
        let (creds, hostpath) = match rest.rsplit_once('@') {
            Some((c, h)) => (format!("{c}@"), h),
            None => (String::new(), rest),
        };
        let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
        format!("{scheme}://{creds}{}{path}", self.addr)
    }
}

async fn pipe(client: TcpStream, server: TcpStream, rx: watch::Receiver<Mode>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = copy(cr, sw, rx.clone()) => {}
        _ = copy(sr, cw, rx) => {}
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Hold the bytes while stalled; give up when the link goes down.
        if rx.wait_for(|m| *m != Mode::Stall).await.is_err() || *rx.borrow() == Mode::Down {
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

    #[tokio::test]
    async fn amqp_url_keeps_credentials_and_vhost() {
        let p = Proxy::start("127.0.0.1:5672").await;
        let url = p.amqp_url("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(url, format!("amqp://guest:guest@{}/%2f", p.addr));
    }
}
