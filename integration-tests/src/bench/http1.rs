//! A lean HTTP/1.1 client for load generators: keep-alive connections to one server, one exchange
//! at a time on each, a request written as one buffer and its answer parsed by `httparse`. It
//! costs a fraction of a general-purpose client's CPU per request, which matters when the
//! generator shares the machine's cores with what it measures.
//!
//! Answers must carry `Content-Length` (no chunked bodies): what our services send.

use std::io;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Headers an answer may have at most.
const MAX_HEADERS: usize = 32;

/// Why an exchange failed.
#[derive(Debug)]
pub enum Error {
    /// No connection could be opened.
    Connect(io::Error),
    /// The connection failed during the exchange.
    Io(io::Error),
    /// The answer is not HTTP/1.1 this client reads.
    Protocol(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "connect: {e}"),
            Error::Io(e) => write!(f, "i/o: {e}"),
            Error::Protocol(why) => write!(f, "protocol: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// An answer: its status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Keep-alive connections to one server (`http://host:port`).
pub struct Pool {
    /// `host:port`, to connect to and for the `Host` header.
    authority: String,
    /// Idle connections, the most recently used last (reused first, so the rest may age out).
    idle: Mutex<Vec<Conn>>,
}

struct Conn {
    stream: TcpStream,
    /// Read buffer, kept between exchanges to spare an allocation each.
    buf: Vec<u8>,
}

impl Pool {
    /// A pool for `url` (`http://host:port`, any path ignored).
    pub fn new(url: &str) -> Result<Self, Error> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| Error::Protocol(format!("{url}: only http:// URLs")))?;
        let authority = rest.split('/').next().unwrap_or_default().to_owned();
        if authority.is_empty() {
            return Err(Error::Protocol(format!("{url}: no host")));
        }
        Ok(Self {
            authority,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Opens `n` connections, each checked with one `GET path`, and keeps them idle.
    pub async fn warm(&self, n: usize, path: &str) -> Result<(), Error> {
        let request = self.encode("GET", path, &[], &[]);
        let opened = futures::future::join_all((0..n).map(|_| async {
            let mut conn = self.connect().await?;
            let (answer, keep) = conn.exchange(&request).await?;
            if !(200..300).contains(&answer.status) || !keep {
                return Err(Error::Protocol(format!(
                    "GET {path} answered {} while warming up",
                    answer.status
                )));
            }
            Ok(conn)
        }))
        .await;
        let mut conns = Vec::with_capacity(n);
        for conn in opened {
            conns.push(conn?);
        }
        self.lock().extend(conns);
        Ok(())
    }

    /// Sends one request on an idle connection (a new one when none is idle) and reads its
    /// answer. A reused connection the server closed while it was idle is replaced once.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, Error> {
        let request = self.encode(method, path, headers, body);
        let reused = self.lock().pop();
        let mut conn = match reused {
            Some(mut conn) => match conn.exchange(&request).await {
                Ok((answer, keep)) => return Ok(self.done(conn, answer, keep)),
                // Closed before it answered a byte: the server's keep-alive ran out meanwhile,
                // so it never read this request. Any other failure is the exchange's.
                Err(Error::Io(e)) if conn.buf.is_empty() && closed(&e) => self.connect().await?,
                Err(e) => return Err(e),
            },
            None => self.connect().await?,
        };
        let (answer, keep) = conn.exchange(&request).await?;
        Ok(self.done(conn, answer, keep))
    }

    fn done(&self, conn: Conn, answer: Answer, keep: bool) -> Answer {
        if keep {
            self.lock().push(conn);
        }
        answer
    }

    async fn connect(&self) -> Result<Conn, Error> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(Error::Connect)?;
        stream.set_nodelay(true).map_err(Error::Connect)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    fn encode(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(self.authority.as_bytes());
        for (name, value) in headers {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
        }
        if !body.is_empty() || method == "POST" {
            out.extend_from_slice(b"\r\nContent-Length: ");
            out.extend_from_slice(body.len().to_string().as_bytes());
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        // A Vec of connections is never left half changed by a panic.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

impl Conn {
    /// Writes `request` and reads one answer; also says whether the connection may be reused.
    async fn exchange(&mut self, request: &[u8]) -> Result<(Answer, bool), Error> {
        self.buf.clear();
        self.stream.write_all(request).await.map_err(Error::Io)?;
        loop {
            self.read_more(1024).await?;
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            let head = match response.parse(&self.buf) {
                Ok(httparse::Status::Complete(head)) => head,
                Ok(httparse::Status::Partial) => continue,
                Err(e) => return Err(Error::Protocol(format!("unreadable answer: {e}"))),
            };
            let status = response.code.unwrap_or_default();
            let mut length = None;
            let mut keep = response.version == Some(1);
            for h in response.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<usize>().ok());
                } else if h.name.eq_ignore_ascii_case("connection") {
                    keep &= !h.value.eq_ignore_ascii_case(b"close");
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(Error::Protocol("chunked answers are not read".into()));
                }
            }
            let length = match (length, status) {
                (Some(n), _) => n,
                (None, 204 | 304) => 0,
                (None, _) => return Err(Error::Protocol("answer without Content-Length".into())),
            };
            let end = head + length;
            while self.buf.len() < end {
                self.read_more(end - self.buf.len()).await?;
            }
            // One exchange at a time: nothing may follow the answer.
            keep &= self.buf.len() == end;
            let body = self.buf[head..end].to_vec();
            return Ok((Answer { status, body }, keep));
        }
    }

    /// Reads what the server sent next (at least a byte) into `buf`, with room for `want` more.
    async fn read_more(&mut self, want: usize) -> Result<(), Error> {
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want.max(4096));
        }
        let read = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(Error::Io)?;
        if read == 0 {
            return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each request on a connection with `answers` in turn, then closes.
    async fn server(answers: Vec<&'static str>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for answer in answers {
                        let mut got = Vec::new();
                        // Read up to the end of the head and the body it announces.
                        loop {
                            let n = s.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..n]);
                            let text = String::from_utf8_lossy(&got).to_string();
                            if let Some(end) = text.find("\r\n\r\n") {
                                let length = text
                                    .lines()
                                    .find_map(|l| l.strip_prefix("Content-Length: "))
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                                    .unwrap_or(0);
                                if got.len() >= end + 4 + length {
                                    break;
                                }
                            }
                        }
                        // Written in two pieces, so the client must put an answer together.
                        let (a, b) = answer.split_at(answer.len() / 2);
                        let _ = s.write_all(a.as_bytes()).await;
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        let _ = s.write_all(b.as_bytes()).await;
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn answers_are_read_whole_and_connections_are_reused_or_replaced() {
        let ok = "HTTP/1.1 202 Accepted\r\ncontent-length: 7\r\n\r\n{\"a\":1}";
        let url = server(vec![ok, ok]).await;
        let pool = Pool::new(&url).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..5 {
            // Two answers per connection: the third exchange finds it closed and opens another.
            let answer = pool
                .request("POST", "/x", &[("Content-Type", "application/json")], b"{}")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(answer.status, 202);
            assert_eq!(answer.body, b"{\"a\":1}");
        }
    }

    #[tokio::test]
    async fn close_and_unreadable_answers_are_told_apart() {
        let url = server(vec![
            "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        let pool = Pool::new(&url).unwrap_or_else(|e| panic!("{e}"));
        let answer = pool.request("GET", "/", &[], &[]).await;
        assert!(
            matches!(answer, Ok(Answer { status: 503, .. })),
            "{answer:?}"
        );
        assert!(pool.lock().is_empty(), "a closed connection is not kept");

        let url = server(vec!["SMTP ready\r\n\r\n"]).await;
        let pool = Pool::new(&url).unwrap_or_else(|e| panic!("{e}"));
        let answer = pool.request("GET", "/", &[], &[]).await;
        assert!(matches!(answer, Err(Error::Protocol(_))), "{answer:?}");
        assert!(matches!(
            Pool::new("http://127.0.0.1:1")
                .unwrap_or_else(|e| panic!("{e}"))
                .request("GET", "/", &[], &[])
                .await,
            Err(Error::Connect(_))
        ));
    }
}
