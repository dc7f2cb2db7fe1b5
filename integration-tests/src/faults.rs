//! An HTTP fault injector in front of a real service: answers chosen requests with an error or
//! too slowly, and forwards the rest. Tests use it to make a downstream fail transiently (503,
//! timeouts) or permanently (4xx) without changing the service.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What to do with requests matching `method` and a path starting with `path_prefix`.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: &'static str,
    pub path_prefix: String,
    /// The first `times` matching requests get the fault; `usize::MAX` for all of them.
    pub times: usize,
    pub kind: FaultKind,
}

#[derive(Debug, Clone)]
pub enum FaultKind {
    /// Answer with this status and a problem body (`Retry-After: 0` on 503).
    Status(u16),
    /// Wait this long, then forward (longer than the client's timeout = a timeout).
    Delay(Duration),
}

pub struct FaultProxy {
    pub url: String,
    /// Requests that matched a fault (method path).
    pub hits: Arc<Mutex<Vec<String>>>,
    faults: Arc<Mutex<Vec<Fault>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: &str, faults: Vec<Fault>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new(faults));
        let faults = state.clone();
        let client = reqwest::Client::new();
        let upstream = upstream.trim_end_matches('/').to_owned();
        let h = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (state, client, upstream, hits) =
                    (state.clone(), client.clone(), upstream.clone(), h.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, state, client, upstream, hits).await;
                });
            }
        });
        FaultProxy {
            url,
            hits,
            faults,
            _task: task,
        }
    }

    /// Replaces the faults from now on (an empty list forwards everything: the service is back).
    pub fn set_faults(&self, faults: Vec<Fault>) {
        if let Ok(mut f) = self.faults.lock() {
            *f = faults;
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.lock().map(|h| h.len()).unwrap_or(0)
    }
}

async fn serve(
    conn: TcpStream,
    faults: Arc<Mutex<Vec<Fault>>>,
    client: reqwest::Client,
    upstream: String,
    hits: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await?;
            let h = h.trim_end().to_owned();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if !k.eq_ignore_ascii_case("host") && !k.eq_ignore_ascii_case("content-length") {
                    headers.push((k.trim().to_owned(), v.trim().to_owned()));
                }
            }
        }
        let mut body = vec![0u8; length];
        r.read_exact(&mut body).await?;

        // A batch (`POST /api/<collection>/batch`) carries single PUTs: a fault for `PUT
        // <prefix>` meets it when one of its items' single paths starts with the prefix, and then
        // applies to the whole batch request (each item it carries gets that answer or delay).
        let calls = carried_calls(&method, &path, &body);
        let fault = {
            let mut f = faults
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            f.iter_mut()
                .find(|f| {
                    f.times > 0
                        && calls
                            .iter()
                            .any(|(m, p)| f.method == m && p.starts_with(&f.path_prefix))
                })
                .map(|f| {
                    f.times = f.times.saturating_sub(1);
                    (f.kind.clone(), f.method, f.path_prefix.clone())
                })
        };
        let fault = fault.map(|(kind, m, prefix)| {
            if let Ok(mut h) = hits.lock() {
                for (cm, cp) in &calls {
                    if cm == m && cp.starts_with(&prefix) {
                        h.push(format!("{cm} {cp}"));
                    }
                }
            }
            kind
        });
        if let Some(FaultKind::Status(status)) = fault {
            let problem = format!(
                "{{\"type\":\"about:blank\",\"title\":\"injected\",\"status\":{status},\"code\":\"injected-fault\",\"detail\":\"fault injected by the test\"}}"
            );
            let retry = if status == 503 {
                "retry-after: 0\r\n"
            } else {
                ""
            };
            let resp = format!(
                "HTTP/1.1 {status} Injected\r\ncontent-type: application/problem+json\r\n{retry}content-length: {}\r\n\r\n{problem}",
                problem.len()
            );
            w.write_all(resp.as_bytes()).await?;
            continue;
        }
        if let Some(FaultKind::Delay(d)) = fault {
            tokio::time::sleep(d).await;
        }
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = client.request(m, format!("{upstream}{path}")).body(body);
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let (status, ctype, bytes) = match req.send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                let ctype = res
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/json")
                    .to_owned();
                (
                    status,
                    ctype,
                    res.bytes().await.unwrap_or_default().to_vec(),
                )
            }
            Err(_) => (
                502,
                "text/plain".to_owned(),
                b"upstream unreachable".to_vec(),
            ),
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
            bytes.len()
        );
        w.write_all(head.as_bytes()).await?;
        w.write_all(&bytes).await?;
    }
}

/// The calls a request makes: itself, or for a batch (`POST /api/<collection>/batch` with
/// `{"items": [{"id": ...}]}`) the single `PUT /api/<collection>/<id>` of each item.
fn carried_calls(method: &str, path: &str, body: &[u8]) -> Vec<(String, String)> {
    let single = vec![(method.to_owned(), path.to_owned())];
    let Some(collection) = path.strip_suffix("/batch") else {
        return single;
    };
    if method != "POST" {
        return single;
    }
    let Ok(batch) = serde_json::from_slice::<serde_json::Value>(body) else {
        return single;
    };
    let Some(items) = batch["items"].as_array().filter(|i| !i.is_empty()) else {
        return single;
    };
    items
        .iter()
        .filter_map(|i| i["id"].as_str())
        .map(|id| ("PUT".to_owned(), format!("{collection}/{id}")))
        .collect()
}
